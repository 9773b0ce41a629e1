"""The documentation stays true to the repository.

* ``benchmarks/README.md`` is generated: its tables are what ``benchmarks/tables.py`` renders from
  the committed ``benchmarks/results/*.json`` (``python -m benchmarks.tables --write``). A result
  re-recorded without regenerating the file fails here.
* Every relative link in README.md, docs/*.md and benchmarks/README.md names a file or folder of
  the checkout, and every ``#anchor`` a heading of the page it points to.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import tables

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a ``# comment`` there is not a heading)."""
    return FENCE.sub("", page.read_text())


def test_benchmarks_readme_is_generated_from_the_results():
    text = tables.README.read_text()
    assert text == tables.update(text), \
        "benchmarks/README.md is stale: run python -m benchmarks.tables --write"


def test_every_result_with_a_renderer_has_its_block():
    names = {m.group("name") for m in tables.BLOCK.finditer(tables.README.read_text())}
    assert names == set(tables.RENDER)


def test_update_replaces_only_the_blocks():
    text = "prose\n<!-- generated: memory -->\nold table\n<!-- end generated: memory -->\nmore\n"
    new = tables.update(text)
    assert new.startswith("prose\n<!-- generated: memory -->\n") and new.endswith(
        "<!-- end generated: memory -->\nmore\n")
    assert "old table" not in new and "| model | file |" in new


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.*)$", _prose(page), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_machine_records_the_cpu_model_and_its_widest_vector_extension(tmp_path):
    from benchmarks.common import cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse4_2 avx avx2 "
                    "avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert cpu(info) == {"model": "AMD EPYC 9B14", "simd": "avx512f"}
    info.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2\n")
    assert cpu(info) == {"model": "AMD EPYC", "simd": "avx2"}
    info.write_text("Features\t: fp asimd evtstrm\n")  # aarch64: no model name, Features
    assert cpu(info) == {"model": "", "simd": "asimd"}
    assert cpu(tmp_path / "missing") == {}


def test_revision_says_dirty_only_when_git_says_the_code_differs(monkeypatch):
    """``git diff --quiet`` exits 0 (same), 1 (differs) or anything else (git failed): a
    failure stamps the row ``unknown``, not ``-dirty``; a file git does not track yet (a new
    benchmark script) is uncommitted code too."""
    import subprocess
    from types import SimpleNamespace

    from benchmarks import common

    monkeypatch.delenv("SPA_REVISION", raising=False)
    for code, untracked, want in ((0, "", "abc"), (1, "", "abc-dirty"), (128, "", "unknown"),
                                  (0, "benchmarks/new.py\n", "abc-dirty")):
        monkeypatch.setattr(subprocess, "run", lambda args, code=code, untracked=untracked, **kw:
                            SimpleNamespace(stdout=untracked if "ls-files" in args else "abc\n",
                                            returncode=0 if "diff" not in args else code))
        assert common.revision() == want, (code, untracked)
