"""Every notebook of the table of contents, validated with nbval in quick mode.

Notebooks are stored without outputs, so nbval compares a fresh execution with
the book build's executed copy: the cells marked ``# NBVAL_CHECK_OUTPUT``
(deterministic summaries) must come out identical -- same seed, same numbers.
Only stdout and results are compared, never stderr (see ``nbval_ignore_stderr``).
"""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT, headless_env, toc_notebooks

NOTEBOOKS = toc_notebooks()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(notebook):
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{notebook.name} has outputs in git"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_first_code_cell_holds_the_parameters(notebook):
    first = next(c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    assert "QUICK =" in first.source and "SEED =" in first.source


@pytest.mark.book
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_reproduces_its_checked_outputs(notebook, quick_book, tmp_path):
    executed = quick_book.executed / notebook.relative_to(ROOT)
    checked = [c for c in nbformat.read(executed, as_version=4).cells
               if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source]
    assert checked and all(c.outputs for c in checked), "each notebook needs a checked, non-empty summary"
    command = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:randomly",
               "-p", "no:cacheprovider", "-p", "nbval_ignore_stderr", "-q", str(executed)]
    env = headless_env(tmp_path / "ledger", PYTHONPATH=str(ROOT / "tests"))
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


LONGEST_CELL = 15  # code lines; longer logic belongs in the chapter's experiments module


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_the_argument_lives_in_markdown(notebook):
    """Code cells are short and never write prose: numbers reach the text through glue."""
    code = [c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    long_cells = [len(source.splitlines()) for source in code if len(source.splitlines()) > LONGEST_CELL]
    assert not long_cells, f"{notebook.name}: code cells of {long_cells} lines (at most {LONGEST_CELL})"
    assert not any("display(Markdown(" in source for source in code), f"{notebook.name} writes prose in code"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_parameters_are_checked_in_one_hidden_call(notebook):
    code = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    checks = [c for c in code if "check_parameters(" in c.source]
    assert len(checks) == 1, f"{notebook.name}: {len(checks)} check_parameters calls (expected 1)"
    assert "hide-input" in checks[0].metadata.get("tags", [])
