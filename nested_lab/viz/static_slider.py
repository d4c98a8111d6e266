"""A slider that works in the published HTML book: no kernel, no network.

Every slider position is precomputed; the browser only swaps the curves. The
figure is drawn by Plotly: its ``plotly.min.js`` ships inside the ``plotly``
wheel, is copied once into the book's ``_static`` folder and is loaded (then
cached) only by pages that hold a slider -- see :mod:`nested_lab.book_extension`.
Each page carries only its own data, rounded to 5 significant digits. A
Vega-Lite chart would need a smaller script, but no PyPI package ships the
Vega browser bundle, so it could not be served without a network.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from nested_lab.viz.style import colors

MARKER_CLASS = "nested-lab-static-slider"
Curve = tuple[Sequence[float], Sequence[float]]


@dataclass(frozen=True)
class StaticSlider:
    """A Plotly figure with a precomputed slider, displayable in JupyterLab and in the book."""

    figure: go.Figure
    div_id: str

    def to_html(self) -> str:
        body = self.figure.to_html(full_html=False, include_plotlyjs=False, div_id=self.div_id,
                                   config={"displaylogo": False, "responsive": True})
        return f'<div class="{MARKER_CLASS}">{body}</div>'

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        positions = len(self.figure.layout.sliders[0].steps)
        return {
            "application/vnd.plotly.v1+json": self.figure.to_plotly_json(),
            "text/html": self.to_html(),
            "text/plain": f"<StaticSlider {self.div_id}: {positions} positions>",
        }


def static_slider(grid: Mapping[float | str, Mapping[str, Curve]], *, slider_label: str,
                  x_label: str, y_label: str, title: str = "", log_y: bool = False,
                  y_range: tuple[float, float] | None = None,
                  initial: float | str | None = None, dashed: Sequence[str] = ()) -> StaticSlider:
    """Turn ``grid`` (slider value -> {curve name -> (x, y)}) into a :class:`StaticSlider`.

    Every slider value must give the same curve names. Non-finite y values are
    drawn as gaps. ``initial`` picks the slider value shown first (default: the
    first); curves named in ``dashed`` are drawn as dashed lines without markers
    (e.g. a theoretical prediction over measured points).
    """
    values = list(grid)
    if not values:
        raise ValueError("grid is empty; give at least one slider value")
    names = list(grid[values[0]])
    if not names:
        raise ValueError("grid entries must hold at least one curve")
    for value in values:
        if list(grid[value]) != names:
            raise ValueError(f"slider value {value!r} has curves {list(grid[value])}, expected {names}")
        for name, curve in grid[value].items():
            _check_curve(value, name, curve)
    initial = values[0] if initial is None else initial
    if unknown := [name for name in dashed if name not in names]:
        raise ValueError(f"dashed names unknown curves {unknown}; curves are {names}")
    if initial not in grid:
        raise ValueError(f"initial={initial!r} is not a slider value; choose one of {values}")
    if y_range is not None and (len(y_range) != 2 or y_range[0] >= y_range[1]):
        raise ValueError(f"y_range must be (low, high) with low < high, got {y_range!r}")
    if log_y and y_range is not None and y_range[0] <= 0:
        raise ValueError(f"y_range {y_range} must be positive on a log axis")

    palette = colors(len(names))
    fig = go.Figure([
        go.Scatter(x=_round(x), y=_round(y), name=name, mode="lines" if name in dashed else "lines+markers",
                   marker={"size": 5}, line={"color": palette[i], "dash": "dash" if name in dashed else "solid"})
        for i, (name, (x, y)) in enumerate(grid[initial].items())
    ])
    fig.update_layout(
        title=title or None, template="plotly_white", height=440,
        margin={"l": 60, "r": 20, "t": 50 if title else 20, "b": 40},
        xaxis_title=x_label, yaxis_title=y_label,
        yaxis={"type": "log" if log_y else "linear", "range": _axis_range(y_range, log_y),
               "autorange": y_range is None},
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"},
        sliders=[{"active": values.index(initial), "currentvalue": {"prefix": f"{slider_label} = "},
                  "pad": {"t": 50}, "steps": [_step(v, grid[v]) for v in values]}],
    )
    return StaticSlider(fig, _div_id(fig))


def _check_curve(value, name: str, curve: Curve) -> None:
    if not hasattr(curve, "__len__") or len(curve) != 2:
        raise ValueError(f"curve {name!r} at slider value {value!r} must be a pair (x, y)")
    x, y = curve
    if len(x) != len(y):
        raise ValueError(f"curve {name!r} at slider value {value!r}: len(x)={len(x)} != len(y)={len(y)}")


def _step(value, curves: Mapping[str, Curve]) -> dict:
    xs = [_round(x) for x, _ in curves.values()]
    ys = [_round(y) for _, y in curves.values()]
    label = f"{value:.3g}" if isinstance(value, float) else str(value)
    return {"method": "restyle", "label": label, "args": [{"x": xs, "y": ys}]}


def _round(seq: Sequence[float]) -> list[float | None]:
    return [float(f"{float(v):.5g}") if math.isfinite(float(v)) else None for v in seq]


def _axis_range(y_range, log_y: bool):
    if y_range is None:
        return None
    return [math.log10(v) for v in y_range] if log_y else list(y_range)


def _div_id(fig: go.Figure) -> str:
    """A stable id from the figure's content, so that re-executions give identical outputs."""
    digest = hashlib.sha1(json.dumps(fig.to_plotly_json(), sort_keys=True, default=str).encode())
    return f"slider-{digest.hexdigest()[:12]}"
