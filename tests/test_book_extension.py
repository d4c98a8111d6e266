"""The book extension's cache invalidation, without running Sphinx."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from nested_lab import book_extension


def _fake_app(build_dir):
    (build_dir / "html").mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(outdir=str(build_dir / "html"))


@pytest.fixture
def build(tmp_path, monkeypatch):
    build_dir = tmp_path / "_build"
    monkeypatch.setenv("NESTED_LAB_LEDGER_DIR", str(build_dir / "ledger"))
    monkeypatch.setenv("NESTED_LAB_QUICK", "1")
    monkeypatch.delenv("NESTED_LAB_HEADLESS", raising=False)
    (build_dir / ".jupyter_cache").mkdir(parents=True)
    (build_dir / ".jupyter_cache" / "entry").write_text("cached")
    (build_dir / "ledger").mkdir()
    (build_dir / "ledger" / "00_x.json").write_text("[]")
    return build_dir


def _init(app):
    book_extension._on_config_inited(app, SimpleNamespace(nb_execution_cache_path=""))


def test_fingerprint_depends_on_the_mode():
    assert book_extension.package_fingerprint(True) != book_extension.package_fingerprint(False)
    assert book_extension.package_fingerprint(True) == book_extension.package_fingerprint(True)


def test_first_build_clears_cache_and_ledger_and_marks_headless(build, monkeypatch):
    app = _fake_app(build)
    _init(app)
    assert app.nested_lab_stale
    assert not (build / ".jupyter_cache").exists()
    assert not list((build / "ledger").glob("*.json"))
    assert (build / "nested_lab.fingerprint").read_text() == book_extension.package_fingerprint(True)
    assert os.environ["NESTED_LAB_HEADLESS"] == "1"


def test_unchanged_package_keeps_the_cache(build):
    (build / "nested_lab.fingerprint").write_text(book_extension.package_fingerprint(True))
    app = _fake_app(build)
    _init(app)
    assert not app.nested_lab_stale
    assert (build / ".jupyter_cache" / "entry").exists()


def test_a_mode_change_invalidates_the_cache(build, monkeypatch):
    (build / "nested_lab.fingerprint").write_text(book_extension.package_fingerprint(True))
    monkeypatch.setenv("NESTED_LAB_QUICK", "0")
    app = _fake_app(build)
    _init(app)
    assert app.nested_lab_stale
    assert not (build / ".jupyter_cache").exists()


def test_a_missing_ledger_invalidates_the_cache(build):
    (build / "nested_lab.fingerprint").write_text(book_extension.package_fingerprint(True))
    (build / "ledger" / "00_x.json").unlink()
    app = _fake_app(build)
    _init(app)
    assert app.nested_lab_stale


def test_refuses_to_clear_a_cache_outside_the_build_folder(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(RuntimeError, match="refusing to clear"):
        book_extension._clear_cache(outside, tmp_path / "_build")
    with pytest.raises(RuntimeError, match="refusing to clear"):
        book_extension._clear_cache(tmp_path / "_build", tmp_path / "_build")
    assert outside.exists()
