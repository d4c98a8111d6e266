"""Unit tests for nested_lab.viz: the book style, static (Plotly) sliders and live (ipywidgets) sliders."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import math
import re

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from nested_lab.train.metrics import MetricStream
from nested_lab.viz import (
    LiveDashboard,
    StaticSlider,
    colors,
    dashboard_figure,
    live_slider,
    schedule_figure,
    static_slider,
    use_book_style,
)
from nested_lab.viz.static_slider import MARKER_CLASS

X = [0.0, 1.0, 2.0, 3.0]


def _grid() -> dict:
    """Three slider values, two curves each; every number has at most 5 significant digits."""
    return {
        value: {"measured": (X, [value * x for x in X]), "theory": (X, [value + x for x in X])}
        for value in (0.5, 1.0, 1.5)
    }


def _slider(grid=None, **kwargs) -> StaticSlider:
    kwargs = {"slider_label": "lr", "x_label": "step", "y_label": "loss", **kwargs}
    return static_slider(_grid() if grid is None else grid, **kwargs)


# ----- style -------------------------------------------------------------------------------------


def test_use_book_style_sets_rc_params():
    with matplotlib.rc_context():
        use_book_style()
        assert list(matplotlib.rcParams["figure.figsize"]) == [6.4, 3.6]
        assert matplotlib.rcParams["legend.frameon"] is False
        assert matplotlib.rcParams["savefig.bbox"] == "tight"
        cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
        assert matplotlib.colors.to_hex(cycle[0]) == colors(1)[0]


@pytest.mark.parametrize("n", [1, 3, 10, 12])
def test_colors_gives_n_hex_strings(n):
    result = colors(n)
    assert len(result) == n
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in result)


def test_colors_are_distinct_and_stable():
    assert len(set(colors(5))) == 5
    assert colors(3) == colors(5)[:3]


@pytest.mark.parametrize("n", [0, -2])
def test_colors_non_positive_raises(n):
    with pytest.raises(ValueError, match=f"n must be >= 1, got {n}"):
        colors(n)


# ----- static_slider: figure ---------------------------------------------------------------------


def test_static_slider_has_one_step_per_grid_value():
    slider = _slider()
    steps = slider.figure.layout.sliders[0].steps
    assert len(steps) == 3
    assert [s.label for s in steps] == ["0.5", "1", "1.5"]
    assert all(s.method == "restyle" for s in steps)


def test_static_slider_labels_non_float_values_with_str():
    grid = {2: {"a": ([0, 1], [1, 2])}, "adam": {"a": ([0, 1], [3, 4])}}
    steps = _slider(grid).figure.layout.sliders[0].steps
    assert [s.label for s in steps] == ["2", "adam"]


def test_static_slider_defaults_to_first_value():
    slider = _slider()
    assert slider.figure.layout.sliders[0].active == 0
    assert list(slider.figure.data[0].y) == [0.5 * x for x in X]


def test_static_slider_initial_traces_equal_initial_curves():
    grid = _grid()
    slider = _slider(grid, initial=1.5)
    assert slider.figure.layout.sliders[0].active == 2
    assert [t.name for t in slider.figure.data] == ["measured", "theory"]
    for trace, (x, y) in zip(slider.figure.data, grid[1.5].values(), strict=True):
        assert list(trace.x) == x
        assert list(trace.y) == y


def test_static_slider_step_args_hold_each_values_data():
    grid = _grid()
    steps = _slider(grid).figure.layout.sliders[0].steps
    for step, curves in zip(steps, grid.values(), strict=True):
        (args,) = step.args
        assert args["x"] == [x for x, _ in curves.values()]
        assert args["y"] == [y for _, y in curves.values()]


def test_static_slider_rounds_to_five_significant_digits():
    grid = {1.0: {"a": ([0.123456789, 1, 2], [1.23456789, 123456.7, -9.87654321e-7])},
            2.0: {"a": ([0, 1, 2], [math.pi, 2 / 3, 1e10 / 3])}}
    slider = _slider(grid)
    assert list(slider.figure.data[0].x) == [0.12346, 1.0, 2.0]
    assert list(slider.figure.data[0].y) == [1.2346, 123460.0, -9.8765e-7]
    assert slider.figure.layout.sliders[0].steps[1].args[0]["y"] == [[3.1416, 0.66667, 3.3333e9]]


def test_static_slider_non_finite_values_become_none():
    grid = {1.0: {"a": ([0, 1, 2, 3], [1.0, math.nan, math.inf, -math.inf])},
            2.0: {"a": ([0, 1, 2, 3], [np.nan, 2.0, np.inf, 3.0])}}
    slider = _slider(grid)
    assert list(slider.figure.data[0].y) == [1.0, None, None, None]
    assert slider.figure.layout.sliders[0].steps[1].args[0]["y"] == [[None, 2.0, None, 3.0]]


def test_static_slider_accepts_numpy_arrays():
    grid = {0.1: {"a": (np.arange(3.0), np.array([1.0, 2.0, 3.0]))}}
    slider = _slider(grid)
    assert list(slider.figure.data[0].y) == [1.0, 2.0, 3.0]
    assert slider.figure.layout.sliders[0].steps[0].label == "0.1"


def test_static_slider_dashed_curves():
    slider = _slider(dashed=["theory"])
    measured, theory = slider.figure.data
    assert (theory.mode, theory.line.dash) == ("lines", "dash")
    assert (measured.mode, measured.line.dash) == ("lines+markers", "solid")


def test_static_slider_uses_book_colors():
    slider = _slider()
    assert [t.line.color for t in slider.figure.data] == colors(2)


def test_static_slider_labels_and_title():
    layout = _slider(title="Loss curves").figure.layout
    assert layout.title.text == "Loss curves"
    assert layout.xaxis.title.text == "step"
    assert layout.yaxis.title.text == "loss"
    assert layout.sliders[0].currentvalue.prefix == "lr = "


def test_static_slider_without_title_has_none():
    assert _slider().figure.layout.title.text is None


def test_static_slider_autorange_without_y_range():
    yaxis = _slider().figure.layout.yaxis
    assert yaxis.type == "linear"
    assert yaxis.autorange is True


def test_static_slider_linear_y_range():
    yaxis = _slider(y_range=(-1, 5)).figure.layout.yaxis
    assert tuple(yaxis.range) == (-1, 5)
    assert yaxis.autorange is False


def test_static_slider_log_y_range_is_in_decades():
    yaxis = _slider(log_y=True, y_range=(1e-3, 10.0)).figure.layout.yaxis
    assert yaxis.type == "log"
    assert yaxis.range == pytest.approx((-3.0, 1.0))


# ----- static_slider: HTML and ids ---------------------------------------------------------------


def test_to_html_has_marker_class_and_no_plotly_library():
    slider = _slider()
    html = slider.to_html()
    assert html.startswith(f'<div class="{MARKER_CLASS}">')
    assert f'id="{slider.div_id}"' in html
    assert len(html) < 200_000
    assert "plotly.min.js" not in html
    assert "<script src=" not in html


def test_div_id_is_stable_for_identical_input():
    first, second = _slider(), _slider()
    assert re.fullmatch(r"slider-[0-9a-f]{12}", first.div_id)
    assert first.div_id == second.div_id
    assert first.to_html() == second.to_html()


def test_div_id_differs_for_different_data():
    grid = _grid()
    grid[1.0]["measured"] = (X, [9.0, 9.0, 9.0, 9.0])
    assert _slider(grid).div_id != _slider().div_id


def test_div_id_differs_for_different_initial():
    assert _slider(initial=1.0).div_id != _slider(initial=0.5).div_id


def test_repr_mimebundle_has_html_and_plotly_json():
    slider = _slider()
    bundle = slider._repr_mimebundle_()
    assert bundle["text/html"] == slider.to_html()
    plotly_json = bundle["application/vnd.plotly.v1+json"]
    assert len(plotly_json["data"]) == 2
    assert len(plotly_json["layout"]["sliders"][0]["steps"]) == 3
    assert bundle["text/plain"] == f"<StaticSlider {slider.div_id}: 3 positions>"


# ----- static_slider: bad input ------------------------------------------------------------------


def test_static_slider_empty_grid_raises():
    with pytest.raises(ValueError, match="grid is empty"):
        _slider({})


def test_static_slider_empty_curve_dict_raises():
    with pytest.raises(ValueError, match="grid entries must hold at least one curve"):
        _slider({1.0: {}})


def test_static_slider_inconsistent_curve_names_raise():
    grid = _grid()
    grid[1.0] = {"measured": grid[1.0]["measured"]}
    with pytest.raises(ValueError, match=r"slider value 1.0 has curves \['measured'\], expected \['measured', 'theory'\]"):
        _slider(grid)


def test_static_slider_curve_order_must_match():
    grid = _grid()
    grid[1.5] = {"theory": grid[1.5]["theory"], "measured": grid[1.5]["measured"]}
    with pytest.raises(ValueError, match=r"slider value 1\.5 has curves"):
        _slider(grid)


def test_static_slider_length_mismatch_raises():
    grid = _grid()
    grid[0.5]["theory"] = ([0, 1, 2], [1, 2])
    with pytest.raises(ValueError, match=r"curve 'theory' at slider value 0.5: len\(x\)=3 != len\(y\)=2"):
        _slider(grid)


@pytest.mark.parametrize("curve", [([0, 1], [1, 2], [3, 4]), ([0, 1],), 5, None])
def test_static_slider_curve_not_a_pair_raises(curve):
    with pytest.raises(ValueError, match=r"curve 'a' at slider value 1.0 must be a pair \(x, y\)"):
        _slider({1.0: {"a": curve}})


def test_static_slider_unknown_initial_raises():
    with pytest.raises(ValueError, match=r"initial=2.0 is not a slider value"):
        _slider(initial=2.0)


def test_static_slider_unknown_dashed_curve_raises():
    with pytest.raises(ValueError, match=r"dashed names unknown curves \['prediction'\]"):
        _slider(dashed=["theory", "prediction"])


@pytest.mark.parametrize("y_range", [(1.0, 1.0), (2.0, 1.0), (0.0, 1.0, 2.0), (1.0,)])
def test_static_slider_bad_y_range_raises(y_range):
    with pytest.raises(ValueError, match="y_range must be \\(low, high\\) with low < high"):
        _slider(y_range=y_range)


@pytest.mark.parametrize("y_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_static_slider_non_positive_log_range_raises(y_range):
    with pytest.raises(ValueError, match="must be positive on a log axis"):
        _slider(log_y=True, y_range=y_range)


def test_static_slider_non_positive_range_is_fine_on_linear_axis():
    assert tuple(_slider(y_range=(0.0, 1.0)).figure.layout.yaxis.range) == (0.0, 1.0)


# ----- live_slider -------------------------------------------------------------------------------


class _Recorder:
    """A draw function that records its keyword arguments and returns a pyplot figure."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.figures: list[plt.Figure] = []

    def __call__(self, **values) -> plt.Figure:
        self.calls.append(values)
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, values.get("lr", 0)])
        self.figures.append(fig)
        return fig


