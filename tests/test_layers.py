"""The package's layers, declared once and checked on every import statement.

Imports go downward only: ground floor (runtime, parameters, init, ledger) <- data <- memory and
optim (which never import each other) <- models <- train <- experiments. ``viz`` stands beside:
it imports only the ground floor, and only experiments (and the book's extension) import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nested_lab"
GROUND = {"__init__", "runtime", "parameters", "init", "ledger"}
BELOW = {"ground": set(), "data": {"ground"}, "memory": {"ground", "data"}, "optim": {"ground", "data"},
         "models": {"ground", "data", "memory", "optim"}, "train": {"ground", "data", "memory", "optim", "models"},
         "viz": {"ground"}, "experiments": {"ground", "data", "memory", "optim", "models", "train", "viz"},
         "book_extension": {"ground", "viz"}}


def layer_of(module: str) -> str:
    """The layer of ``nested_lab.a.b``: its sub-package, or the ground floor for the listed modules."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in GROUND:
        return "ground"
    if parts[1] not in BELOW:
        raise ValueError(f"{module} is in no layer: place it in one (see {Path(__file__).name})")
    return parts[1]


def package_imports(path: Path) -> set[str]:
    """The ``nested_lab`` modules that a source file imports (``from nested_lab import x`` -> ``nested_lab.x``)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.startswith("nested_lab"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nested_lab"):
            imported.update(f"{node.module}.{alias.name}" if node.module == "nested_lab" else node.module
                            for alias in node.names)
    return imported


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """Every import that goes up or sideways across layers, as 'importer -> imported'."""
    wrong = []
    for path in sorted(root.rglob("*.py")):
        importer = layer_of(module_name(path, root))
        for imported in sorted(package_imports(path)):
            target = layer_of(imported)
            if target != importer and target not in BELOW[importer]:
                wrong.append(f"{module_name(path, root)} ({importer}) -> {imported} ({target})")
    return wrong


def test_imports_go_downward_only():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    package = tmp_path / "nested_lab"
    (package / "memory").mkdir(parents=True)
    (package / "memory" / "rule.py").write_text("from nested_lab.models.cortex import CortexGPT\n")
    (package / "optim").mkdir()
    (package / "optim" / "opt.py").write_text("from nested_lab.memory import rule\nfrom nested_lab import runtime\n")
    assert upward_imports(package) == [
        "nested_lab.memory.rule (memory) -> nested_lab.models.cortex (models)",
        "nested_lab.optim.opt (optim) -> nested_lab.memory (memory)"]


def test_a_module_outside_every_layer_is_an_error():
    with pytest.raises(ValueError, match=r"nested_lab\.scratch is in no layer"):
        layer_of("nested_lab.scratch")
