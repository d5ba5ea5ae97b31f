"""Training and evaluation of a forecast run (data.task forecast; paper Section 5.5, Table 3).

Training draws ``train.batch_size`` random windows of the training split per step (the draw of step k depends on
``train.seed`` and k alone, so a resumed run draws what the uninterrupted one would) and minimises the MSE of the
standardised forecast; validation and test scores are the MSE and MAE over the windows of the split, in the units of
the training split's standardisation, as the benchmarks report them. The run directory is a training run's (config,
metrics, safetensors checkpoints, loss plot, summary).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from titans.checkpoint import atomic_write, latest_checkpoint, load_checkpoint, save_checkpoint
from titans.config import RunConfig
from titans.data.timeseries import SplitSeries, Windows, load_series, split_series
from titans.evaluate import LoadedRun
from titans.fileio import save_yaml
from titans.forecast import build_forecaster, error_sums
from titans.metrics import MetricsLogger, read_metrics
from titans.optim import build_optimizer, build_scheduler
from titans.plots import plot_forecasts, plot_loss_curves
from titans.runtime import choose_device, is_distributed, seed_everything
from titans.train import LOSS_PLOT, SUMMARY_FILE, TrainingError, check_run_dir, lock_run_dir
from titans.typed_yaml import ConfigError, to_dict

__all__ = ["eval_forecast", "forecast_scores", "load_split_series", "train_forecast"]

PLOTTED_WINDOWS = 4  # test windows drawn by eval_forecast, spread over the split


def load_split_series(config: RunConfig) -> SplitSeries:
    """The run's series, split and standardised (its `forecast` section)."""
    return split_series(load_series(config.forecast.series), config.forecast.split)


def forecast_scores(model: nn.Module, windows: Windows, indices: Tensor, batch_size: int,
                    device: torch.device) -> dict[str, float]:
    """MSE and MAE of the model's forecasts of the windows ``indices`` (every channel and step weighs the same)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for inputs, targets in windows.batches(indices, batch_size):
            sums += error_sums(model(inputs.to(device)).cpu(), targets)
    model.train(was_training)
    return {"mse": float(sums[0] / sums[2]), "mae": float(sums[1] / sums[2]), "windows": len(indices)}


def train_forecast(config: RunConfig, run_dir: Path, resume: bool = False, *, stop_at: int | None = None,
                   progress: bool = True) -> dict:
    """Train the forecaster of ``config`` into ``run_dir`` (see :func:`titans.train.train`); returns the summary."""
    if is_distributed():
        raise ConfigError("data.task forecast trains in one process: run titans train without torchrun")
    cfg = config.train
    device = choose_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_split_series(config)
    lookback, horizon = config.forecast.lookback, config.forecast.horizon
    train_windows, val_windows = data.windows("train", lookback, horizon), data.windows("validation", lookback, horizon)
    model = build_forecaster(config).to(device)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, cfg.steps)
    val_indices = val_windows.evenly(cfg.eval_batches * config.eval.batch_size)
    with lock_run_dir(run_dir, resume):
        saved = check_run_dir(run_dir, config, resume)
        if not saved.exists():
            save_yaml(config, saved)
        step, last_eval, checkpoint = 0, {}, latest_checkpoint(run_dir) if resume else None
        if checkpoint is not None:
            step = load_checkpoint(checkpoint, model, optimizer, scheduler, restore_rng=True)["step"]
        resumed_from = step if checkpoint is not None else None
        logger = MetricsLogger(run_dir)
        logger.truncate(step)
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=step, desc=config.name, unit="step", disable=not progress)
        started, window = time.perf_counter(), []
        model.train()
        try:
            while step < end:
                draw = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                inputs, targets = train_windows.batch(torch.randint(len(train_windows), (cfg.batch_size,),
                                                                    generator=draw))
                loss = F.mse_loss(model(inputs.to(device)), targets.to(device))
                if not math.isfinite(loss.item()):
                    where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint yet"
                    raise TrainingError(f"non-finite loss ({loss.item()}) at step {step + 1}; training stopped, "
                                        f"{where}")
                loss.backward()
                clip = config.optim.grad_clip
                grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.append(loss.item())
                bar.update(1)
                bar.set_postfix(mse=f"{loss.item():.4f}")
                if step % cfg.log_every == 0 or step == cfg.steps:
                    logger.log({"train/loss": sum(window) / len(window), "train/lr": lr, "train/grad_norm": grad_norm},
                               step=step)
                    window = []
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    scores = forecast_scores(model, val_windows, val_indices, config.eval.batch_size, device)
                    last_eval = {"eval/loss": scores["mse"], "eval/mae": scores["mae"]}
                    logger.log(last_eval, step=step)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end:
                    checkpoint = save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                                 {"config": to_dict(config)}, keep_last=cfg.keep_last)
        finally:
            bar.close()
            logger.close()
        metrics = read_metrics(run_dir)
        if any("train/loss" in r for r in metrics):
            plot_loss_curves(metrics, run_dir / LOSS_PLOT)
        train_loss = [r["train/loss"] for r in metrics if "train/loss" in r]
        summary = {"run_dir": str(run_dir), "step": step, "resumed_from": resumed_from,
                   "train_loss": train_loss[-1] if train_loss else None, "chance_loss": None, "eval": last_eval,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "elapsed_s": time.perf_counter() - started, "checkpoint": str(checkpoint) if checkpoint else None}
        atomic_write(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1).encode("utf-8"))
    return summary


def eval_forecast(run: LoadedRun, out: Path, split: str = "test") -> dict:
    """MSE and MAE of a loaded forecast run (:func:`titans.evaluate.load_run`) over every window of ``split``;
    writes ``forecast_<split>.json`` and ``forecast_<split>.png`` (forecasts against the truth) into ``out``."""
    config = run.config
    data = load_split_series(config)
    windows = data.windows(split, config.forecast.lookback, config.forecast.horizon)
    scores = forecast_scores(run.model, windows, torch.arange(len(windows)), config.eval.batch_size, run.device)
    result = {"run": run.name, "series": data.series.name, "split": split, "lookback": config.forecast.lookback,
              "horizon": config.forecast.horizon, "model": config.forecast.model,
              "variant": None if config.forecast.model == "dlinear" else config.model.variant,
              "parameters": sum(p.numel() for p in run.model.parameters()), **scores}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"forecast_{split}.json", (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    shown = windows.evenly(PLOTTED_WINDOWS)
    inputs, targets = windows.batch(shown)
    with torch.no_grad():
        forecasts = run.model(inputs.to(run.device)).cpu()
    starts = [int(windows.first + i) for i in shown]
    plot_forecasts(inputs, targets, forecasts, data.series.channels, [data.series.times[s] for s in starts],
                   out / f"forecast_{split}.png", title=f"{run.name}: {data.series.name} {split}, "
                                                        f"MSE {scores['mse']:.4f}, MAE {scores['mae']:.4f}")
    return result
