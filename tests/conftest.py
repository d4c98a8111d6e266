"""Shared fixtures: the project's paths and one quick-mode build of the whole book.

The book is built once per test session; the notebook (nbval), ledger and
browser tests all read that build, so no notebook executes more often than the
tests need.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nested_lab import runtime

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def toc_files() -> list[str]:
    """Every file named in ``_toc.yml`` (without suffix), in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files.extend(chapter["file"] for chapter in part["chapters"])
    return files


def toc_notebooks() -> list[Path]:
    return [ROOT / f"{name}.ipynb" for name in toc_files() if (ROOT / f"{name}.ipynb").exists()]


def headless_env(ledger_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a headless quick-mode run writing its ledger to ``ledger_dir``."""
    env = {**os.environ, "NESTED_LAB_QUICK": "1", "NESTED_LAB_HEADLESS": "1",
           "NESTED_LAB_LEDGER_DIR": str(ledger_dir), **extra}
    env.pop("PYTEST_ADDOPTS", None)
    return env


def build_book(source: Path, output: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``jupyter-book build`` with the flags of the Makefile: warnings (a missing
    reference, a cell error) fail the build."""
    command = [str(BIN / "jupyter-book"), "build", str(source), "--path-output", str(output),
               "--warningiserror", "--nitpick", "--keep-going"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)


@dataclass(frozen=True)
class BuiltBook:
    html: Path
    ledger: Path
    executed: Path


@pytest.fixture
def one_thread():
    """Small models train faster on one thread: the pool's synchronisation costs more than it gives."""
    with runtime.threads(1):
        yield


@pytest.fixture(scope="session")
def quick_book(tmp_path_factory: pytest.TempPathFactory) -> BuiltBook:
    output = tmp_path_factory.mktemp("book")
    ledger_dir = output / "_build" / "ledger"
    result = build_book(ROOT, output, headless_env(ledger_dir))
    if result.returncode != 0:
        pytest.fail(f"quick book build failed (exit {result.returncode}):\n{result.stdout[-6000:]}\n"
                    f"{result.stderr[-4000:]}")
    return BuiltBook(output / "_build" / "html", ledger_dir, output / "_build" / "jupyter_execute")
