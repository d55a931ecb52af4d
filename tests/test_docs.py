"""The docs stay true to the tree: every relative link and every file path they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"`((?:garage|tests|bench|examples|docs)/[\w./-]+\.(?:py|lark|md|garage))`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_resolve(doc: Path):
    text = doc.read_text(encoding="utf-8")
    missing = [target for target in LINK.findall(text)
               if "://" not in target and not (doc.parent / target).exists()]
    missing += [path for path in PATH.findall(text) if not (ROOT / path).exists()]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_the_readme_points_to_the_language_reference():
    assert "](docs/language.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_sources_cite_only_docs_that_exist():
    cited = set()
    for path in [*ROOT.joinpath("garage").rglob("*.py"), *ROOT.joinpath("garage").rglob("*.lark"),
                 *ROOT.joinpath("tests").glob("*.py")]:
        if path.name == Path(__file__).name:
            continue
        cited.update(re.findall(r"\b(\w[\w/]*\.md)\b", path.read_text(encoding="utf-8")))
    assert "docs/language.md" in cited
    missing = {name for name in cited if not (ROOT / name).exists()}
    assert not missing, f"sources cite docs that do not exist: {missing}"


def test_the_readme_shows_the_architecture_sweeps_totals():
    """The README's totals are the generated table's (docs/architectures.md, from bench/sweep.py)."""
    table = (ROOT / "docs" / "architectures.md").read_text(encoding="utf-8")
    totals = re.findall(r"^\| (attempted|built as tiny models|block outputs.*?|every site kind.*?) \| (.+) \|$", table,
                        re.MULTILINE)
    assert len(totals) == 8  # decoders and encoders, then encoder–decoder models
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, value in totals:
        assert f"| {name} | {value} |" in readme, name
    assert int(totals[3][1].split()[0]) >= 205  # issue 28's target for every site kind + generation