@pytest.fixture
def headless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NESTED_LAB_HEADLESS", "1")


@pytest.fixture
def interactive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NESTED_LAB_HEADLESS", raising=False)


def _controls() -> dict:
    return {"lr": widgets.FloatSlider(value=0.5, min=0.0, max=2.0),
            "steps": widgets.IntSlider(value=10, min=1, max=100)}


def test_live_slider_headless_draws_once_with_defaults(headless):
    draw = _Recorder()
    assert live_slider(draw, **_controls()) is None
    assert draw.calls == [{"lr": 0.5, "steps": 10}]


def test_live_slider_headless_closes_the_figure(headless):
    draw = _Recorder()
    live_slider(draw, **_controls())
    assert not plt.fignum_exists(draw.figures[0].number)


def test_live_slider_interactive_returns_vbox_and_draws_once(interactive):
    draw = _Recorder()
    controls = _controls()
    box = live_slider(draw, **controls)
    assert isinstance(box, widgets.VBox)
    row, output = box.children
    assert isinstance(row, widgets.HBox)
    assert list(row.children) == list(controls.values())
    assert isinstance(output, widgets.Output)
    assert draw.calls == [{"lr": 0.5, "steps": 10}]


def test_live_slider_interactive_redraws_on_change(interactive):
    draw = _Recorder()
    controls = _controls()
    live_slider(draw, **controls)
    controls["lr"].value = 1.25
    assert draw.calls[-1] == {"lr": 1.25, "steps": 10}
    controls["steps"].value = 20
    assert draw.calls[-1] == {"lr": 1.25, "steps": 20}
    assert len(draw.calls) == 3


