"""The quick-mode book build: pages, the ledger page, no published errors, and the
build failing on a cell error or a missing reference."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, build_book, headless_env, toc_files, toc_notebooks

from nested_lab import ledger

pytestmark = pytest.mark.book


def test_every_toc_page_is_built(quick_book):
    assert (quick_book.html / "index.html").exists()
    for name in toc_files():
        assert (quick_book.html / f"{name}.html").exists(), f"{name}.html missing from the build"


def test_every_notebook_wrote_its_ledger(quick_book):
    for notebook in toc_notebooks():
        records = json.loads((quick_book.ledger / f"{notebook.stem}.json").read_text())
        assert records, f"{notebook.stem} wrote no ledger record"
        assert all(r["quick"] for r in records), "a quick build must write quick-mode records"


def test_ledger_page_lists_every_record_of_the_build(quick_book):
    page = (quick_book.html / "book" / "ledger.html").read_text()
    listed = re.findall(r'data-record-id="([^"]+)"', page)
    records = ledger.load_records(quick_book.ledger)
    assert records, "the build produced no ledger records"
    assert sorted(listed) == sorted(f"{r.chapter}/{r.id}" for r in records)
    for record in records:
        assert f'class="verdict-{record.verdict}"' in page


def test_no_error_output_is_published(quick_book):
    for page in quick_book.html.rglob("*.html"):
        text = page.read_text()
        assert "Traceback (most recent call last)" not in text, f"{page} shows a traceback"
        assert 'class="output traceback' not in text, f"{page} shows an error output"


def test_plotly_is_served_once_not_inlined(quick_book):
    bundle = quick_book.html / "_static" / "plotly.min.js"
    assert bundle.stat().st_size > 1_000_000
    for page in quick_book.html.rglob("*.html"):
        assert page.stat().st_size < 1_000_000, f"{page} is {page.stat().st_size} bytes"
    chapter0 = (quick_book.html / "notebooks" / "00_reading_this_book.html").read_text()
    assert "_static/plotly.min.js" in chapter0
    assert "_static/plotly.min.js" not in (quick_book.html / "book" / "intro.html").read_text()


def test_thebe_is_not_declared_twice(quick_book):
    chapter0 = (quick_book.html / "notebooks" / "00_reading_this_book.html").read_text()
    assert chapter0.count("THEBE_JS_URL") <= 1


def _tiny_book(root: Path, notebook_cell: str, intro: str) -> Path:
    """A one-notebook book with the project's own configuration."""
    (root / "book").mkdir(parents=True)
    (root / "notebooks").mkdir()
    shutil.copy(ROOT / "_config.yml", root / "_config.yml")
    shutil.copy(ROOT / "book" / "references.bib", root / "book" / "references.bib")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/probe\n")
    (root / "book" / "intro.md").write_text(f"# Probe\n\n{intro}\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Probe notebook"),
                                               nbformat.v4.new_code_cell(notebook_cell)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, root / "notebooks" / "probe.ipynb")
    return root


def test_a_cell_error_fails_the_build(tmp_path):
    source = _tiny_book(tmp_path / "src", "raise RuntimeError('probe cell error')", "Fine.")
    result = build_book(source, tmp_path / "out", headless_env(tmp_path / "ledger"))
    assert result.returncode != 0
    assert "probe cell error" in result.stdout + result.stderr


def test_a_missing_reference_fails_the_build(tmp_path):
    source = _tiny_book(tmp_path / "src", "print('ok')", "See {ref}`no-such-label`.")
    result = build_book(source, tmp_path / "out", headless_env(tmp_path / "ledger"))
    assert result.returncode != 0
    assert "no-such-label" in result.stdout + result.stderr
