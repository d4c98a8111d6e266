"""Live sliders for JupyterLab, drawn once with their defaults when headless.

A live slider re-runs real code on every change, so it needs a kernel. In the
published book and in every headless run (book build, tests, papermill with env
``NESTED_LAB_HEADLESS=1``) :func:`live_slider` calls the drawing function once
with the default of every control and shows that figure as an ordinary output.
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display

from nested_lab.runtime import is_headless


def live_slider(draw: Callable[..., plt.Figure], **controls: widgets.ValueWidget) -> widgets.Widget | None:
    """Wire ``controls`` (name -> ipywidgets control) to ``draw(**values)``.

    ``draw`` returns one matplotlib figure made from keyword arguments named like
    the controls. Returns the widget box, or None when headless (the figure for
    the default values is displayed instead).
    """
    if not callable(draw):
        raise TypeError(f"draw must be callable, got {type(draw).__name__}")
    if not controls:
        raise ValueError("live_slider needs at least one control")
    for name, control in controls.items():
        if not isinstance(control, widgets.ValueWidget):
            raise TypeError(f"control {name!r} must be an ipywidgets value widget, got {type(control).__name__}")
    if is_headless():
        _show(draw, {name: c.value for name, c in controls.items()})
        return None
    output = widgets.Output()

    def redraw(_change=None) -> None:
        with output:
            output.clear_output(wait=True)
            _show(draw, {name: c.value for name, c in controls.items()})

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values())), output])


def _show(draw: Callable[..., plt.Figure], values: dict) -> None:
    figure = draw(**values)
    if not isinstance(figure, plt.Figure):
        raise TypeError(f"draw must return a matplotlib Figure, got {type(figure).__name__}")
    display(figure)
    plt.close(figure)
