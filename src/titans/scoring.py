"""Scoring a model on batches: summed masked cross-entropy and exact-match counts, streamed through the model
state in pieces so that memory use does not grow with the sequence length."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.batches import Batch
from titans.data.loader import IGNORE_INDEX
from titans.model import stream

__all__ = ["Scores", "masked_loss_sum", "score_batch"]


def masked_loss_sum(logits: Tensor, targets: Tensor, loss_mask: Tensor, loss_weight: Tensor | None = None) -> Tensor:
    """Sum of the cross-entropy (fp32) over the scored positions, each weighted by ``loss_weight`` when given."""
    targets = targets.masked_fill(~loss_mask, IGNORE_INDEX)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum" if loss_weight is None else "none")
    return losses if loss_weight is None else (losses * loss_weight.flatten()).sum()


@dataclass
class Scores:
    """Running sums over scored positions; ``+`` merges two."""

    loss_sum: float = 0.0  # nats
    correct: int = 0  # positions whose arg-max is the target
    count: int = 0  # scored positions
    sequences_correct: int = 0  # sequences with every scored position right
    sequences: int = 0  # sequences with at least one scored position

    def __add__(self, other: Scores) -> Scores:
        return Scores(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> Scores:
        values = t.tolist()
        return cls(values[0], *(round(v) for v in values[1:]))

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else math.nan

    @property
    def sequence_accuracy(self) -> float:
        return self.sequences_correct / self.sequences if self.sequences else math.nan


@torch.no_grad()
def score_batch(model: nn.Module, batch: Batch, piece_len: int,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Scores:
    """Stream ``batch`` through ``model`` (a :class:`~titans.model.TitansLM`) ``piece_len`` tokens at a time
    (:func:`~titans.model.stream`) and score every position of ``loss_mask``. Only one piece's logits exist at a
    time."""
    scores = Scores()
    wrong = torch.zeros(batch.inputs.shape[0], dtype=torch.bool, device=batch.inputs.device)
    for positions, logits, _ in stream(model, batch.inputs, piece_len, autocast=autocast):
        targets, mask = batch.targets[:, positions], batch.loss_mask[:, positions]
        hit = (logits.argmax(-1) == targets) & mask
        wrong |= (mask & ~hit).any(dim=1)
        scores += Scores(masked_loss_sum(logits, targets, mask).item(), int(hit.sum()), int(mask.sum()))
    has_scored = batch.loss_mask.any(dim=1)
    return scores + Scores(sequences_correct=int((has_scored & ~wrong).sum()), sequences=int(has_scored.sum()))