def test_live_slider_without_controls_raises(headless):
    with pytest.raises(ValueError, match="needs at least one control"):
        live_slider(_Recorder())


@pytest.mark.parametrize("control", [0.5, "lr", widgets.Button(description="go")])
def test_live_slider_non_widget_control_raises(headless, control):
    with pytest.raises(TypeError, match="control 'lr' must be an ipywidgets value widget"):
        live_slider(_Recorder(), lr=control)


def test_live_slider_non_callable_draw_raises(headless):
    with pytest.raises(TypeError, match="draw must be callable, got str"):
        live_slider("draw", **_controls())


def test_live_slider_headless_draw_returning_non_figure_raises(headless):
    with pytest.raises(TypeError, match="draw must return a matplotlib Figure, got NoneType"):
        live_slider(lambda **_: None, **_controls())


def test_live_slider_interactive_draw_returning_non_figure_raises(interactive):
    with pytest.raises(TypeError, match="draw must return a matplotlib Figure, got Axes"):
        live_slider(lambda **_: plt.subplots()[1], **_controls())
    plt.close("all")


# ----- dashboard ------------------------------------------------------------------------------


def _records(n: int = 30) -> pd.DataFrame:
    return pd.DataFrame({"batch": range(1, n + 1), "loss": np.linspace(4, 3, n), "grad_norm": np.ones(n),
                         "clip": np.ones(n), "gate_current": np.full(n, 0.5), "gate_stm": np.full(n, 0.3),
                         "gate_ltm": np.full(n, 0.2), "stm_entries": np.arange(n), "ltm_rows": np.arange(n) * 3})


