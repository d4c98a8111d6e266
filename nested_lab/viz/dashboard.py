"""A training dashboard: the phase-1 summary's "monitoring dashboard", inside JupyterLab.

:func:`dashboard_figure` draws four panels from a run's per-step records (loss,
gradient norm, gate weights, memory sizes). :class:`LiveDashboard` listens to a
:class:`~nested_lab.train.metrics.MetricStream` and redraws the figure every
``every`` records while a run trains; when headless (book builds, tests) it draws
nothing during training, and the chapter shows the final figure instead.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from nested_lab.parameters import check_positive_ints
from nested_lab.runtime import is_headless


def dashboard_figure(records: pd.DataFrame, smooth: int = 25) -> plt.Figure:
    """Loss (per step and ``smooth``-step mean), gradient norm, gate weights, memory sizes."""
    if records.empty:
        raise ValueError("no records to draw yet")
    steps = records["batch"]
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.4), sharex=True)
    loss, grad, gates, memory = axes.flat
    loss.plot(steps, records["loss"], lw=0.6, alpha=0.5, label="per step")
    loss.plot(steps, records["loss"].rolling(smooth, min_periods=1).mean(), lw=1.5, label=f"{smooth}-step mean")
    loss.set(ylabel="training loss (nats)")
    loss.legend(fontsize="small")
    if "grad_norm" in records:
        grad.semilogy(steps, records["grad_norm"], lw=0.8, label="gradient norm")
        grad.plot(steps, records["clip"], lw=1, ls="--", label="clip threshold")
        grad.legend(fontsize="small")
    grad.set(ylabel="norm")
    for column, label in (("gate_current", "current"), ("gate_stm", "STM"), ("gate_ltm", "LTM")):
        if column in records:
            gates.plot(steps, records[column], lw=1, label=label)
    gates.set(xlabel="batch", ylabel="mean gate weight", ylim=(0, 1))
    gates.legend(fontsize="small")
    if "stm_entries" in records:
        memory.plot(steps, records["stm_entries"], label="STM entries")
        memory.plot(steps, records["ltm_rows"], label="LTM rows")
        memory.set_yscale("symlog")
        memory.legend(fontsize="small")
    memory.set(xlabel="batch", ylabel="size")
    fig.tight_layout()
    return fig


class LiveDashboard:
    """A :class:`~nested_lab.train.metrics.MetricStream` listener redrawing the dashboard."""

    def __init__(self, every: int = 25) -> None:
        check_positive_ints(every=every)
        self.every = every
        self._handle = None

    def __call__(self, stream) -> None:
        if is_headless() or len(stream.rows) % self.every:
            return
        figure = dashboard_figure(stream.frame)
        if self._handle is None:
            self._handle = display(figure, display_id=True)
        else:
            self._handle.update(figure)
        plt.close(figure)
