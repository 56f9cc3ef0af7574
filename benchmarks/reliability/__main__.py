"""`python benchmarks/reliability [--quick] [--only ...] [--json FILE] [--write-doc]`: see the package's doc."""
import sys
from pathlib import Path

if not __package__:  # run as a folder: import it as the package `reliability`, not as loose modules
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]  # its module names must not shadow the stdlib's
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from reliability.table import main
else:
    from .table import main

sys.exit(main())
