"""Every test a document cites exists: SECURITY.md and RELIABILITY.md back each claim with a test
name, and a renamed or deleted test must not leave a claim pointing at nothing."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"\b(test_[a-z0-9_]+)\b")
DEFINED = re.compile(r"^\s*(?:async\s+)?def\s+(test_[a-z0-9_]+)\s*\(", re.MULTILINE)


def _defined_tests() -> set[str]:
    """Test functions and test modules (a doc may cite a whole file, `test_tunnel`)."""
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        names.update(DEFINED.findall(path.read_text()))
        names.add(path.stem)
    return names


def _exists(name: str, defined: set[str]) -> bool:
    if name.endswith("_"):  # a family, written `test_fuzz_*`
        return any(d.startswith(name) for d in defined)
    return name in defined


def test_the_patterns_find_cited_and_defined_names() -> None:
    assert CITED.findall("[test_a_b, test_c] and `test_d`") == ["test_a_b", "test_c", "test_d"]
    assert DEFINED.findall("def test_x(a):\n    async def test_y() -> None:\ndef helper():") == ["test_x", "test_y"]


def test_every_test_a_security_or_reliability_claim_names_exists() -> None:
    defined = _defined_tests()
    missing = []
    cited = 0
    for doc in ("SECURITY.md", "RELIABILITY.md", "TESTING.md"):
        text = (ROOT / "docs" / doc).read_text()
        for name in sorted(set(CITED.findall(text))):
            cited += 1
            if not _exists(name, defined):
                missing.append(f"docs/{doc} cites {name}, which no test defines")
    assert not missing, "\n".join(missing)
    assert cited >= 30  # SECURITY.md alone cites dozens: a pattern that finds none is broken
