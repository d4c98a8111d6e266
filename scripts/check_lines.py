"""Share of argument-checking lines in the package's code lines.

    python scripts/check_lines.py [FOLDER_OR_FILE ...]   (default: nested_lab and nested_lab/memory)

A *code line* is a line of a module that holds code: not blank, not a comment,
not part of a docstring. A *check line* is a code line inside
- a ``raise TypeError``/``raise ValueError`` statement;
- a simple statement that calls a function named ``check_*`` / ``_check*`` / ``require_*``
  anywhere in its expression (``x = check_...(...)``, ``return f(check_...(...))`` too);
- an ``if`` or ``for`` whose body holds only such statements;
- the definition of such a function.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

CHECK_PREFIXES = ("check_", "_check", "require_", "_require")
ERRORS = {"TypeError", "ValueError"}


def code_lines(source: str) -> set[int]:
    """Line numbers holding code (comments, blank lines and docstrings excluded)."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                          tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _is_docstring(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))


def _is_check_name(name: str | None) -> bool:
    return bool(name) and name.startswith(CHECK_PREFIXES)


def _called_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return None


def _raises_error(statement: ast.stmt) -> bool:
    if not isinstance(statement, ast.Raise) or statement.exc is None:
        return False
    name = _called_name(statement.exc) or getattr(statement.exc, "id", None)
    return name in ERRORS


def _is_check(statement: ast.AST) -> bool:
    """A raise of TypeError/ValueError, an ``if`` or ``for`` holding only checks, or a simple
    statement that calls a check helper anywhere in its expression."""
    if _raises_error(statement):
        return True
    if isinstance(statement, ast.If | ast.For):
        return all(_is_check(s) for s in statement.body) and not statement.orelse
    if isinstance(statement, ast.Expr | ast.Assign | ast.AnnAssign | ast.Return):
        return any(_is_check_name(_called_name(node)) for node in ast.walk(statement))
    return isinstance(statement, ast.FunctionDef) and _is_check_name(statement.name)


def check_lines(source: str) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt) and _is_check(node):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def share(folder: Path) -> tuple[int, int]:
    checks = code = 0
    for path in [folder] if folder.is_file() else sorted(folder.rglob("*.py")):
        source = path.read_text()
        lines = code_lines(source)
        code += len(lines)
        checks += len(lines & check_lines(source))
    return checks, code


def main(folders: list[str]) -> None:
    for folder in folders or ["nested_lab", "nested_lab/memory"]:
        checks, code = share(Path(folder))
        print(f"{folder}: {checks} check lines / {code} code lines = {checks / max(code, 1):.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