def test_dashboard_figure_has_four_labelled_panels():
    fig = dashboard_figure(_records())
    assert len(fig.axes) == 4 and all(ax.get_ylabel() for ax in fig.axes)
    plt.close(fig)
    with pytest.raises(ValueError, match="no records"):
        dashboard_figure(_records().iloc[:0])


def test_live_dashboard_draws_nothing_when_headless(monkeypatch):
    monkeypatch.setenv("NESTED_LAB_HEADLESS", "1")
    shown = []
    monkeypatch.setattr("nested_lab.viz.dashboard.display", lambda *a, **k: shown.append(a))
    stream = MetricStream([LiveDashboard(every=5)])
    for row in _records(10).to_dict("records"):
        stream.append(row)
    assert shown == []
    monkeypatch.setenv("NESTED_LAB_HEADLESS", "0")

    class Handle:
        def update(self, figure):
            shown.append(figure)

    monkeypatch.setattr("nested_lab.viz.dashboard.display", lambda *a, **k: shown.append(a) or Handle())
    for row in _records(10).to_dict("records"):
        stream.append(row)
    assert len(shown) == 2  # records 15 and 20: first a display, then an update
    with pytest.raises(ValueError, match="every"):
        LiveDashboard(every=0)


def test_schedule_figure_draws_one_panel_per_schedule():
    schedules = {"a": np.eye(3, 10, dtype=bool), "b": np.ones((3, 10), dtype=bool)}
    fig = schedule_figure(schedules, chunk_sizes=[1, 8, 32])
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["a", "b"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["C = 1", "C = 8", "C = 32"]
    plt.close(fig)


def test_schedule_figure_rejects_bad_shapes():
    with pytest.raises(ValueError, match="schedules is empty"):
        schedule_figure({}, [1])
    with pytest.raises(ValueError, match=r"schedule 'a' must be a \[levels, steps\] array with 2 levels"):
        schedule_figure({"a": np.ones((3, 4))}, [1, 8])


def test_glue_all_glues_plain_values_without_display(monkeypatch):
    import myst_nb
    import numpy as np
    import torch

    from nested_lab.viz import glue_all

    glued = []
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display: glued.append((name, value, display)))
    glue_all(verdict="refuted", count=3, ratio=np.float64(0.5), norm=torch.tensor(2.0))
    assert glued == [("verdict", "refuted", False), ("count", 3, False), ("ratio", 0.5, False),
                     ("norm", 2.0, False)]
    assert all(type(value) in (str, int, float) for _, value, _ in glued)
