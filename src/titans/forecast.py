"""Forecasting models and metrics (paper Section 5.5, Table 3): a window (B, lookback, C) -> its forecast
(B, horizon, C).

Every channel is forecast on its own from its own past (channel independence, as in PatchTST and DLinear), so the
weights do not depend on the number of channels. `PatchForecaster` runs any variant's backbone (`TitansModel`) over
patch tokens of the look-back and maps the last token's hidden state to the horizon; `DLinear` is the linear baseline
(Zeng et al. 2023). RevIN (Kim et al. 2022) normalises each window per channel and undoes it on the forecast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.config import ForecastConfig, RunConfig
from titans.model import TitansModel

__all__ = ["DLinear", "Forecaster", "PatchForecaster", "build_forecaster", "error_sums"]

REVIN_EPS = 1e-5


class PatchForecaster(nn.Module):
    """Each channel's look-back cut into patches of `patch_len` steps, one token each, read by the backbone; a linear
    head maps the last token's hidden state (it has read the whole look-back) to the horizon."""

    def __init__(self, backbone: TitansModel, patch_len: int, horizon: int):
        super().__init__()
        self.backbone, self.patch_len = backbone, patch_len
        self.head = nn.Linear(backbone.config.dim, horizon)

    def forward(self, series: Tensor) -> Tensor:
        """series (N, lookback) -> (N, horizon)."""
        hidden, _ = self.backbone(series.unflatten(1, (-1, self.patch_len)))
        return self.head(hidden[:, -1])


class DLinear(nn.Module):
    """x = trend + remainder, the trend a centred moving average (edges repeated); each part mapped to the horizon by
    its own linear layer, shared by all channels."""

    def __init__(self, lookback: int, horizon: int, moving_average: int):
        super().__init__()
        self.kernel = moving_average
        self.trend, self.remainder = nn.Linear(lookback, horizon), nn.Linear(lookback, horizon)

    def forward(self, series: Tensor) -> Tensor:
        """series (N, lookback) -> (N, horizon)."""
        pad = self.kernel // 2
        padded = F.pad(series[:, None], (pad, pad), mode="replicate")
        trend = F.avg_pool1d(padded, self.kernel, stride=1)[:, 0]
        return self.trend(trend) + self.remainder(series - trend)


class Forecaster(nn.Module):
    """(B, lookback, C) -> (B, horizon, C): RevIN (optional) around a per-channel model of (N, lookback) -> (N,
    horizon)."""

    def __init__(self, per_channel: nn.Module, revin: bool):
        super().__init__()
        self.per_channel, self.revin = per_channel, revin

    def forward(self, window: Tensor) -> Tensor:
        if window.dim() != 3:
            raise ValueError(f"a window is (batch, lookback, channels), got shape {tuple(window.shape)}")
        if self.revin:
            mean = window.mean(1, keepdim=True)
            std = (window.var(1, keepdim=True, unbiased=False) + REVIN_EPS).sqrt()
            window = (window - mean) / std
        batch, _, channels = window.shape
        forecast = self.per_channel(window.transpose(1, 2).flatten(0, 1)).unflatten(0, (batch, channels))
        forecast = forecast.transpose(1, 2)
        return forecast * std + mean if self.revin else forecast


def build_forecaster(config: RunConfig) -> Forecaster:
    """The forecaster a run config describes (its `forecast` section, and `model` for the backbone)."""
    f: ForecastConfig = config.forecast
    if f.model == "dlinear":
        per_channel = DLinear(f.lookback, f.horizon, f.moving_average)
    else:
        per_channel = PatchForecaster(TitansModel(config.model, f.patch_len), f.patch_len, f.horizon)
    return Forecaster(per_channel, f.revin)


def error_sums(forecast: Tensor, target: Tensor) -> Tensor:
    """(sum of squared errors, sum of absolute errors, count), float64: MSE and MAE of many batches add up exactly."""
    error = (forecast - target).double()
    return torch.stack((error.square().sum(), error.abs().sum(), torch.tensor(error.numel(), dtype=torch.float64)))
