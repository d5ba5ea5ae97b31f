"""Run configuration: the sections of a run's YAML (model, data, optimizer, training, evaluation).

Each section is a plain dataclass read and checked by :mod:`titans.typed_yaml`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from titans.model import TitansConfig
from titans.typed_yaml import check

__all__ = ["DataConfig", "EvalConfig", "ForecastConfig", "OptimConfig", "RunConfig", "TrainConfig"]


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay (see :mod:`titans.optim`)."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; biases, norms, embeddings, 1-D parameters, persistent tokens and the
    memory's M_0 get none."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    min_lr_ratio: float = 0.1
    """The cosine decays to min_lr_ratio * lr at the last step."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    grad_accum: int = 1
    """Micro-batches whose gradients are accumulated per optimizer step."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0", self.lr)
        check(all(0 <= b < 1 for b in self.betas), "betas", "must lie in [0, 1)", self.betas)
        check(self.eps > 0, "eps", "must be > 0", self.eps)
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]", self.min_lr_ratio)
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null", self.grad_clip)
        check(self.grad_accum >= 1, "grad_accum", "must be >= 1", self.grad_accum)


@dataclasses.dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    """Optimizer steps to train for."""
    batch_size: int = 8
    """Sequences per micro-batch summed over all processes (each of N ranks gets batch_size / N)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    eval_every: int = 200
    """Evaluate every this many optimizer steps (0: only at the end)."""
    eval_batches: int = 8
    """Held-out batches per periodic evaluation."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept in the run directory; older ones are deleted."""
    seed: int = 0
    """Seed of the Python, NumPy and torch generators."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; fp16 also uses a gradient scaler. Falls back to fp32 where unsupported."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks CUDA when available."""
    compile: bool = False
    """Wrap the model in torch.compile, and compile the memory op's chunk step (the chunk loop itself stays eager): on
    CPU the small preset's variants train 1.3-1.8x faster after 0.5-3 minutes of compilation (benchmarks/NOTES.md)."""
    activation_checkpointing: bool = False
    """true: the memory recomputes every chunk in the backward pass (least memory); false: its automatic choice
    (`NeuralMemory(checkpoint_chunks="auto")`: groups of about sqrt(chunks) below chunk size 16, none above)."""
    tbptt_segments: int = 1
    """Split each sequence into this many segments fed in turn, carrying the memory state forward."""
    tbptt_horizon: int | None = None
    """Gradients flow back through at most this many segments (state detached between); null: all."""
    log_every: int = 10
    """Write training metrics every this many optimizer steps."""
    init_from: str | None = None
    """Fine-tuning: a checkpoint, or a run directory (its latest checkpoint), whose model weights this run starts
    from; the optimizer, schedule, data and step count start afresh. The model section must build the same shapes."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep_last", "tbptt_segments", "log_every"):
            check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("eval_every", "checkpoint_every"):
            check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        check(
            self.seq_len % self.tbptt_segments == 0,
            "seq_len",
            f"must be divisible by tbptt_segments={self.tbptt_segments}",
            self.seq_len,
        )
        check(self.tbptt_horizon is None or self.tbptt_horizon >= 1, "tbptt_horizon", "must be >= 1 or null",
               self.tbptt_horizon)


@dataclasses.dataclass
class DataConfig:
    """Where training and evaluation sequences come from."""

    task: Literal["copy", "pattern", "needle", "recall", "text", "forecast", "dna", "dna_coding"] = "copy"
    """A synthetic task (copy, pattern, needle, recall), real-text language modelling (text), time-series
    forecasting (forecast: the forecast section says which series and windows) or real DNA (dna: next k-mer;
    dna_coding: coding / non-coding windows; data.kwargs.k sets the k-mer length, 1 by default)."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the task's dataset."""
    data_dir: str | None = None
    """Directory of prepared data (text task); null: the default cache."""
    tokenizer: str = "byte"
    """Tokenizer: ``byte``, ``gpt2`` or the path of a saved tokenizer file (text task)."""
    sampling: Literal["windows", "documents"] = "windows"
    """Training sequences of the text task. windows: shuffled windows of train.seq_len tokens, each read from a fresh
    state. documents: every batch row reads a whole document in consecutive train.seq_len-token segments, one per
    optimizer step, with the model state carried from step to step (gradients stop at the step) and reset when the
    rows move on to new documents together (documents of similar length side by side; the shorter ones padded). Full
    attention (transformer) then keeps the keys of the whole document so far."""

    mix_tasks: list[str] = dataclasses.field(default_factory=list)
    """Prompted tasks mixed into text training: RULER's S-NIAH (niah_single_1, niah_single_2, niah_single_3) and
    BABILong (qa1-qa5, background from the corpus's train books). Their examples, train.seq_len tokens each (the
    prompt read, only the answer scored), replace data.mix_fraction of every training batch's rows, the tasks in
    turn; evaluation batches stay plain text. Empty: plain text only."""
    mix_fraction: float = 0.25
    """The share of each training batch's rows that data.mix_tasks fill (at least one row when tasks are set)."""
    mix_weighting: Literal["row", "token"] = "row"
    """How the mixed rows weigh in the training loss. row: a mixed row's answer positions share the weight of a whole
    text row (the training loss is then a weighted mean; evaluation is unweighted). token: every scored position
    weighs the same, so an answer of a few tokens weighs little against a text row's train.seq_len (in the tune stage
    of titans reproduce, 2% of the loss: the models never learned even the answers' form)."""

    def __post_init__(self) -> None:
        check(self.sampling == "windows" or self.task == "text", "sampling",
               f"must be windows unless data.task is text (it is {self.task})", self.sampling)
        check(0 < self.mix_fraction < 1, "mix_fraction", "must lie in (0, 1)", self.mix_fraction)
        if self.mix_tasks:
            from titans.data.prompted import MIX_TASKS

            unknown = [t for t in self.mix_tasks if t not in MIX_TASKS]
            check(not unknown, "mix_tasks", f"has unknown tasks {unknown}; choose from {list(MIX_TASKS)}",
                  self.mix_tasks)
            check(self.task == "text", "mix_tasks", f"mixes into text training only (data.task is {self.task})",
                  self.mix_tasks)
            check(self.sampling == "windows", "mix_tasks", "needs data.sampling windows (documents carry each row's "
                  "state from batch to batch)", self.mix_tasks)


