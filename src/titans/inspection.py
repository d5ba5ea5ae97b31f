"""What the neural memory learns at test time (paper Section 3.1).

A sequence is streamed through the model state piece by piece. For every memory layer and piece this records how
far the memory weights moved while reading the piece, ``||W_after - W_before|| / max(||W_before||, ||W_after||)``,
and the inner associative loss of Eq. 12, ``||M(k) - v||^2`` averaged over the piece's tokens and heads, with the
weights before and after the piece was stored. A memory that learns at test time shows a lower loss after than
before. Per token and head it also traces what drives the update (`NeuralMemory.signals`): the step size theta,
momentum eta, forgetting alpha, the surprise ||grad l|| at the piece-start weights and the clipping factor.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from titans.memory import NeuralMemory
from titans.model import TitansLM, stream

__all__ = ["PieceRecord", "inspect_memory", "memory_layers", "records_as_dicts"]


@dataclass
class PieceRecord:
    piece: int
    layer: int
    tokens: int  # tokens the memory stored in this piece (persistent tokens included)
    weight_change: float
    inner_loss_before: float
    inner_loss_after: float
    # per head, per token of the piece: theta, eta, alpha, surprise, clip (see NeuralMemory.signals)
    signals: dict[str, list[list[float]]] = field(default_factory=dict)

    def mean(self, signal: str) -> float:
        values = [v for head in self.signals[signal] for v in head]
        return sum(values) / max(1, len(values))


def memory_layers(model: TitansLM) -> list[tuple[int, NeuralMemory]]:
    """(block index, memory) for every block whose mixer holds a neural memory."""
    layers = [(i, m) for i, block in enumerate(model.blocks) for m in block.mixer.modules()
              if isinstance(m, NeuralMemory)]
    if not layers:
        raise ValueError(f"variant {model.config.variant!r} has no neural memory to inspect")
    return layers


def _norm(weights: dict[str, Tensor]) -> Tensor:
    return torch.sqrt(sum((w.double() ** 2).sum() for w in weights.values()))


def _inner_loss(memory: NeuralMemory, weights: dict[str, Tensor], keys: Tensor, values: Tensor) -> float:
    """Mean over tokens and heads of ||M(k) - v||^2 (Eq. 12)."""
    prediction = memory.memory(weights, keys.to(next(iter(weights.values())).dtype))
    return float(((prediction - values) ** 2).sum(-1).mean())


@torch.no_grad()
def inspect_memory(model: TitansLM, tokens: Tensor, piece_len: int) -> list[PieceRecord]:
    """Records of every (piece, memory layer) for ``tokens`` (T,) or (1, T) streamed ``piece_len`` at a time."""
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.shape[0] != 1:
        raise ValueError(f"inspect one sequence at a time, got a batch of {tokens.shape[0]}")
    layers = memory_layers(model)
    records = []
    with contextlib.ExitStack() as stack:
        calls = {i: stack.enter_context(memory.recording()) for i, memory in layers}
        for piece, _ in enumerate(stream(model, tokens, piece_len)):
            for i, memory in layers:
                records.append(_piece_record(memory, calls[i], piece, i))
                calls[i].clear()
    return records


def _piece_record(memory: NeuralMemory, calls: list, piece: int, layer: int) -> PieceRecord:
    """One record from the memory's storing calls during a piece, each (input, state before, state after)."""
    keys, values = zip(*(memory.associations(x, before) for x, before, _ in calls))
    signals = [memory.signals(x, before) for x, before, _ in calls]
    before, after = memory.weights(calls[0][1]), memory.weights(calls[-1][2])
    k, v = torch.cat(keys, dim=1), torch.cat(values, dim=1)
    scale = torch.maximum(_norm(before), _norm(after)).clamp(min=torch.finfo(torch.float64).tiny)
    change = _norm({n: after[n] - before[n] for n in before}) / scale  # relative to the larger: M_0 may be 0
    traces = {name: torch.cat([s[name][0] for s in signals], dim=-1).tolist() for name in signals[0]}
    return PieceRecord(piece, layer, k.shape[1], float(change), _inner_loss(memory, before, k, v),
                       _inner_loss(memory, after, k, v), traces)


def records_as_dicts(records: list[PieceRecord]) -> list[dict]:
    return [asdict(r) for r in records]
