"""What the neural memory learns at test time (paper Section 3.1).

A sequence is fed segment by segment through the model state. For every memory layer and segment this records how
far the memory weights moved while reading the segment, ``||W_after - W_before|| / max(||W_before||, ||W_after||)``,
and the inner
associative loss of Eq. 12, ``||M(k) - v||^2`` averaged over the segment's tokens and heads, with the weights before
and after the segment was stored. A memory that learns at test time shows a lower loss after than before.
Per token and head it also traces what drives the update (`NeuralMemory.signals`): the step size theta, momentum eta,
forgetting alpha, the surprise ||grad l|| at the segment-start weights and the clipping factor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from titans.memory import NeuralMemory, NeuralMemoryState
from titans.model import TitansLM
from titans.ops import current_weights

__all__ = ["SegmentRecord", "inspect_memory", "memory_layers", "plot_inspection", "records_as_dicts"]


@dataclass
class SegmentRecord:
    segment: int
    layer: int
    tokens: int  # tokens the memory stored in this segment (persistent tokens included)
    weight_change: float
    inner_loss_before: float
    inner_loss_after: float
    # per head, per token of the segment: theta, eta, alpha, surprise, clip (see NeuralMemory.signals)
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
def inspect_memory(model: TitansLM, tokens: Tensor, segment_len: int) -> list[SegmentRecord]:
    """Records of every (segment, memory layer) for ``tokens`` (T,) or (1, T) fed ``segment_len`` at a time."""
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.shape[0] != 1:
        raise ValueError(f"inspect one sequence at a time, got a batch of {tokens.shape[0]}")
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    layers = memory_layers(model)
    calls: dict[int, list] = {i: [] for i, _ in layers}
    def recorder(i: int):
        def hook(memory: NeuralMemory, args: tuple, kwargs: dict, output: tuple) -> None:
            x, state_in = args[0], args[1] if len(args) > 1 else kwargs.get("state")
            if state_in is None:
                state_in = memory.initial_state(x.shape[0], torch.promote_types(x.dtype, torch.float32))
            calls[i].append((x, state_in, output[1]))
        return hook

    handles = [memory.register_forward_hook(recorder(i), with_kwargs=True) for i, memory in layers]
    records, state = [], None
    try:
        for segment, start in enumerate(range(0, tokens.shape[1], segment_len)):
            for c in calls.values():
                c.clear()
            _, state = model(tokens[:, start:start + segment_len], state)
            for i, memory in layers:
                records.append(_segment_record(memory, calls[i], segment, i))
    finally:
        for handle in handles:
            handle.remove()
    return records


def _segment_record(memory: NeuralMemory, calls: list, segment: int, layer: int) -> SegmentRecord:
    """One record from the memory's forward calls during a segment, each (input, state before, state after)."""
    keys, values, signals = [], [], []
    for x, state_in, _ in calls:
        scratch = NeuralMemoryState(state_in.memory, dict(state_in.conv))  # _project advances the conv tails
        keys.append(memory._project(x, "k", scratch, "k"))
        values.append(memory._project(x, "v", scratch, "v"))
        signals.append(memory.signals(x, state_in))
    before = current_weights(memory.memory, calls[0][1].memory, memory.max_grad_norm, memory.normalize_chunk_lr)
    after = current_weights(memory.memory, calls[-1][2].memory, memory.max_grad_norm, memory.normalize_chunk_lr)
    k, v = torch.cat(keys, dim=1), torch.cat(values, dim=1)
    scale = torch.maximum(_norm(before), _norm(after)).clamp(min=torch.finfo(torch.float64).tiny)
    change = _norm({n: after[n] - before[n] for n in before}) / scale  # relative to the larger: M_0 may be 0
    traces = {name: torch.cat([s[name][0] for s in signals], dim=-1).tolist() for name in signals[0]}
    return SegmentRecord(segment, layer, k.shape[1], float(change), _inner_loss(memory, before, k, v),
                         _inner_loss(memory, after, k, v), traces)


def plot_inspection(records: list[SegmentRecord], path: str | Path, title: str) -> Figure:
    """Inner loss before/after each segment and the relative weight change, one line per memory layer."""
    fig = Figure(figsize=(16, 4.2))
    loss_ax, change_ax, signal_ax = fig.subplots(1, 3)
    for layer in sorted({r.layer for r in records}):
        rows = [r for r in records if r.layer == layer]
        segments = [r.segment for r in rows]
        line, = loss_ax.plot(segments, [r.inner_loss_before for r in rows], marker="o", label=f"layer {layer} before")
        loss_ax.plot(segments, [r.inner_loss_after for r in rows], marker="o", linestyle="--", color=line.get_color(),
                     label=f"layer {layer} after")
        change_ax.plot(segments, [r.weight_change for r in rows], marker="o", label=f"layer {layer}")
        for signal, style in (("theta", "-"), ("eta", "--"), ("alpha", ":")):
            signal_ax.plot(segments, [r.mean(signal) for r in rows], marker="o", linestyle=style,
                           color=line.get_color(), label=f"layer {layer} {signal}")
    loss_ax.set(xlabel="segment", ylabel="inner loss ||M(k) - v||^2", title="before vs after storing the segment")
    change_ax.set(xlabel="segment", ylabel="||dW|| / ||W||", title="memory weight change per segment")
    signal_ax.set(xlabel="segment", ylabel="mean over heads and tokens", title="step size, momentum, forgetting")
    for ax in (loss_ax, change_ax, signal_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def records_as_dicts(records: list[SegmentRecord]) -> list[dict]:
    return [asdict(r) for r in records]
