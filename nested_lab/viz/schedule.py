"""The update-schedule figure of a Continuum Memory System: which level changes at which step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from nested_lab.viz.style import colors


def schedule_figure(schedules: Mapping[str, np.ndarray], chunk_sizes: Sequence[int]) -> plt.Figure:
    """One panel per schedule (title -> bool array ``[levels, steps]``, e.g. from
    :func:`nested_lab.memory.cms.update_schedule` or a trainer's measured ``changed_matrix()``):
    a filled cell is a step at which that level's parameters change."""
    if not schedules:
        raise ValueError("schedules is empty; give at least one title -> [levels, steps] array")
    for title, schedule in schedules.items():
        if np.ndim(schedule) != 2 or np.shape(schedule)[0] != len(chunk_sizes):
            raise ValueError(f"schedule {title!r} must be a [levels, steps] array with {len(chunk_sizes)} levels, "
                             f"got shape {np.shape(schedule)}")
    fig, axes = plt.subplots(len(schedules), 1, figsize=(7, 0.45 * len(chunk_sizes) * len(schedules) + 1.2),
                             sharex=True, squeeze=False)
    cmap = plt.matplotlib.colors.ListedColormap(["#f2f2f2", colors(1)[0]])
    for ax, (title, schedule) in zip(axes[:, 0], schedules.items(), strict=True):
        ax.imshow(np.asarray(schedule, dtype=float), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1)
        ax.set_yticks(range(len(chunk_sizes)), [f"C = {size}" for size in chunk_sizes])
        ax.set_title(title, loc="left")
        ax.grid(False)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig
