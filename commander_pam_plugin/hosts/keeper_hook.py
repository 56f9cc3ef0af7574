"""Opt-in: make plain `keeper` load the plugins, by a .pth file the user installs and removes.

`keeper-pam-hook install` writes one line into this environment's site-packages; at start-up
Python runs it, and it only adds an import finder: when the `keeper` script imports
`keepercommander.__main__`, that module's main() is wrapped with run_with_plugins(). Nothing
else is imported or changed, in this process or any other. `keeper-pam-hook uninstall`
removes the file; `keeper-pam-hook status` says whether it is there.
"""
from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path
from typing import Any, Sequence

TARGET = "keepercommander.__main__"
PTH_NAME = "commander_pam_keeper.pth"
# One line; still harmless if this package is removed later (site would print an error otherwise).
PTH_LINE = ('import importlib.util as _u; _u.find_spec("commander_pam_plugin") and '
            '__import__("commander_pam_plugin.hosts.keeper_hook", fromlist=["activate"]).activate()\n')


class _WrappingLoader(importlib.abc.Loader):
    """Runs Keeper's __main__ module as usual, then wraps its main() with the plugin host."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        original = module.main

        @functools.wraps(original)
        def main(*args: Any, **kwargs: Any) -> int:
            from .keeper import run_with_plugins

            return run_with_plugins(lambda: original(*args, **kwargs))

        module.main = main

    def __getattr__(self, name: str) -> Any:  # get_source, get_code... for tracebacks and runpy
        return getattr(self._inner, name)


class KeeperMainFinder(importlib.abc.MetaPathFinder):
    """Finds keepercommander.__main__ with the other finders and hands back a wrapping loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WrappingLoader(spec.loader)
                return spec
        return None


def activate() -> None:
    """Called by the .pth line: add the finder once."""
    if not any(isinstance(f, KeeperMainFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, KeeperMainFinder())


def pth_path() -> Path:
    """The hook file in this interpreter's site-packages (the environment keeper runs from)."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: Sequence[str] | None = None) -> int:
    """keeper-pam-hook install|uninstall|status."""
    parser = argparse.ArgumentParser(prog="keeper-pam-hook",
                                     description="Make plain `keeper` in this environment load the "
                                                 "commander.plugins plugins (as keeper-pam does), or stop it.")
    parser.add_argument("action", choices=("install", "uninstall", "status"))
    args = parser.parse_args(argv)
    path = pth_path()
    if args.action == "install":
        path.write_text(PTH_LINE, encoding="utf-8")
        print(f"installed {path}: plain `keeper` now loads the plugins (undo: keeper-pam-hook uninstall)")
    elif args.action == "uninstall":
        if path.exists():
            path.unlink()
            print(f"removed {path}: plain `keeper` is Keeper Commander alone again")
        else:
            print(f"not installed ({path} does not exist)")
    else:
        print(f"{'installed' if path.exists() else 'not installed'}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
