"""Sphinx extension for the book build (listed in ``_config.yml``).

It adds four things to the stock Jupyter Book 1 build:

1. it marks the build headless and points the notebooks' ledger at ``_build/ledger``;
2. it invalidates the execution cache when ``nested_lab`` or the quick/full mode
   changes -- jupyter-cache keys on code cells only, so an edit to the package
   would otherwise publish stale numbers -- and re-reads every notebook;
3. it renders the ``{ledger-table}`` directive at write time, after every
   notebook of the build has executed and written its records;
4. it serves ``plotly.min.js`` once from ``_static`` and loads it only on pages
   that hold a static slider, and drops the duplicated inline scripts that make a
   default Jupyter Book 1 page raise ``THEBE_JS_URL has already been declared``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import plotly
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from nested_lab import ledger, runtime
from nested_lab.viz.static_slider import MARKER_CLASS

PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
PACKAGE_DIR = Path(__file__).parent
NOTEBOOK_PREFIX = "notebooks/"
logger = logging.getLogger(__name__)


class ledger_table(nodes.General, nodes.Element):  # noqa: N801 -- docutils names nodes in lower case
    """Placeholder replaced by the ledger table once every notebook has run."""


class LedgerTableDirective(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        return [ledger_table()]


def package_fingerprint(quick: bool) -> str:
    """Hash of every source file of ``nested_lab`` plus the execution mode."""
    digest = hashlib.sha256(f"quick={quick}".encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _build_dir(app: Sphinx) -> Path:
    """The ``_build`` folder that holds ``html/``, the execution cache and the ledger."""
    return Path(app.outdir).resolve().parent


def _on_config_inited(app: Sphinx, config) -> None:
    build_dir = _build_dir(app)
    os.environ[runtime.HEADLESS_ENV] = "1"
    os.environ.setdefault(ledger.LEDGER_ENV, str(build_dir / "ledger"))
    ledger_dir = Path(os.environ[ledger.LEDGER_ENV]).resolve()
    cache_dir = Path(config.nb_execution_cache_path or build_dir / ".jupyter_cache").resolve()
    stamp = build_dir / "nested_lab.fingerprint"
    fingerprint = package_fingerprint(runtime.is_quick())
    has_records = any(ledger_dir.glob("*.json"))
    app.nested_lab_stale = not (has_records and stamp.exists() and stamp.read_text() == fingerprint)
    app.nested_lab_ledger_dir = ledger_dir
    if app.nested_lab_stale:
        logger.info("nested_lab: package or execution mode changed; clearing the execution cache and ledger")
        _clear_cache(cache_dir, build_dir)
        for old in ledger_dir.glob("*.json"):
            old.unlink()
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)


def _clear_cache(cache_dir: Path, build_dir: Path) -> None:
    """Delete the jupyter-cache folder, refusing any folder outside the build folder."""
    if not cache_dir.is_relative_to(build_dir) or cache_dir == build_dir:
        raise RuntimeError(f"refusing to clear execution cache {cache_dir}: it is not inside {build_dir}")
    shutil.rmtree(cache_dir, ignore_errors=True)


def _on_env_get_outdated(app: Sphinx, env, added, changed, removed) -> list[str]:
    ledger_pages = {d for d in env.found_docs if _has_ledger_table(env, d)}
    notebooks = {d for d in env.found_docs if d.startswith(NOTEBOOK_PREFIX)} if app.nested_lab_stale else set()
    return sorted(ledger_pages | notebooks)


def _has_ledger_table(env, docname: str) -> bool:
    source = Path(env.doc2path(docname))
    return source.suffix == ".md" and "{ledger-table}" in source.read_text()


def _on_doctree_resolved(app: Sphinx, doctree, docname: str) -> None:
    placeholders = list(doctree.findall(ledger_table))
    if not placeholders:
        return
    chapters = sorted(Path(d).name for d in app.env.found_docs if d.startswith(NOTEBOOK_PREFIX))
    directory = app.nested_lab_ledger_dir
    missing = [c for c in chapters if not (directory / f"{c}.json").exists()]
    if missing:
        logger.warning(f"no ledger records from {missing} in {directory}; run `make clean` and rebuild",
                       location=docname)
    records = ledger.load_records(directory, [c for c in chapters if c not in missing])
    for node in placeholders:
        node.replace_self(nodes.raw("", ledger.render_html(records), format="html"))


def _on_html_page_context(app: Sphinx, pagename, templatename, context, doctree) -> None:
    if MARKER_CLASS in context.get("body", ""):
        app.add_js_file("plotly.min.js", priority=100)
    _drop_duplicate_scripts(context.get("script_files", []))


def _drop_duplicate_scripts(scripts: list) -> None:
    """Keep the first of identical script tags. Inline scripts that an extension
    registers after the builder starts (sphinx-thebe's ``const THEBE_JS_URL``) are
    otherwise emitted twice, and the second ``const`` raises a SyntaxError on every page."""
    seen, unique = set(), []
    for script in scripts:
        key = (script.filename or "", tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def _on_build_finished(app: Sphinx, exception) -> None:
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir) / "_static"
        static.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PLOTLY_JS, static / "plotly.min.js")


def setup(app: Sphinx) -> dict:
    app.add_node(ledger_table)
    app.add_directive("ledger-table", LedgerTableDirective)
    app.connect("config-inited", _on_config_inited)
    app.connect("env-get-outdated", _on_env_get_outdated)
    app.connect("doctree-resolved", _on_doctree_resolved)
    app.connect("html-page-context", _on_html_page_context)
    app.connect("build-finished", _on_build_finished)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
