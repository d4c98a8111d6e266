"""The book's one figure style (seaborn), applied by every chapter."""

from __future__ import annotations

import matplotlib as mpl
import seaborn as sns

from nested_lab.parameters import check_positive_ints

PALETTE = "colorblind"


def use_book_style() -> None:
    """Apply the book's seaborn theme: white grid, colour-blind palette, readable sizes."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update({
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": 100,
        "savefig.bbox": "tight",
        "axes.titlesize": "medium",
        "legend.frameon": False,
    })


def colors(n: int) -> list[str]:
    """``n`` hex colours of the book's palette, shared by matplotlib and Plotly figures."""
    check_positive_ints(n=n)
    return sns.color_palette(PALETTE, n).as_hex()
