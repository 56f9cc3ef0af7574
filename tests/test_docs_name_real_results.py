"""Every benchmarks/results JSON file a document names exists (a figure must point at its source)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAMED = re.compile(r"results/([A-Za-z0-9*?._-]+\.json)")


def _documents() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")])


def named_results(text: str) -> set[str]:
    return set(NAMED.findall(text))


def test_the_pattern_finds_names_in_every_form_the_docs_use() -> None:
    text = "`benchmarks/results/2026-11-27-connect.json`, (`results/a.json`), benchmarks/results/2026-*.json"
    assert named_results(text) == {"2026-11-27-connect.json", "a.json", "2026-*.json"}


def test_every_results_file_a_document_names_exists() -> None:
    missing = []
    named = 0
    for doc in _documents():
        for name in named_results(doc.read_text()):
            named += 1
            if not list(RESULTS.glob(name)):
                missing.append(f"{doc.relative_to(ROOT)} names benchmarks/results/{name}, which does not exist")
    assert not missing, "\n".join(missing)
    assert named >= 4  # the performance and reliability docs do cite their JSON