@dataclasses.dataclass
class ForecastConfig:
    """Long-term forecasting (data.task forecast; paper Section 5.5): windows of a real multivariate series, each
    channel forecast on its own from its look-back (channel independence) between per-window normalisation (RevIN)."""

    series: str = "vic_elec"
    """A shipped series (vic_elec) or the path of a CSV: time stamp, then one numeric column per channel (ETT)."""
    lookback: int = 96
    """Past steps each forecast reads (the benchmarks' 96-720)."""
    horizon: int = 96
    """Future steps each forecast predicts (the benchmarks' 96, 192, 336, 720)."""
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Train / validation / test fractions of the series, in time order (ETT: 12 / 4 / 4 months)."""
    model: Literal["backbone", "dlinear"] = "backbone"
    """backbone: the model section's variant over patch tokens, a linear head on the last one; dlinear: the linear
    baseline (trend and remainder each mapped linearly to the horizon; the model section is unused)."""
    patch_len: int = 8
    """Steps per input token of the backbone (1: one token per step); must divide lookback."""
    revin: bool = True
    """Normalise each window per channel by its own mean and deviation, and undo it on the forecast (RevIN)."""
    moving_average: int = 25
    """DLinear's trend: a centred moving average over this many steps (odd)."""

    def __post_init__(self) -> None:
        for name in ("lookback", "horizon", "patch_len", "moving_average"):
            check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        check(self.lookback % self.patch_len == 0, "lookback", f"must be a multiple of patch_len={self.patch_len}",
              self.lookback)
        check(self.moving_average % 2 == 1, "moving_average", "must be odd (a centred average)", self.moving_average)
        check(all(f > 0 for f in self.split) and abs(sum(self.split) - 1) < 1e-6, "split",
              "must be three positive fractions summing to 1", self.split)


@dataclasses.dataclass
class EvalConfig:
    """Evaluation after training and by the eval / niah subcommands."""

    batch_size: int = 8
    """Sequences per evaluation batch."""
    samples: int = 64
    """Examples per task, context length or needle-grid cell."""
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    """Context lengths of accuracy-versus-length and the needle grid."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Needle depths as fractions of the context (0: start, 1: end)."""
    chunk_len: int = 1024
    """Long contexts stream through the model state in pieces of this many tokens."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "samples", "chunk_len"):
            check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        check(len(self.lengths) > 0 and all(n >= 1 for n in self.lengths), "lengths",
               "must be a non-empty list of positive ints", self.lengths)
        check(all(0 <= d <= 1 for d in self.depths), "depths", "must lie in [0, 1]", self.depths)


@dataclasses.dataclass
class RunConfig:
    """One run: model, data, optimizer, training loop and evaluation."""

    model: TitansConfig
    """The model."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Task or corpus, tokenizer."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Training loop."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Evaluation settings."""
    forecast: ForecastConfig = dataclasses.field(default_factory=ForecastConfig)
    """Series, windows and model of the forecast task (unused by the others)."""
    name: str = "run"
    """Run name, used for the run directory ``runs/<name>``: a plain directory name."""

    def __post_init__(self) -> None:
        plain = self.name.strip() == self.name != "" and self.name not in (".", "..") and not any(
            c in self.name for c in "/\\\0")
        check(plain, "name", "must be a plain directory name (not empty, no path separators, not '.' or '..')",
               self.name)
