"""The training loop of a run: ``train(config, run_dir)``.

AdamW with warmup and cosine decay, gradient clipping and accumulation, autocast (bf16/fp16) where the device
supports it, and truncated backpropagation through time over the memory state: each sequence is fed in
``tbptt_segments`` segments that carry the model state forward, and gradients are cut every ``tbptt_horizon``
segments. With ``data.sampling: documents`` the rows of a batch are segments of whole documents and the state is
carried on from one optimizer step to the next (detached) until the rows start new documents; it is saved in every
checkpoint, so resuming stays exact. Under ``torchrun`` the model is wrapped in DistributedDataParallel, every rank
trains on its rows of the global batch and rank 0 alone writes the run directory::

    run_dir/config.yaml          the resolved config
    run_dir/metrics.jsonl, .csv  training and evaluation metrics
    run_dir/checkpoints/         model, optimizer, scheduler, RNG and data position (keep-last-N)
    run_dir/loss.png             loss curves
    run_dir/summary.json         the final numbers
    run_dir/.lock                held (flock) by the one process writing the run: a second writer is refused

Resuming from the latest checkpoint is exact: on CPU a run that was interrupted and resumed ends with bitwise the
same weights and loss curve as the run left alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from titans.batches import Batch, make_batches
from titans.checkpoint import (
    CheckpointError,
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    non_finite_tensors,
    save_checkpoint,
)
from titans.config import RunConfig
from titans.fileio import exclusive_lock, save_yaml
from titans.metrics import MetricsLogger, read_metrics
from titans.model import TitansLM, TitansState, stream
from titans.optim import build_optimizer, build_scheduler
from titans.plots import plot_loss_curves
from titans.runtime import (
    DistInfo,
    all_gather_cat,
    all_reduce_sum,
    autocast_for,
    barrier,
    cleanup,
    init_distributed,
    is_distributed,
    seed_everything,
)
from titans.scoring import Scores, masked_loss_sum, score_batch
from titans.state import map_tensors, pack_state, unpack_state
from titans.typed_yaml import ConfigError, load_yaml, to_dict

__all__ = ["TrainingError", "SegmentLoss", "check_run_dir", "lock_run_dir", "train", "CONFIG_FILE", "SUMMARY_FILE",
           "LOCK_FILE", "LOSS_PLOT"]

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"


class TrainingError(RuntimeError):
    """Training stopped: non-finite loss or gradients."""


class SegmentLoss(nn.Module):
    """Feeds a window of a batch through the LM in TBPTT segments of ``piece_len`` tokens (:func:`stream`) and
    returns the summed masked cross-entropy and the state after the window. One forward of this module is followed
    by one backward, which is what DDP expects."""

    def __init__(self, model: nn.Module, piece_len: int):
        super().__init__()
        self.model, self.piece_len = model, piece_len

    def forward(self, inputs: Tensor, targets: Tensor, loss_mask: Tensor, state: TitansState | None = None,
                loss_weight: Tensor | None = None) -> tuple[Tensor, TitansState]:
        total = inputs.new_zeros((), dtype=torch.float32)
        for positions, logits, state in stream(self.model, inputs, self.piece_len, state):
            total = total + masked_loss_sum(logits, targets[:, positions], loss_mask[:, positions],
                                            None if loss_weight is None else loss_weight[:, positions])
        return total, state


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _config_differences(a[key], b[key], path + ".")
        elif a.get(key) != b.get(key):
            keys.append(f"{path} ({a.get(key)!r} in the run, {b.get(key)!r} now)")
    return keys


def check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> Path:
    """The path of the run's config file, once the run directory fits: a new run needs a directory without a run, a
    resumed one the run's own config (an exact resume)."""
    saved = run_dir / CONFIG_FILE
    if not resume:
        if saved.exists():
            raise FileExistsError(f"{run_dir} already holds a run; resume it (--resume {run_dir}) or "
                                  f"choose another run directory")
    else:
        if not saved.exists():
            raise FileNotFoundError(f"{saved}: no run to resume in {run_dir}")
        differences = _config_differences(to_dict(load_yaml(saved, RunConfig)), to_dict(config))
        if differences:
            raise ConfigError(f"the config differs from the run's at {', '.join(differences)}; an exact resume "
                              f"needs the same config (start a new run to change it)")
    return saved


