"""Stability metrics of a training run, computed from its per-step records.

The book's definitions (chapters 2 and 3):

* **oscillation ratio**: the 95th over the 5th percentile of the per-step training
  loss (cross-entropy, nats) over the second half of the run. A run whose loss
  swings "between ~7 and ~30-40" has a ratio of 4-5; per-batch noise around a
  flat loss gives a ratio near 1.
* **moving-average swing**: max over min of the 50-step moving average of the
  per-step loss over the second half (slow oscillations, not batch noise).
* **spike ratio**: the largest over the median per-step loss of the second half.
* **loss variance**: variance of the per-step loss over the second half.
* **spike count**: steps whose loss exceeds ``factor`` (5) times the mean of the
  previous ``window`` (50) losses (the phase-1 summary's spike definition).
* **dominant period**: the lag (in steps) of the first peak of the autocorrelation
  of the detrended second-half loss; ``inf`` when it has none.
* **autocorrelation at a lag**: of the step-to-step changes of the second-half loss
  (differencing removes the trend); a limit cycle of period ``p`` gives a large
  positive value at lag ``p``, independent batch noise gives about 0 beyond lag 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from nested_lab.parameters import check_numbers, check_positive_ints, check_range


def second_half(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < 4:
        raise ValueError(f"need at least 4 values, got {len(values)}")
    return values[len(values) // 2:]


def oscillation_ratio(losses: Sequence[float]) -> float:
    """95th / 5th percentile of the second-half per-step loss."""
    tail = second_half(losses)
    low, high = np.percentile(tail, [5, 95])
    return float(high / low)


def moving_average_swing(losses: Sequence[float], window: int = 50) -> float:
    """max / min of the ``window``-step moving average over the second half."""
    tail = second_half(losses)
    window = min(window, len(tail))
    average = np.convolve(tail, np.ones(window) / window, mode="valid")
    return float(average.max() / average.min())


def spike_ratio(losses: Sequence[float]) -> float:
    """Largest over median per-step loss of the second half."""
    tail = second_half(losses)
    return float(tail.max() / np.median(tail))


def loss_variance(losses: Sequence[float]) -> float:
    return float(second_half(losses).var())


def count_spikes(losses: Sequence[float], factor: float = 5.0, window: int = 50) -> int:
    """Steps whose loss exceeds ``factor`` x the mean of the previous ``window`` losses."""
    check_numbers(factor=factor)
    check_positive_ints(window=window)
    series = pd.Series(losses, dtype=float)
    previous = series.rolling(window, min_periods=10).mean().shift(1)
    return int((series > factor * previous).sum())


def _autocorrelation(losses: Sequence[float]) -> np.ndarray:
    """Autocorrelation (lag 0, 1, ...) of the linearly detrended second half; zeros for a flat loss."""
    tail = second_half(losses)
    steps = np.arange(len(tail))
    residual = tail - np.polyval(np.polyfit(steps, tail, 1), steps)
    correlation = np.correlate(residual, residual, mode="full")[len(tail) - 1:]
    return correlation / correlation[0] if correlation[0] > 0 else np.zeros_like(correlation)


def autocorrelation(losses: Sequence[float], lag: int) -> float:
    """Autocorrelation at ``lag`` steps of the changes ``l[t+1] - l[t]`` of the second-half loss."""
    check_positive_ints(lag=lag)
    changes = np.diff(second_half(losses))
    check_range("lag", lag, high=len(changes) - 2, integer=True)
    centred = changes - changes.mean()
    return float((centred[lag:] * centred[:-lag]).sum() / (centred**2).sum())


def dominant_period(losses: Sequence[float]) -> float:
    """Lag of the first autocorrelation peak (above 0.1) of the detrended second half (``inf``: none)."""
    correlation = _autocorrelation(losses)
    peaks = [lag for lag in range(2, len(correlation) - 1)
             if correlation[lag] > max(correlation[lag - 1], correlation[lag + 1]) and correlation[lag] > 0.1]
    return float(peaks[0]) if peaks else float("inf")


class MetricStream:
    """Per-step records of a run, readable as a DataFrame while the run goes on.

    ``listeners`` are called with the stream after every record (a live dashboard).
    """

    def __init__(self, listeners: Sequence[Callable[[MetricStream], None]] = ()) -> None:
        self.rows: list[dict] = []
        self.listeners = list(listeners)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        for listener in self.listeners:
            listener(self)

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def column(self, name: str) -> list:
        return [row[name] for row in self.rows]


def summarize(losses: Sequence[float]) -> dict[str, float]:
    """Every loss-based metric of the module docstring, by name."""
    return {"oscillation_ratio": oscillation_ratio(losses), "ma_swing": moving_average_swing(losses),
            "spike_ratio": spike_ratio(losses), "loss_variance": loss_variance(losses),
            "spikes": count_spikes(losses), "dominant_period": dominant_period(losses)}
