"""Seed synthetic tasks for memory models: copy, pattern, needle and multi-query associative recall.

Every task produces examples in one format, a dict of three tensors of length ``T = task.seq_len``:

* ``inputs``: int64, the tokens the model reads;
* ``targets``: int64, what position ``t`` should predict. It is the next input token (``inputs[t + 1]``, or the
  stream's final token at ``t = T - 1``) everywhere except where a task says otherwise (MQAR's answers);
* ``loss_mask``: bool, the positions whose targets are scored by the loss and the accuracy.

A task may add metadata (the needle task adds the scalar ``needle_position``, the recall task the per-position
key-query ``distance``).

:class:`SyntheticDataset` is a map-style ``torch.utils.data.Dataset`` whose item ``i`` depends only on
``(seed, i)``, so it is reproducible, order-independent and safe with any number of workers.
:mod:`titans.scoring` scores a model on them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SyntheticTask",
    "CopyTask",
    "PatternTask",
    "NeedleTask",
    "RecallTask",
    "SyntheticDataset",
    "TASKS",
    "make_task",
    "example_rng",
]

Example = dict[str, torch.Tensor]


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of example ``index`` for ``seed``: independent streams per (seed, index)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index])


def _from_stream(stream: np.ndarray, scored: np.ndarray) -> Example:
    """Next-token example from a stream of ``T + 1`` tokens; ``scored`` marks target positions (length ``T``)."""
    return {
        "inputs": torch.from_numpy(stream[:-1].astype(np.int64)),
        "targets": torch.from_numpy(stream[1:].astype(np.int64)),
        "loss_mask": torch.from_numpy(scored.astype(bool)),
    }


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class SyntheticTask(ABC):
    """A generator of examples of length ``seq_len`` (``T``) over a vocabulary of ``vocab_size`` tokens."""

    vocab_size: int
    seq_len: int

    @abstractmethod
    def generate(self, rng: np.random.Generator) -> Example:
        """One example drawn with ``rng``."""


@dataclass(frozen=True)
class CopyTask(SyntheticTask):
    """Reproduce a random sequence after a delimiter.

    Stream: ``x_1..x_L, BLANK * gap, DELIM, x_1..x_L`` with ``x_i`` uniform over ``[0, vocab_size - 2)``,
    ``BLANK = vocab_size - 2`` and ``DELIM = vocab_size - 1``. Only the copy is scored: the ``length``
    targets after the delimiter. ``gap`` blanks push the copy further from its source.
    """

    vocab_size: int = 16
    length: int = 32
    gap: int = 0

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 3,
                 f"copy: vocab_size must be >= 3 (content + blank + delimiter), got {self.vocab_size}")
        _require(self.length >= 1, f"copy: length must be >= 1, got {self.length}")
        _require(self.gap >= 0, f"copy: gap must be >= 0, got {self.gap}")

    @property
    def blank(self) -> int:
        return self.vocab_size - 2

    @property
    def delimiter(self) -> int:
        return self.vocab_size - 1

    @property
    def seq_len(self) -> int:
        return 2 * self.length + self.gap

    def generate(self, rng: np.random.Generator) -> Example:
        x = rng.integers(0, self.vocab_size - 2, size=self.length)
        stream = np.concatenate([x, np.full(self.gap, self.blank), [self.delimiter], x])
        scored = np.zeros(self.seq_len, dtype=bool)
        scored[self.length + self.gap :] = True  # targets are the copied tokens
        return _from_stream(stream, scored)


@dataclass(frozen=True)
class PatternTask(SyntheticTask):
    """Next-token prediction on a random pattern of random period, repeated to fill the sequence.

    The period ``p`` is uniform in ``[min_period, max_period]`` and the pattern's tokens uniform over the
    vocabulary. A target is scored once it is determined by the prefix, i.e. from the second period on.
    """

    vocab_size: int = 16
    seq_len: int = 64
    min_period: int = 2
    max_period: int = 8

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 2, f"pattern: vocab_size must be >= 2, got {self.vocab_size}")
        _require(
            1 <= self.min_period <= self.max_period < self.seq_len,
            "pattern: need 1 <= min_period <= max_period < seq_len, got "
            f"min_period={self.min_period}, max_period={self.max_period}, seq_len={self.seq_len}",
        )

    def generate(self, rng: np.random.Generator) -> Example:
        period = int(rng.integers(self.min_period, self.max_period + 1))
        pattern = rng.integers(0, self.vocab_size, size=period)
        stream = np.resize(pattern, self.seq_len + 1)  # np.resize repeats the pattern
        scored = np.arange(1, self.seq_len + 1) >= period  # target index j predicts stream[j + 1]
        return _from_stream(stream, scored)


@dataclass(frozen=True)
class NeedleTask(SyntheticTask):
    """Find a marked token among distractors and report it at the end.

    Stream: a context of ``seq_len - 1`` distractors uniform over ``[0, vocab_size - 2)`` in which
    ``NEEDLE = vocab_size - 2`` sits at position ``p`` followed by a value token, then ``QUERY = vocab_size - 1``
    and the answer. Only the answer is scored. ``answer="value"`` asks for the token after the needle;
    ``answer="position"`` for ``p`` itself, as a token id (so ``vocab_size - 2`` must exceed the largest ``p``).
    ``depth`` in ``[0, 1]`` fixes ``p = round(depth * (seq_len - 3))``; ``None`` draws it uniformly.
    """

    vocab_size: int = 32
    seq_len: int = 64
    answer: str = "value"
    depth: float | None = None

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 3, f"needle: vocab_size must be >= 3, got {self.vocab_size}")
        _require(self.seq_len >= 3, f"needle: seq_len must be >= 3, got {self.seq_len}")
        _require(self.answer in ("value", "position"),
                 f"needle: answer must be 'value' or 'position', got {self.answer!r}")
        _require(self.depth is None or 0.0 <= self.depth <= 1.0, f"needle: depth must be in [0, 1], got {self.depth}")
        if self.answer == "position":
            _require(
                self.max_position < self.vocab_size - 2,
                f"needle: answer='position' needs vocab_size - 2 > {self.max_position} (the last needle position), "
                f"got vocab_size={self.vocab_size}",
            )

    @property
    def needle(self) -> int:
        return self.vocab_size - 2

    @property
    def query(self) -> int:
        return self.vocab_size - 1

    @property
    def max_position(self) -> int:
        """Last needle position: the value must fit in the ``seq_len - 1`` context tokens."""
        return self.seq_len - 3

    def needle_position(self, rng: np.random.Generator) -> int:
        if self.depth is None:
            return int(rng.integers(0, self.max_position + 1))
        return round(self.depth * self.max_position)

    def generate(self, rng: np.random.Generator) -> Example:
        context = rng.integers(0, self.vocab_size - 2, size=self.seq_len - 1)
        position = self.needle_position(rng)
        context[position] = self.needle
        answer = context[position + 1] if self.answer == "value" else position
        stream = np.concatenate([context, [self.query, answer]])
        scored = np.zeros(self.seq_len, dtype=bool)
        scored[-1] = True
        example = _from_stream(stream, scored)
        example["needle_position"] = torch.tensor(position)
        return example


@dataclass(frozen=True)
class RecallTask(SyntheticTask):
    """Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv 2312.04927).

    As Zoology's ``multiquery_ar``: ``num_kv_pairs`` distinct keys from ``[1, vocab_size // 2)`` bound to
    distinct values from ``[vocab_size // 2, vocab_size)`` open the sequence as ``k1 v1 k2 v2 ...``; each key is
    queried once more later, at an even offset drawn from the power law ``p(g) ~ g ** (power_a - 1)``
    (small ``power_a`` puts queries near the pairs). The target at a query is its value; those are the
    only scored positions. Other slots hold 0, or random tokens with ``random_non_queries``.

    Examples also carry ``distance`` (int64, length ``T``): at a query position ``q`` asking for the ``i``-th key
    (input position ``2 i``), ``q - 2 i``, the key-query distance in tokens; ``-1`` at every unscored position. A model
    that sees the tokens at distances ``0 .. W - 1`` (a sliding window of ``W``) sees the value (at ``2 i + 1``)
    exactly when ``distance <= W``. It is bookkeeping only: the tokens drawn for a given ``rng`` are unchanged.
    """

    vocab_size: int = 64
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        _require(self.seq_len % 2 == 0, f"recall: seq_len must be even, got {self.seq_len}")
        _require(self.num_kv_pairs >= 1, f"recall: num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
        _require(
            4 * self.num_kv_pairs <= self.seq_len,
            f"recall: seq_len must be >= 4 * num_kv_pairs, got seq_len={self.seq_len}, "
            f"num_kv_pairs={self.num_kv_pairs}",
        )
        _require(
            self.vocab_size // 2 - 1 >= self.num_kv_pairs,
            f"recall: vocab_size // 2 - 1 keys are available, fewer than num_kv_pairs={self.num_kv_pairs} "
            f"(vocab_size={self.vocab_size})",
        )
        _require(self.power_a > 0, f"recall: power_a must be > 0, got {self.power_a}")

    def generate(self, rng: np.random.Generator) -> Example:
        n, half = self.num_kv_pairs, self.vocab_size // 2
        keys = rng.choice(np.arange(1, half), size=n, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), size=n, replace=False)
        context = 2 * n
        space = (self.seq_len - context) // 2
        p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
        gaps = rng.choice(space, size=n, replace=False, p=p / p.sum())

        stream = np.zeros(self.seq_len + 1, dtype=np.int64)
        stream[0:context:2], stream[1:context:2] = keys, values
        query_positions = context + 2 * gaps
        stream[query_positions] = keys
        if self.random_non_queries:
            filler = stream == 0
            stream[filler] = rng.integers(0, self.vocab_size, size=int(filler.sum()))
        example = _from_stream(stream, np.isin(np.arange(self.seq_len), query_positions))
        example["targets"][query_positions] = torch.from_numpy(values.astype(np.int64))
        distance = np.full(self.seq_len, -1, dtype=np.int64)
        distance[query_positions] = query_positions - 2 * np.arange(n)  # key i sits at input position 2 i
        example["distance"] = torch.from_numpy(distance)
        return example


TASKS: dict[str, type[SyntheticTask]] = {
    "copy": CopyTask,
    "pattern": PatternTask,
    "needle": NeedleTask,
    "recall": RecallTask,
}


def make_task(name: str, **kwargs) -> SyntheticTask:
    """Build a task by name (``copy``, ``pattern``, ``needle``, ``recall``); ``seq_len`` sets the length ``T``
    of the tasks whose length is free (all but ``copy``, whose ``T = 2 * length + gap``)."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {sorted(TASKS)}")
    cls = TASKS[name]
    if cls is CopyTask and "seq_len" in kwargs:
        raise ValueError("copy: set `length` (and `gap`), not `seq_len`; its T is 2 * length + gap")
    try:
        return cls(**kwargs)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"{name}: {e}") from e


class SyntheticDataset(Dataset):
    """``num_examples`` examples of ``task``; item ``i`` is ``task.generate(example_rng(seed, i))``."""

    def __init__(self, task: SyntheticTask, num_examples: int, seed: int = 0):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.task, self.num_examples, self.seed = task, num_examples, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return self.task.generate(example_rng(self.seed, index))