def lock_run_dir(run_dir: Path, resume: bool) -> contextlib.AbstractContextManager:
    """The run directory's lock (created with the directory): one writer per run."""
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no run to resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(run_dir / LOCK_FILE, f"{run_dir} is in use by another titans process (a "
                                               "train or --resume still running); wait for it to end")


class _Trainer:
    def __init__(self, config: RunConfig, run_dir: Path, info: DistInfo, progress: bool):
        self.config, self.run_dir, self.info, self.progress = config, run_dir, info, progress
        train_cfg = config.train
        self.autocast, self.precision = autocast_for(info.device, train_cfg.precision)
        seed_everything(train_cfg.seed)
        self.model = TitansLM(config.model).to(info.device)
        if train_cfg.activation_checkpointing:  # the memory recomputes each chunk in the backward pass
            self.model.set_activation_checkpointing(True)
        forward: nn.Module = SegmentLoss(self.model, train_cfg.seq_len // train_cfg.tbptt_segments)
        if train_cfg.compile:  # the memory scan is not traced: its chunk step is compiled instead
            self.model.set_compile_chunks(True)
            forward.model = torch.compile(self.model)  # self.model stays uncompiled: its state_dict keys are saved
        # a carried state holds what M_0 and the persistent tokens gave at the documents' start: no gradient reaches
        # them while the rows continue their documents
        self.forward = DistributedDataParallel(
            forward, find_unused_parameters=config.data.sampling == "documents") if info.world_size > 1 else forward
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, train_cfg.steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.batches = make_batches(config, "train", rank=info.rank, world_size=info.world_size)
        make_batches(config, "eval", rank=info.rank, world_size=info.world_size)  # fail now, not at the first eval
        self.step = 0
        # data.sampling documents: each micro-batch's state after the previous step, carried on unless fresh
        self.carried: list[TitansState | None] = [None] * config.optim.grad_accum
        self.window = {"loss_sum": 0.0, "steps": 0}  # training loss since the last log
        self.tokens = 0
        self.last_checkpoint: Path | None = None
        self.last_eval: dict = {}
        self.losses: list[float] = []  # this session's first losses, for the check at the end of warm-up

    # -------------------------------------------------------------------------------------- run directory
    def _say(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message)

    def _prepare_run_dir(self, resume: bool) -> Path | None:
        """Checks and writes the run directory; returns the checkpoint to resume from (None: start afresh)."""
        saved = check_run_dir(self.run_dir, self.config, resume)
        barrier()  # every rank has checked before rank 0 writes
        if self.info.is_main and not saved.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.config, saved)
            if self.config.data.task == "text":
                tokenizer = self.batches.stream.tokenizer_path
                if tokenizer is not None and tokenizer.is_file():
                    shutil.copyfile(tokenizer, self.run_dir / "tokenizer.json")
        return latest_checkpoint(self.run_dir) if resume else None

    def _restore(self, path: Path) -> None:
        loaded = load_checkpoint(path, self.model, self.optimizer, self.scheduler, restore_rng=True)
        extra = loaded["extra"]
        missing = [k for k in ("data", "window", "tokens") if not isinstance(extra, dict) or k not in extra]
        if missing:
            raise CheckpointError(f"{loaded['path']}: not a checkpoint of this trainer (no {', '.join(missing)})")
        self.step = loaded["step"]
        self.batches.load_state_dict(extra["data"])
        self.window, self.tokens = dict(extra["window"]), int(extra["tokens"])
        if self.config.data.sampling == "documents":
            if not isinstance(extra.get("carried"), list) or len(extra["carried"]) != len(self.carried):
                raise CheckpointError(f"{loaded['path']}: no carried state of each micro-batch in this checkpoint")
            self.carried = [None if packed is None else self._my_rows(unpack_state(packed, self.info.device))
                            for packed in extra["carried"]]
        if self.scaler is not None and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        self.last_checkpoint = loaded["path"]
        self._say(f"resumed {self.run_dir} from step {self.step} ({loaded['path'].name})")

    def _initialise_from(self, source: Path) -> None:
        """train.init_from: the model weights of another run's checkpoint (fine-tuning), nothing else of it."""
        try:
            loaded = load_checkpoint(source, self.model, restore_rng=False)
        except (CheckpointError, FileNotFoundError) as exc:
            raise ConfigError(f"'train.init_from': {str(exc).splitlines()[0]}") from None
        self._say(f"initialised the model from {loaded['path']} (step {loaded['step']})")

    def _where(self) -> str:
        return f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"

    def _save(self) -> None:
        bad = non_finite_tensors(self.model.state_dict())  # every rank holds the same weights: all stop together
        if bad:
            raise TrainingError(f"non-finite weights ({', '.join(bad[:3])}) after step {self.step}; training "
                                f"stopped without saving them, {self._where()}")
        carried = None
        if self.config.data.sampling == "documents":  # every rank's rows: the state of the global batch
            carried = [None if state is None else pack_state(self._all_rows(state)) for state in self.carried]
        if self.info.is_main:
            extra = {"config": to_dict(self.config), "data": self.batches.state_dict(), "window": self.window,
                     "tokens": self.tokens, "scaler": None if self.scaler is None else self.scaler.state_dict(),
                     "carried": carried}
            self.last_checkpoint = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                                                   self.scheduler, extra, keep_last=self.config.train.keep_last)
        barrier()

    def _all_rows(self, state: TitansState) -> TitansState:
        """The state of the global batch from every rank's (the batch dimension comes first in every tensor)."""
        return TitansState(map_tensors(list(state.layers), all_gather_cat), state.position, state.variant, state.dim)

    def _my_rows(self, state: TitansState) -> TitansState:
        """This rank's rows of a state of the global batch."""
        rank, world_size = self.info.rank, self.info.world_size
        return TitansState(map_tensors(list(state.layers), lambda t: t.chunk(world_size)[rank].clone()),
                           state.position, state.variant, state.dim)

    # -------------------------------------------------------------------------------------- one step
    def _backward(self, micro_batches: list[Batch], scale: float) -> Tensor:
        """Forward and backward every window of every micro-batch; the gradient is that of the global mean loss.
        Returns this rank's summed loss. Gradients are synchronised across ranks in the last backward only."""
        cfg = self.config.train
        horizon_len = cfg.seq_len // cfg.tbptt_segments * (cfg.tbptt_horizon or cfg.tbptt_segments)
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for i, batch in enumerate(micro_batches):
            state = None if batch.fresh else self.carried[i]
            for start in range(0, cfg.seq_len, horizon_len):
                last = i == len(micro_batches) - 1 and start + horizon_len >= cfg.seq_len
                piece = slice(start, start + horizon_len)
                sync = contextlib.nullcontext() if last or self.info.world_size == 1 else self.forward.no_sync()
                with sync:
                    with self.autocast():
                        loss, state = self.forward(batch.inputs[:, piece], batch.targets[:, piece],
                                                   batch.loss_mask[:, piece], state,
                                                   None if batch.loss_weight is None else batch.loss_weight[:, piece])
                    scaled = loss * scale
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                total += loss.detach()
                state = state.detach()  # truncated BPTT: no gradient beyond this window
            if self.config.data.sampling == "documents":
                self.carried[i] = state
        return total

    def _train_step(self) -> tuple[float, float, float, int]:
        """One optimizer step; returns the mean loss, gradient norm, learning rate and tokens of the global batch."""
        micro = [next(self.batches).to(self.info.device) for _ in range(self.config.optim.grad_accum)]
        count = float(all_reduce_sum(torch.tensor(float(sum(b.total_weight for b in micro)), device=self.info.device)))
        if count == 0:
            raise TrainingError(f"step {self.step + 1}: the batch has no scored position")
        # DDP averages gradients over ranks: scale by world_size / count for the gradient of the global mean
        loss_sum = float(all_reduce_sum(self._backward(micro, self.info.world_size / count)))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip is not None else math.inf))
        loss = loss_sum / count
        step = self.step + 1
        where = self._where()
        if not math.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss}) at step {step}; training stopped, {where}")
        if self.scaler is None and not math.isfinite(grad_norm):
            raise TrainingError(f"non-finite gradient norm ({grad_norm}) at step {step}; training stopped, {where}")
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b.inputs.numel() for b in micro) * self.info.world_size
        return loss, grad_norm, lr, tokens

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on ``train.eval_batches`` held-out batches (the same ones every time)."""
        cfg = self.config.train
        source = make_batches(self.config, "eval", rank=self.info.rank, world_size=self.info.world_size)
        self.model.eval()
        scores = Scores()
        for _ in range(cfg.eval_batches):
            scores += score_batch(self.model, next(source).to(self.info.device),
                                  cfg.seq_len // cfg.tbptt_segments, self.autocast)
        self.model.train()
        scores = Scores.from_tensor(all_reduce_sum(scores.to_tensor(self.info.device)))
        result = {"eval/loss": scores.loss, "eval/accuracy": scores.accuracy}
        if self.config.data.task != "text":
            result["eval/sequence_accuracy"] = scores.sequence_accuracy
        self.last_eval = result
        return result

    def _check_progress(self, loss: float) -> None:
        """Warn once when the loss has not fallen from its initial value by the end of warm-up (of 10 steps or more):
        a learning rate far too high or too low sits there, and the run would otherwise end quietly. Not when fine-tuning
        (train.init_from): a trained model's loss has little left to fall."""
        check_at = self.config.optim.warmup_steps
        if check_at < 10 or self.step > check_at or len(self.losses) >= check_at or self.config.train.init_from:
            return
        self.losses.append(loss)
        if self.step != check_at or len(self.losses) != check_at:  # only when this session started at step 0
            return
        half = max(1, check_at // 2)  # means over several steps: single batches are noisy
        first, last = self.losses[:half], self.losses[-half:]
        initial, recent = statistics.fmean(first), statistics.fmean(last)
        noise = 2 * math.sqrt((statistics.pvariance(first) + statistics.pvariance(last)) / half)  # ~2 standard errors
        if initial - recent < max(0.01 * initial, noise):  # not fallen by more than batch-to-batch noise
            self._say(f"warning: the training loss has not fallen from its initial value by step {check_at} (end of "
                      f"warm-up): {recent:.4f} "
                      f"over the last {half} steps against {initial:.4f} over the first {half} (chance "
                      f"{self._chance_loss():.4f}); the learning rate (optim.lr={self.config.optim.lr:g}) may be "
                      "too high or too low")

    def _chance_loss(self) -> float:
        """The loss of a uniform guess over the vocabulary."""
        return math.log(self.config.model.vocab_size)

    # -------------------------------------------------------------------------------------- the loop
    def _lock(self, resume: bool) -> contextlib.AbstractContextManager:
        """One writer per run directory: rank 0 holds its lock from the first check to the summary."""
        return lock_run_dir(self.run_dir, resume) if self.info.is_main else contextlib.nullcontext()

    def run(self, resume: bool, stop_at: int | None) -> dict:
        with self._lock(resume):
            return self._run(resume, stop_at)

    def _run(self, resume: bool, stop_at: int | None) -> dict:
        cfg = self.config.train
        start_checkpoint = self._prepare_run_dir(resume)
        if start_checkpoint is not None:
            self._restore(start_checkpoint)
        else:
            if resume:
                self._say(f"{self.run_dir} has no checkpoint yet: starting from step 0")
            if cfg.init_from is not None:
                self._initialise_from(Path(cfg.init_from))
        resumed_from = self.step if start_checkpoint is not None else None
        logger = MetricsLogger(self.run_dir, enabled=self.info.is_main)
        logger.truncate(self.step)  # records after the checkpoint are logged again
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.config.name, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.info.is_main))
        started, window_started, window_tokens = time.perf_counter(), time.perf_counter(), 0
        self.model.train()
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        try:
            while self.step < end:
                loss, grad_norm, lr, tokens = self._train_step()
                self.step += 1
                self._check_progress(loss)
                self.tokens += tokens
                window_tokens += tokens
                self.window = {"loss_sum": self.window["loss_sum"] + loss, "steps": self.window["steps"] + 1}
                elapsed = time.perf_counter() - window_started
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{window_tokens / max(elapsed, 1e-9):,.0f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logger.log({"train/loss": self.window["loss_sum"] / self.window["steps"],
                                "train/lr": lr, "train/grad_norm": grad_norm,
                                "train/tokens": self.tokens,
                                "train/tokens_per_s": window_tokens / max(elapsed, 1e-9)}, step=self.step)
                    self.window = {"loss_sum": 0.0, "steps": 0}
                    window_started, window_tokens = time.perf_counter(), 0
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
                    result = self.evaluate()
                    logger.log(result, step=self.step)
                    self._say(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == end:
                    self._save()
        finally:
            bar.close()
            logger.close()
        if not self.last_eval and resumed_from == cfg.steps:
            self.last_eval = self.evaluate()  # resumed a finished run: report its final evaluation
        summary = {"run_dir": str(self.run_dir), "step": self.step, "resumed_from": resumed_from,
                   "train_loss": _last(read_metrics(self.run_dir), "train/loss") if self.info.is_main else None,
                   "chance_loss": self._chance_loss(),
                   "eval": self.last_eval, "tokens": self.tokens, "elapsed_s": time.perf_counter() - started,
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                   "precision": self.precision, "world_size": self.info.world_size}
        if self.info.is_main:
            metrics = read_metrics(self.run_dir)
            if any("train/loss" in r for r in metrics):
                plot_loss_curves(metrics, self.run_dir / LOSS_PLOT)
            atomic_write(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=1).encode("utf-8"))
        barrier()
        return summary


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, *, stop_at: int | None = None,
          progress: bool = True) -> dict:
    """Train ``config`` into ``run_dir`` (resuming its latest checkpoint when ``resume``); returns the summary.

    ``stop_at`` ends this session after that step with a checkpoint (to fit a time slot); resume it later.
    A forecast run (``data.task: forecast``) trains in :func:`titans.forecasting.train_forecast`.
    Under ``torchrun`` this joins the process group, trains with DDP and leaves the group at the end.
    Raises :class:`~titans.typed_yaml.ConfigError` for an unusable config or run directory and
    :class:`TrainingError` when the loss or the gradients stop being finite.
    """
    if config.data.task == "forecast":  # its own loop: windows of a series, no tokens, no carried state
        from titans.forecasting import train_forecast

        return train_forecast(config, Path(run_dir), resume, stop_at=stop_at, progress=progress)
    joined = not is_distributed()
    info = init_distributed(config.train.device)
    trainer = None
    try:
        trainer = _Trainer(config, Path(run_dir), info, progress)
        return trainer.run(resume, stop_at)
    finally:
        del trainer  # the DDP reducer must be gone before its process group (gloo aborts at exit otherwise)
        if joined:
            cleanup()
