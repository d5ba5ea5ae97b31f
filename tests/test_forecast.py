"""Forecasting (paper Section 5.5): the real series, leakage-free time splits, the windows, DLinear and RevIN, MSE /
MAE against hand-computed values, and `titans train` / `titans eval` on a tiny run (exact resume, plot, errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from titans.cli import main
from titans.config import RunConfig
from titans.data.timeseries import Series, load_series, split_series
from titans.fileio import save_yaml
from titans.forecast import DLinear, Forecaster, build_forecaster, error_sums
from titans.forecasting import forecast_scores
from titans.typed_yaml import ConfigError, from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "forecast"


def ramp_series(length=100, channels=2) -> Series:
    values = np.arange(length * channels, dtype=np.float32).reshape(length, channels)
    return Series("ramp", [str(t) for t in range(length)], tuple(f"c{i}" for i in range(channels)), values)


def test_the_shipped_series_is_real_and_whole():
    series = load_series("vic_elec")
    assert series.channels == ("Demand", "Temperature") and series.values.shape == (52602, 2)
    assert series.times[0] == "2012-01-01 00:00:00" and series.times[-1] == "2014-12-31 23:30:00"
    assert 2000 < series.values[:, 0].min() < series.values[:, 0].max() < 10000  # MW


def test_splits_are_in_time_order_and_leak_nothing():
    data = split_series(ramp_series(100), (0.6, 0.2, 0.2))
    assert data.bounds == {"train": (0, 60), "validation": (60, 80), "test": (80, 100)}
    lookback, horizon = 8, 4
    for split, (start, end) in data.bounds.items():
        windows = data.windows(split, lookback, horizon)
        first_target, stop = windows.target_range()
        assert start <= first_target and stop == end  # every target in the split, up to its last step
        inputs, targets = windows.batch(torch.arange(len(windows)))
        standard_time = (targets[..., 0] * data.std[0] + data.mean[0]) / 2  # channel 0 holds 2 * t
        assert standard_time.min() >= start - 1e-3 and standard_time.max() <= end - 1 + 1e-3
        assert inputs.shape == (len(windows), lookback, 2) and targets.shape == (len(windows), horizon, 2)
    # the look-back of the first validation window reaches back into training, never forward
    inputs, targets = data.windows("validation", lookback, horizon).batch(torch.tensor([0]))
    assert torch.allclose(inputs[0, -1] + torch.from_numpy(1 / data.std * 2 * 1), targets[0, 0], atol=1e-5)
    # standardised with the training period only: changing the test period changes no statistic
    changed = ramp_series(100)
    changed.values[80:] = 1e6
    other = split_series(changed, (0.6, 0.2, 0.2))
    assert np.array_equal(other.mean, data.mean) and np.array_equal(other.std, data.std)
    assert np.allclose(data.mean, [59, 60]) and np.allclose(data.values[:60].mean(0), 0, atol=1e-5)


def test_too_short_a_split_names_the_keys():
    with pytest.raises(ValueError, match="forecast.lookback or forecast.horizon"):
        split_series(ramp_series(100), (0.6, 0.2, 0.2)).windows("test", 16, 21)  # 20 test steps


class LastValue(torch.nn.Module):
    """The naive forecast: the last input repeated over a horizon of 2."""

    def forward(self, window):
        return window[:, -1:].expand(-1, 2, -1)


def test_mse_and_mae_against_hand_computed_values():
    forecast = torch.tensor([[[1.0], [2.0]], [[0.0], [-1.0]]])
    target = torch.tensor([[[0.0], [4.0]], [[0.0], [2.0]]])  # errors 1, -2, 0, -3
    assert error_sums(forecast, target).tolist() == [14.0, 6.0, 4.0]
    data = split_series(ramp_series(40, 1), (0.5, 0.25, 0.25))
    windows = data.windows("test", 4, 2)
    scores = forecast_scores(LastValue(), windows, torch.arange(len(windows)), 3, torch.device("cpu"))
    step = 1 / data.std[0]  # the ramp rises by one (standardised: 1 / std) per step: errors step, 2 * step
    assert scores["windows"] == len(windows) == 9  # targets 30..39: windows starting at 26..34
    assert scores["mse"] == pytest.approx((step**2 + 4 * step**2) / 2) and scores["mae"] == pytest.approx(1.5 * step)


def test_dlinear_decomposes_by_a_centred_moving_average():
    model = DLinear(lookback=4, horizon=4, moving_average=3)
    with torch.no_grad():
        model.trend.weight.copy_(torch.eye(4))
        model.remainder.weight.zero_()
        model.trend.bias.zero_()
        model.remainder.bias.zero_()
    trend = model(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))  # edges repeated: (1 1 2) (1 2 3) (2 3 6) (3 6 6)
    assert torch.allclose(trend, torch.tensor([[4 / 3, 2.0, 11 / 3, 5.0]]))


@pytest.mark.parametrize("kind", ["dlinear", "backbone"])
def test_revin_makes_forecasts_follow_the_windows_level_and_scale(kind):
    config = from_dict(RunConfig, {"model": dict(variant="lmm", dim=16, layers=1, heads=2, chunk_size=2),
                                   "data": {"task": "forecast"},
                                   "forecast": dict(lookback=16, horizon=4, patch_len=4, model=kind)})
    torch.manual_seed(0)
    model = build_forecaster(config).double()
    window = torch.randn(3, 16, 2, dtype=torch.float64)
    forecast = model(window)
    assert forecast.shape == (3, 4, 2)
    assert torch.allclose(model(5 * window + 7), 5 * forecast + 7, atol=1e-3)
    plain = Forecaster(model.per_channel, revin=False)  # channels are independent: each one's forecast is its own
    swapped = plain(window.flip(-1))
    assert torch.allclose(swapped, plain(window).flip(-1))


def tiny_config(tmp_path, **forecast) -> Path:
    rows = ["date,a,b"] + [f"t{t},{np.sin(t / 3):.5f},{np.cos(t / 5) + t / 100:.5f}" for t in range(240)]
    csv = tmp_path / "tiny.csv"
    csv.write_text("\n".join(rows) + "\n")
    config = {"name": "tiny-forecast",
              "model": dict(variant="mac", dim=16, layers=1, heads=2, window=4, segment_len=4, chunk_size=2,
                            num_persistent=1),
              "data": {"task": "forecast"},
              "forecast": {"series": str(csv), "lookback": 16, "horizon": 8, "patch_len": 4, **forecast},
              "optim": {"lr": 1e-2, "warmup_steps": 2},
              "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3,
                        "log_every": 1, "device": "cpu"},
              "eval": {"batch_size": 16}}
    path = tmp_path / "tiny.yaml"
    save_yaml(from_dict(RunConfig, config), path)
    return path


def test_train_resume_and_eval_on_the_command_line(tmp_path, capsys):
    config = tiny_config(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", str(config), "--run-dir", str(whole), "--no-progress"]) == 0
    assert main(["train", str(config), "--run-dir", str(parts), "--no-progress", "--stop-at", "3"]) == 0
    assert main(["train", "--resume", str(parts), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "final train MSE" in out and "resumed from step 3" in out
    read = lambda run: (run / "checkpoints" / "ckpt-000006" / "model.safetensors").read_bytes()  # noqa: E731
    assert read(whole) == read(parts)  # resuming is exact
    assert main(["eval", str(whole)]) == 0
    out = capsys.readouterr().out
    assert "tiny test split, 41 windows" in out and "MSE" in out and "MAE" in out
    result = json.loads((whole / "eval" / "forecast_test.json").read_text())
    assert result["windows"] == 41 and result["mse"] > 0 and (whole / "eval" / "forecast_test.png").stat().st_size
    assert main(["generate", str(whole), "--prompt", "1 2"]) == 2
    assert "is a forecast run" in capsys.readouterr().err
    assert main(["params", str(config)]) == 0
    assert "forecast.model backbone" in capsys.readouterr().out


def test_bad_forecast_settings_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"'forecast.lookback' must be a multiple of patch_len=8"):
        from_dict(RunConfig, {"model": {}, "forecast": {"lookback": 20}})
    with pytest.raises(ConfigError, match=r"'forecast.split' must be three positive fractions"):
        from_dict(RunConfig, {"model": {}, "forecast": {"split": [0.5, 0.5, 0.5]}})
    config = tiny_config(tmp_path, series=str(tmp_path / "missing.csv"))
    assert main(["train", str(config), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown series" in err and "forecast.series" in err and "\n" not in err


def test_the_shipped_config_loads():
    from titans.cli import load_config

    config = load_config(CONFIGS / "vic_elec.yaml")
    assert config.data.task == "forecast" and config.forecast.series == "vic_elec"
