"""Computed numbers into the book's prose: myst-nb's ``glue``, for many values at once."""

from __future__ import annotations


def glue_all(**values: object) -> None:
    """Glue each value under its name for ``{glue:text}`name``` in the page's markdown, without
    showing it in the cell: strings and ints as they are, other numbers (numpy or tensor
    scalars included) as Python floats."""
    from myst_nb import glue  # a book dependency: imported only where a chapter runs

    for name, value in values.items():
        glue(name, value if isinstance(value, str | int) else float(value), display=False)
