"""Batches for training and evaluation, built from a run config: a synthetic task, real DNA or real text.

Every source yields :class:`Batch` objects (inputs, targets, loss mask, whether the rows start afresh or continue
the previous batch's) and saves its position with
``state_dict()`` for exact resume. Under DDP every rank builds the same *global* batch and keeps its own
contiguous rows, so N processes see exactly the data of one process with the same global batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from titans.config import RunConfig
from titans.data.dna import DNA_TASKS
from titans.data.loader import IGNORE_INDEX, DocumentSegments, RandomWindows, TokenStream
from titans.data.synthetic import SyntheticDataset, SyntheticTask, make_task
from titans.typed_yaml import ConfigError

__all__ = ["Batch", "SyntheticBatches", "TextBatches", "DocumentBatches", "MixedBatches", "make_batches",
           "make_task_from_config", "text_tokenizer_name", "EVAL_SEED_OFFSET"]

EVAL_SEED_OFFSET = 2**32  # held-out synthetic examples use seed + this: disjoint from every training seed
_ENDLESS = 2**62  # synthetic datasets are indexed, not enumerated: "as many examples as needed"


@dataclass
class Batch:
    """``inputs``, ``targets`` (B, T) int64 and ``loss_mask`` (B, T) bool: the positions that are scored.
    ``fresh``: the rows start new sequences (read them from a fresh state); False: they continue the rows of the
    previous batch of their source (carry its state on). ``loss_weight`` (B, T) float: each position's weight in the
    training loss (zero where not scored); None: one for every scored position."""

    inputs: Tensor
    targets: Tensor
    loss_mask: Tensor
    fresh: bool = True
    loss_weight: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device), self.fresh,
                     None if self.loss_weight is None else self.loss_weight.to(device))

    def rows(self, rank: int, world_size: int) -> Batch:
        """This rank's contiguous share of the rows."""
        per_rank = self.inputs.shape[0] // world_size
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        return Batch(self.inputs[part], self.targets[part], self.loss_mask[part], self.fresh,
                     None if self.loss_weight is None else self.loss_weight[part])

    @property
    def scored(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def total_weight(self) -> float:
        """The training loss's denominator: the sum of ``loss_weight``, or the number of scored positions."""
        return self.scored if self.loss_weight is None else float(self.loss_weight.sum())


def _per_rank(batch_size: int, world_size: int, key: str) -> None:
    if batch_size % world_size:
        raise ConfigError(f"'{key}' ({batch_size}) must be divisible by the number of processes ({world_size})")


class SyntheticBatches:
    """Global batch ``k`` holds examples ``k*B .. (k+1)*B - 1`` of ``SyntheticDataset(task, seed)``; each rank
    keeps its rows. The position is just ``k``."""

    def __init__(self, task: SyntheticTask, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset = SyntheticDataset(task, _ENDLESS, seed=seed)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.batch = 0

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> Batch:
        per_rank = self.batch_size // self.world_size
        first = self.batch * self.batch_size + self.rank * per_rank
        examples = [self.dataset[i] for i in range(first, first + per_rank)]
        self.batch += 1
        return Batch(*(torch.stack([e[key] for e in examples]) for key in ("inputs", "targets", "loss_mask")))

    def state_dict(self) -> dict:
        return {"batch": self.batch, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("batch_size")) != (self.seed, self.batch_size):
            raise ValueError(f"data position was saved for seed={state.get('seed')}, batch_size="
                             f"{state.get('batch_size')}, not seed={self.seed}, batch_size={self.batch_size}")
        self.batch = int(state["batch"])


class TextBatches:
    """Shuffled windows of a token stream (:class:`~titans.data.loader.RandomWindows` over the global batch);
    each rank keeps its rows. Every position is scored."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.stream, self.windows = stream, RandomWindows(stream, seq_len, batch_size, seed=seed)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> TextBatches:
        return self

    def __next__(self) -> Batch:
        inputs, targets = next(self.windows)
        return Batch(inputs, targets, targets != IGNORE_INDEX).rows(self.rank, self.world_size)

    def state_dict(self) -> dict:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)


class DocumentBatches:
    """Whole documents read side by side in consecutive segments (:class:`~titans.data.loader.DocumentSegments`
    over the global batch); each rank keeps its rows. A batch is ``fresh`` when its rows start new documents."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.stream, self.segments = stream, DocumentSegments(stream, seq_len, batch_size, seed=seed)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> DocumentBatches:
        return self

    def __next__(self) -> Batch:
        inputs, targets, new_document = next(self.segments)
        return Batch(inputs, targets, targets != IGNORE_INDEX, new_document).rows(self.rank, self.world_size)

    def state_dict(self) -> dict:
        return self.segments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.segments.load_state_dict(state)


class MixedBatches:
    """Text batches whose last ``k = max(1, round(fraction * batch_size))`` rows of every global batch are replaced by
    prompted examples (``data.mix_tasks``: the prompt read, only the answer scored): global batch ``n`` takes examples
    ``n * k .. n * k + k - 1``. Each rank replaces the ones among its rows, so N processes see the data of one.
    ``weighting`` (``data.mix_weighting``): ``token``, every scored position weighs one in the loss; ``row``, a
    prompted row's answer positions share the weight of a whole text row (``seq_len`` each row)."""

    def __init__(self, text: TextBatches, examples, batch_size: int, fraction: float, *, rank: int = 0,
                 world_size: int = 1, weighting: str = "row"):
        self.text, self.examples, self.rank, self.world_size = text, examples, rank, world_size
        self.weighting = weighting
        self.batch_size, self.mixed = batch_size, max(1, round(fraction * batch_size))
        self.batch = 0

    @property
    def stream(self) -> TokenStream:
        return self.text.stream

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> Batch:
        text = next(self.text)
        parts = {"inputs": text.inputs.clone(), "targets": text.targets.clone(), "loss_mask": text.loss_mask.clone()}
        first_row = self.rank * (self.batch_size // self.world_size)  # (text's inputs and targets share storage)
        for row in range(text.inputs.shape[0]):
            j = first_row + row - (self.batch_size - self.mixed)  # this row's place among the mixed ones
            if j >= 0:
                example = self.examples[self.batch * self.mixed + j]
                for key, tensor in parts.items():
                    tensor[row] = example[key]
        if self.weighting == "token":
            loss_weight = None
        else:  # each row's scored positions share the weight of seq_len tokens (text rows: one each, as before)
            mask = parts["loss_mask"]
            loss_weight = mask * (mask.shape[1] / mask.sum(dim=1, keepdim=True).clamp(min=1))
        self.batch += 1
        return Batch(**parts, loss_weight=loss_weight)

    def state_dict(self) -> dict:
        return {"text": self.text.state_dict(), "mixed_batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        if "mixed_batch" not in state:
            raise ValueError("data position was saved without data.mix_tasks; resume with the run's own config")
        self.text.load_state_dict(state["text"])
        self.batch = int(state["mixed_batch"])


def text_tokenizer_name(config: RunConfig) -> str:
    """The corpus tokenizer of a text run (``byte`` is accepted for ``bytes``)."""
    name = config.data.tokenizer
    return "bytes" if name == "byte" else name


def make_task_from_config(config: RunConfig, seq_len: int | None = None, split: str = "train",
                          **overrides) -> SyntheticTask:
    """The run's synthetic task at ``seq_len`` tokens (default ``train.seq_len``), with the model's vocabulary
    unless ``data.kwargs`` sets ``vocab_size``. ``split`` (train, validation, test) picks the part of the genome the
    DNA tasks read; the generated tasks ignore it (held-out examples come from other seeds)."""
    name = config.data.task
    seq_len = config.train.seq_len if seq_len is None else seq_len
    kwargs = {"vocab_size": config.model.vocab_size, **config.data.kwargs, **overrides}
    if name != "copy":
        if "seq_len" in config.data.kwargs:
            raise ConfigError("set the sequence length with 'train.seq_len', not 'data.kwargs.seq_len'")
        kwargs["seq_len"] = seq_len
    try:
        if name in DNA_TASKS:
            if "split" in config.data.kwargs:
                raise ValueError("the split is chosen by training and evaluation, not by data.kwargs.split")
            task = DNA_TASKS[name](**kwargs, split=split)
        else:
            task = make_task(name, **kwargs)
    except TypeError as exc:  # an unknown keyword of a DNA task
        raise ConfigError(f"data.kwargs: {name}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"data.kwargs: {exc}") from None
    if task.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the {name} task uses {task.vocab_size} tokens but 'model.vocab_size' is "
                          f"{config.model.vocab_size}")
    if task.seq_len != seq_len:  # copy: T = 2 * length + gap
        raise ConfigError(f"copy sequences have 2 * length + gap = {task.seq_len} tokens but 'train.seq_len' is "
                          f"{seq_len}; make them equal")
    return task


def make_batches(config: RunConfig, split: str = "train", *, rank: int = 0,
                 world_size: int = 1) -> SyntheticBatches | TextBatches | DocumentBatches | MixedBatches:
    """Training batches (``split="train"``: ``train.batch_size`` sequences, read as ``data.sampling`` says) or
    held-out ones (``"eval"``: ``eval.batch_size`` windows of the validation split of a text corpus, other seeds of a
    synthetic task)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    batch_size = config.train.batch_size if split == "train" else config.eval.batch_size
    _per_rank(batch_size, world_size, "train.batch_size" if split == "train" else "eval.batch_size")
    seed = config.train.seed if split == "train" else config.train.seed + EVAL_SEED_OFFSET
    if config.data.task != "text":
        task = make_task_from_config(config, split="train" if split == "train" else "validation")
        return SyntheticBatches(task, batch_size, seed=seed, rank=rank, world_size=world_size)
    stream = open_text_stream(config, "train" if split == "train" else "validation")
    if split == "train" and config.data.sampling == "documents":
        documents = int((np.diff(stream.offsets) >= 2).sum())
        if documents < batch_size:
            raise ConfigError(f"'data.sampling' documents reads train.batch_size ({batch_size}) documents side by "
                              f"side, but the train split has {documents} (of at least 2 tokens): lower the batch "
                              f"size or use windows")
        return DocumentBatches(stream, config.train.seq_len, batch_size, seed=seed, rank=rank, world_size=world_size)
    text = TextBatches(stream, config.train.seq_len, batch_size, seed=seed, rank=rank, world_size=world_size)
    if split == "train" and config.data.mix_tasks:
        from titans.data.prompted import PromptedExamples
        from titans.data.tokenizer import load_tokenizer

        if stream.tokenizer_path is None or not stream.tokenizer_path.is_file():
            raise ConfigError(f"'data.mix_tasks' needs the corpus tokenizer's file, not found at "
                              f"{stream.tokenizer_path}")
        data_dir = None if config.data.data_dir is None else Path(config.data.data_dir)
        try:
            examples = PromptedExamples(config.data.mix_tasks, load_tokenizer(stream.tokenizer_path),
                                        config.train.seq_len, data_dir=data_dir)
        except ValueError as exc:
            raise ConfigError(f"'data.mix_tasks': {exc}") from None
        return MixedBatches(text, examples, batch_size, config.data.mix_fraction, rank=rank, world_size=world_size,
                            weighting=config.data.mix_weighting)
    return text


def open_text_stream(config: RunConfig, split: str) -> TokenStream:
    """The run's prepared corpus split, checked against the model's vocabulary."""
    data_dir = None if config.data.data_dir is None else Path(config.data.data_dir)
    stream = TokenStream(data_dir, split, text_tokenizer_name(config))
    if stream.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the {text_tokenizer_name(config)!r} tokenizer has {stream.vocab_size} tokens but "
                          f"'model.vocab_size' is {config.model.vocab_size}")
    return stream
