"""The memory op decoding one token at a time in fixed shapes (paper Section 3.2, Eqs. 13-16, as `memory_step`).

`memory_step` carries the partial chunk as tensors that grow by a token per call, which a compiled graph cannot
serve. Here the partial chunk lives in buffers of `chunk_size` rows written at row `filled`, the chunk boundary is a
select (`torch.where`) instead of a Python branch, and every tensor keeps its shape from token to token: one
`torch.compile`d step then serves a whole generation (`titans.decoding`). Same arithmetic as `memory_step` on an
`MLPMemory`: the token's gradient at the chunk-start weights W_c, S_t = eta_t S_{t-1} - theta_t G_t,
W_t = (1 - alpha_t) W_{t-1} + S_t, the read f(W_t, q_t); at the chunk's last token W_t and S_t become the next W_c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .memory_scan import (MemoryState, PendingTokens, _inner_gradient_factors, _running_values, _scaled_lr,
                          _token_update)
from .mlp_memory import MLPMemory, Params


@dataclass
class MemoryDecodeState:
    """A `MemoryState` in fixed shapes. Rows at and beyond `filled` of the buffers are zero (unit inputs) or unused."""

    weights: Params  # W_c, at the last chunk boundary
    momentum: Params  # S_c
    weights_now: Params  # W_t, after the last token
    momentum_now: Params  # S_t
    keys: Tensor  # (BH, C, d): the partial chunk's keys, values and gates (to hand the state back to memory_scan)
    values: Tensor
    lr: Tensor  # (BH, C)
    momentum_gate: Tensor | None
    decay_gate: Tensor | None
    unit_inputs: Params  # per memory layer (BH, C, d_in): the rows of `causal_overlap`
    filled: Tensor  # 0-d int64: tokens since the boundary, < C


def _buffer(rows: Tensor | None, chunk_size: int, like: Tensor) -> Tensor:
    """(BH, chunk_size, ...) zeros with `rows` (BH, p, ...) at the top."""
    out = like.new_zeros(like.shape[0], chunk_size, *like.shape[2:])
    if rows is not None:
        out[:, :rows.shape[1]] = rows
    return out


def decode_state(memory: MLPMemory, state: MemoryState, chunk_size: int, max_grad_norm: float | None,
                 normalize_chunk_lr: bool, momentum: bool, decay: bool) -> MemoryDecodeState:
    """`state` (from `memory_scan` or `memory_step`) in fixed shapes; its partial chunk, if any, folded into W_t and
    S_t. momentum, decay: whether the layer has those gates."""
    W_now, S_now, units = _running_values(memory, state, max_grad_norm, normalize_chunk_lr)
    pending, units = state.pending, units or {}
    first = next(iter(state.weights.values()))
    rows = lambda *shape: first.new_zeros(first.shape[0], 1, *shape)  # noqa: E731  one token's shape
    part = lambda name: None if pending is None else getattr(pending, name)  # noqa: E731
    return MemoryDecodeState(
        dict(state.weights), dict(state.momentum), dict(W_now), dict(S_now),
        _buffer(part("keys"), chunk_size, rows(memory.dim)), _buffer(part("values"), chunk_size, rows(memory.dim)),
        _buffer(part("lr"), chunk_size, rows()),
        _buffer(part("momentum"), chunk_size, rows()) if momentum else None,
        _buffer(part("decay"), chunk_size, rows()) if decay else None,
        {name: _buffer(units.get(name), chunk_size, rows(d_in)) for name, (_, d_in) in memory.shapes().items()},
        torch.tensor(0 if pending is None else len(pending), device=first.device))


def decode_step(memory: MLPMemory, key: Tensor, value: Tensor, query: Tensor, lr: Tensor, momentum: Tensor | None,
                decay: Tensor | None, state: MemoryDecodeState, max_grad_norm: float | None,
                normalize_chunk_lr: bool) -> tuple[Tensor, MemoryDecodeState]:
    """`memory_step` of one token (key, value, query (BH, 1, d); gates (BH, 1)) on the fixed-shape state. `momentum` and
    `decay` must be None exactly when the state was built without them."""
    chunk_size = state.keys.shape[1]
    row = state.filled.reshape(1)
    put = lambda buffer, x: buffer.index_copy(1, row, x.to(buffer.dtype))  # noqa: E731
    inputs, deltas = _inner_gradient_factors(memory, state.weights, key, value)  # gradient at W_c (Eq. 16)
    units, overlap = state.unit_inputs, None
    if normalize_chunk_lr:  # the token's row of causal_overlap: |cos| with itself and the chunk's earlier inputs
        new = {name: torch.nn.functional.normalize(z, dim=-1) for name, z in zip(memory.names, inputs)}
        units = {name: put(units[name], u) for name, u in new.items()}
        overlap = torch.stack([(units[name] @ u.transpose(-1, -2)).abs().sum(1) for name, u in new.items()])
        overlap = overlap.amax(0).clamp(min=1)
    theta = _scaled_lr(lr, inputs, deltas, max_grad_norm, normalize_chunk_lr, overlap)
    W_now, S_now = _token_update(memory, state.weights_now, state.momentum_now, inputs, deltas, theta, momentum,
                                 decay)
    y = memory(W_now, query)
    complete = state.filled == chunk_size - 1  # the chunk ends: W_t, S_t start the next one
    at_boundary = lambda now, before: {k: torch.where(complete, now[k], before[k]) for k in now}  # noqa: E731
    gate = lambda buffer, x: None if buffer is None else put(buffer, x)  # noqa: E731
    return y, MemoryDecodeState(
        at_boundary(W_now, state.weights), at_boundary(S_now, state.momentum), W_now, S_now,
        put(state.keys, key), put(state.values, value), put(state.lr, lr), gate(state.momentum_gate, momentum),
        gate(state.decay_gate, decay),
        {k: torch.where(complete, torch.zeros_like(u), u) for k, u in units.items()},
        (state.filled + 1) % chunk_size)


def memory_state(state: MemoryDecodeState, normalize_chunk_lr: bool) -> MemoryState:
    """The `MemoryState` that `memory_step` would have made (the partial chunk's rows, W_t and S_t carried)."""
    p = int(state.filled)
    if p == 0:
        return MemoryState(dict(state.weights), dict(state.momentum))
    top = lambda x: None if x is None else x[:, :p]  # noqa: E731
    units = {k: u[:, :p] for k, u in state.unit_inputs.items()} if normalize_chunk_lr else None
    return MemoryState(dict(state.weights), dict(state.momentum),
                       PendingTokens(top(state.keys), top(state.values), top(state.lr), top(state.momentum_gate),
                                     top(state.decay_gate), dict(state.weights_now), dict(state.momentum_now), units))
