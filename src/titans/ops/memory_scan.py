"""The chunked (mini-batch) memory op of Titans, paper Section 3.2, Eqs. 16-18.

Per head, with keys k_t, values v_t, queries q_t, step size theta_t, momentum eta_t and forgetting alpha_t:

    l_t(W)  = || f(W, k_t) - v_t ||^2                      inner associative loss (Eq. 12)
    S_t     = eta_t S_{t-1} - theta_t grad l_t(W_c)          surprise with momentum (Eq. 10 / 14)
    W_t     = (1 - alpha_t) W_{t-1} + S_t                    forgetting (Eq. 13)
    y_t     = f(W_t, q_t)                                    retrieval (Eq. 15)

where W_c is the weight at the start of t's chunk of `chunk_size` tokens (Eq. 16: gradients of a chunk are taken at
the chunk-start weights, so the chunk is one tensorised mini-batch step). chunk_size = 1 is the plain online rule.

Fast path (`MLPMemory`): inside a chunk every gradient is a sum of rank-one outer products, layer l's being
G_{l,j} = delta_{l,j} z_{l,j}^T at W_c. Unrolling the two linear recurrences gives

    W_i = b_i W_c + c_i S_c - sum_{j<=i} A_ij G_j,   A = P Q,  P_im = prod_{m<k<=i} (1 - alpha_k),
                                                     Q_mj = theta_j prod_{j<k<=m} eta_k,
    b_i = prod_{k<=i} (1 - alpha_k),   c_i = sum_{m<=i} P_im E_m,   E_m = prod_{k<=m} eta_k,

so W_i x = b_i W_c x + c_i S_c x - sum_j A_ij (z_j . x) delta_j: the per-token retrievals are masked matrix products,
layer by layer (the dual form of TTT, extended with momentum and forgetting; the C x C matrices replace the paper's
parallel scan of Eq. 18). The gate products are built in log space (stable segment sums), and weights and momentum
are materialised only at chunk ends: no per-token weight copies.

Streaming: the state keeps W and S at the last chunk boundary plus the (< chunk_size) tokens seen since, so a sequence
fed in pieces of any length gives exactly the result of one call. Decoding: `memory_step` takes one token the same way
without the chunk machinery (no padding, no loop; only the new token's row of the closed form is read).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor

from .mlp_memory import MLPMemory, Params

MemoryFn = Callable[[Params, Tensor], Tensor]


@dataclass
class PendingTokens:
    """Tokens after the last chunk boundary, not yet folded into the weights (fewer than chunk_size)."""

    keys: Tensor  # (BH, p, d_k)
    values: Tensor  # (BH, p, d_v)
    lr: Tensor  # (BH, p)
    momentum: Tensor | None
    decay: Tensor | None
    # Decoding's running values (`memory_step` on an MLPMemory builds them; `memory_scan` ignores them): W_t and S_t
    # after the last pending token, and each layer's unit inputs at the chunk-start weights (the rows of
    # `causal_overlap`), keyed by the layer they enter. With them a decoded token costs O(1), not O(pending).
    weights_now: Params | None = None
    momentum_now: Params | None = None
    unit_inputs: Params | None = None

    def __len__(self) -> int:
        return self.keys.shape[1]


@dataclass
class MemoryState:
    """Memory weights W and momentum S at the last chunk boundary, and the tokens seen since."""

    weights: Params
    momentum: Params
    pending: PendingTokens | None = None

    @classmethod
    def initial(cls, params: Params) -> "MemoryState":
        return cls(weights=dict(params), momentum={k: torch.zeros_like(v) for k, v in params.items()})

    def detach(self) -> "MemoryState":
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        det = lambda t: None if t is None else t.detach()  # noqa: E731
        det_params = lambda p: None if p is None else {k: v.detach() for k, v in p.items()}  # noqa: E731
        pending = self.pending
        if pending is not None:
            pending = PendingTokens(*(det(getattr(pending, f)) for f in ("keys", "values", "lr", "momentum", "decay")),
                                    *(det_params(getattr(pending, f))
                                      for f in ("weights_now", "momentum_now", "unit_inputs")))
        return MemoryState({k: v.detach() for k, v in self.weights.items()},
                           {k: v.detach() for k, v in self.momentum.items()}, pending)


# --------------------------------------------------------------------------------------------- gate coefficients


def _segment_sum(x: Tensor) -> Tensor:
    """out[..., i, j] = sum_{j < k <= i} x[..., k] for j <= i, and -inf above the diagonal (no subtraction of
    cumulative sums, so it stays exact when products underflow)."""
    n = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, n)  # x[..., i, j] = x_i
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    sums = x.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    return sums.masked_fill(~strictly_lower.logical_or(torch.eye(n, dtype=torch.bool, device=x.device)), -torch.inf)


def _decay_products(gate: Tensor) -> tuple[Tensor, Tensor]:
    """For a gate g in [0, 1] of shape (..., C): (L, E) with L_ij = prod_{j<k<=i} g_k (lower triangular, L_ii = 1) and
    E_i = prod_{k<=i} g_k, computed in log space."""
    tiny = torch.finfo(gate.dtype).tiny
    log_gate = gate.clamp(min=tiny).log()
    padded = torch.nn.functional.pad(log_gate, (1, 0))  # a virtual step 0 before the chunk
    products = _segment_sum(padded).exp()
    return products[..., 1:, 1:], products[..., 1:, 0]


@dataclass
class ChunkCoefficients:
    """The unrolled momentum/forgetting recurrences of a chunk (see module docstring); shapes (..., C[, C])."""

    A: Tensor  # weight of gradient j in W_i
    Q: Tensor  # weight of gradient j in S_i
    b: Tensor  # weight of W_c in W_i
    c: Tensor  # weight of S_c in W_i
    e: Tensor  # weight of S_c in S_i

    def last_row(self) -> "ChunkCoefficients":
        """Coefficients of the chunk's last token, keeping a row axis of size 1: A, Q (BH, 1, C); b, c, e (BH, 1)."""
        return ChunkCoefficients(self.A[..., -1:, :], self.Q[..., -1:, :], self.b[..., -1:], self.c[..., -1:],
                                 self.e[..., -1:])


@dataclass
class GateProducts:
    """The step-size-free part of the coefficients, built for all chunks at once: P, b from the forgetting gate,
    the eta products and E from the momentum gate (None: that gate is off)."""

    P: Tensor
    b: Tensor
    eta: Tensor | None
    e: Tensor

    @classmethod
    def build(cls, momentum: Tensor | None, decay: Tensor | None, like: Tensor) -> "GateProducts":
        n = like.shape[-1]
        if decay is None:
            P = torch.ones(n, n, dtype=like.dtype, device=like.device).tril().expand(*like.shape, n)
            b = torch.ones_like(like)
        else:
            P, b = _decay_products(1 - decay)
        eta, e = (None, torch.zeros_like(like)) if momentum is None else _decay_products(momentum)
        return cls(P, b, eta, e)

    def unbind(self) -> list["GateProducts"]:
        """One GateProducts per chunk (unbind: a single backward node, not a full-size gradient per chunk)."""
        etas = [None] * self.P.shape[1] if self.eta is None else self.eta.unbind(1)
        return [GateProducts(*parts) for parts in zip(self.P.unbind(1), self.b.unbind(1), etas, self.e.unbind(1))]

    def coefficients(self, lr: Tensor) -> ChunkCoefficients:
        Q = torch.diag_embed(lr) if self.eta is None else self.eta * lr.unsqueeze(-2)  # no momentum: S_i = -theta_i G_i
        return ChunkCoefficients(A=self.P @ Q, Q=Q, b=self.b, c=(self.P @ self.e.unsqueeze(-1)).squeeze(-1), e=self.e)


def _clip_scale(squared_norms: Tensor, max_norm: float) -> Tensor:
    """Per-token factor min(1, max_norm / ||grad||): bounds every surprise step, so the memory cannot blow up."""
    return (max_norm / squared_norms.clamp(min=torch.finfo(squared_norms.dtype).tiny).sqrt()).clamp(max=1)


# --------------------------------------------------------------------------------------------- MLP fast path


def causal_overlap(inputs: list[Tensor]) -> Tensor:
    """rho_j = max over the memory's layers l of sum_{i <= j in the chunk} |cos(z_li, z_lj)| >= 1, for the layer
    inputs z_l (BH, C, d_l) at the chunk-start weights (the keys, then each hidden layer's activations; the keys alone
    for a memory that is not an MLPMemory). Chunked steps are all taken at the chunk-start weights, so with correlated
    inputs they add up; theta_j / rho_j bounds the chunk's summed step the way one token's step is bounded (a causal
    Gershgorin bound on each layer's Gram matrix). Equal to 1 at chunk size 1 and for orthogonal inputs."""
    rho = None
    for z in inputs:
        unit = torch.nn.functional.normalize(z, dim=-1)
        row = (unit @ unit.transpose(-1, -2)).abs().tril().sum(-1)
        rho = row if rho is None else torch.maximum(rho, row)
    return rho.clamp(min=1)


def _inner_gradient_factors(memory: MLPMemory, W: Params, keys: Tensor, values: Tensor):
    """Forward the chunk's keys through f(W_c, .) and back-propagate the inner loss by hand.
    Returns, per layer, the layer inputs z_l (BH, C, d_in) and output-gradients delta_l (BH, C, d_out), so that
    grad_{W_l} l_j = delta_{l,j} z_{l,j}^T."""
    inputs, pre_activations, h = [], [], keys
    for i, name in enumerate(memory.names):
        inputs.append(h)
        a = h @ W[name].transpose(-1, -2)
        pre_activations.append(a)
        h = memory.act.fn(a) if i < memory.depth - 1 else a
    prediction = keys + h if memory.residual else h
    deltas = [2 * (prediction - values)]  # d/df || f - v ||^2
    for i in range(memory.depth - 2, -1, -1):
        back = deltas[0] @ W[memory.names[i + 1]]
        deltas.insert(0, back * memory.act.derivative(pre_activations[i]))
    return inputs, deltas


def _squared_gradient_norms(inputs, deltas) -> Tensor:
    """||grad_W l_j||^2 over all layers for every token: the gradients are rank one, so ||delta z^T|| = |delta| |z|."""
    return sum(d.square().sum(-1) * z.square().sum(-1) for z, d in zip(inputs, deltas))


def _scaled_lr(lr: Tensor, inputs, deltas, max_grad_norm: float | None, normalize_chunk_lr: bool,
               overlap: Tensor | None = None) -> Tensor:
    """theta_t as the update applies it: divided by the chunk's causal overlap (`overlap`, else computed from the
    inputs) and scaled by the surprise clip factor."""
    if normalize_chunk_lr:
        lr = lr / (causal_overlap(inputs) if overlap is None else overlap)
    if max_grad_norm is not None:
        lr = lr * _clip_scale(_squared_gradient_norms(inputs, deltas), max_grad_norm)
    return lr


def _retrieve_in_chunk(memory: MLPMemory, W: Params, S: Params, queries: Tensor, inputs, deltas,
                       co: ChunkCoefficients, with_momentum: bool) -> Tensor:
    """y_i = f(W_i, q_i) for every token i of the chunk, without materialising W_i (dual form)."""
    h = queries
    for i, name in enumerate(memory.names):
        out = co.b.unsqueeze(-1) * (h @ W[name].transpose(-1, -2))
        if with_momentum:
            out = out + co.c.unsqueeze(-1) * (h @ S[name].transpose(-1, -2))
        scores = (h @ inputs[i].transpose(-1, -2)) * co.A  # (BH, C, C), lower triangular
        out = out - scores @ deltas[i]
        h = memory.act.fn(out) if i < memory.depth - 1 else out
    return queries + h if memory.residual else h


def _advance(memory: MLPMemory, W: Params, S: Params, inputs, deltas, end: ChunkCoefficients) -> tuple[Params, Params]:
    """W and S after the chunk's last token (Eq. 16 at the chunk end)."""
    new_W, new_S = {}, {}
    b, c, e = (x.unsqueeze(-1) for x in (end.b, end.c, end.e))
    for i, name in enumerate(memory.names):
        lhs_w = (deltas[i] * end.A.transpose(-1, -2)).transpose(-1, -2)
        lhs_s = (deltas[i] * end.Q.transpose(-1, -2)).transpose(-1, -2)
        # b W + c S - update accumulated in place into the fresh b W (no op saves it for backward): 3 weight-sized
        # temporaries fewer per layer, bitwise the out-of-place result. Not addcmul / baddbmm: their fused
        # multiply-adds round differently, which broke test_train's DDP-equals-one-process check (at 1e-5 after 3
        # steps; batch-invariant on their own, so the cause is not pinned down) and its loss-threshold check.
        new_W[name] = (b * W[name]).add_(c * S[name]).sub_(lhs_w @ inputs[i])
        new_S[name] = (e * S[name]).sub_(lhs_s @ inputs[i])
    return new_W, new_S


# --------------------------------------------------------------------------------------------- general path


def _per_token_grads(memory_fn: MemoryFn, W: Params, keys: Tensor, values: Tensor) -> Params:
    """grad_W l_j at the chunk-start weights for every token j: dict of (BH, C, *shape).
    Each (row, token) pair becomes a row of its own, so one torch.func.grad of the summed loss gives them all."""
    bh, c = keys.shape[:2]
    expanded = {k: w.unsqueeze(1).expand(bh, c, *w.shape[1:]).reshape(bh * c, *w.shape[1:]) for k, w in W.items()}

    def loss(params):
        return ((memory_fn(params, keys.reshape(bh * c, 1, -1)) - values.reshape(bh * c, 1, -1)) ** 2).sum()

    return {k: g.reshape(bh, c, *g.shape[1:]) for k, g in torch.func.grad(loss)(expanded).items()}


def _read_per_token(memory_fn: MemoryFn, weights: Params, queries: Tensor) -> Tensor:
    """f(W_i, q_i) with per-token weights (BH, C, *shape) and queries (BH, C, d)."""
    bh, c = queries.shape[:2]
    flat = {k: w.reshape(bh * c, *w.shape[2:]) for k, w in weights.items()}
    return memory_fn(flat, queries.reshape(bh * c, 1, -1)).reshape(bh, c, -1)


def _weights_at(co: ChunkCoefficients, W: Params, S: Params, grads: Params) -> Params:
    """W_i = b_i W_c + c_i S_c - sum_j A_ij G_j for the R rows of `co` (A: (BH, R, C)): dict of (BH, R, *shape).
    Materialised per token: the general path only."""
    out = {}
    for name, w in W.items():
        mixed = co.A @ grads[name].flatten(2)  # (BH, R, n)
        flat = co.b.unsqueeze(-1) * w.flatten(1).unsqueeze(1) + co.c.unsqueeze(-1) * S[name].flatten(1).unsqueeze(1)
        out[name] = (flat - mixed).reshape(*co.A.shape[:2], *w.shape[1:])
    return out


def _momentum_at_end(end: ChunkCoefficients, S: Params, grads: Params) -> Params:
    """S after the chunk's last token, S_C = E_C S_c - sum_j Q_Cj G_j (general path)."""
    return {name: (end.e * s.flatten(1) - (end.Q @ grads[name].flatten(2)).squeeze(1)).reshape(s.shape)
            for name, s in S.items()}


# --------------------------------------------------------------------------------------------- the op


def _check_inputs(keys, values, queries, lr, momentum, decay, chunk_size):
    if keys.dim() != 3 or values.dim() != 3 or queries.dim() != 3:
        raise ValueError(f"keys, values, queries must be (BH, T, d); got {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}, {tuple(queries.shape)}")
    bh, t = keys.shape[:2]
    if values.shape[:2] != (bh, t) or queries.shape[:2] != (bh, t):
        raise ValueError(f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and queries "
                         f"{tuple(queries.shape)} disagree in (BH, T)")
    for name, gate in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if gate is not None and gate.shape != (bh, t):
            raise ValueError(f"{name} must have shape (BH, T) = {(bh, t)}, got {tuple(gate.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _cat_pending(pending: PendingTokens | None, name: str, new: Tensor | None) -> Tensor | None:
    old = None if pending is None else getattr(pending, name)
    if pending is not None and (old is None) != (new is None):
        raise ValueError(f"streaming state was built {'with' if old is not None else 'without'} {name}, "
                         f"but this call passes {'no' if new is None else 'a'} {name} gate")
    if old is None or new is None:
        return new
    return torch.cat([old, new], dim=1)


def _chunk_step(memory_fn: MemoryFn, W: Params, S: Params, keys: Tensor, values: Tensor, queries: Tensor, lr: Tensor,
                products: GateProducts, max_grad_norm: float | None, complete: bool,
                normalize_chunk_lr: bool, last_only: bool = False) -> tuple[Tensor, Params, Params]:
    """One chunk: the retrievals of its tokens and, if the chunk is complete, W and S after it. last_only: `queries`
    (BH, 1, d) is the last token's alone, read with the closed form of its row (a decoding step)."""
    if isinstance(memory_fn, MLPMemory):
        inputs, deltas = _inner_gradient_factors(memory_fn, W, keys, values)
        co = products.coefficients(_scaled_lr(lr, inputs, deltas, max_grad_norm, normalize_chunk_lr))
        y = _retrieve_in_chunk(memory_fn, W, S, queries, inputs, deltas, co.last_row() if last_only else co,
                               products.eta is not None)
        if complete:
            W, S = _advance(memory_fn, W, S, inputs, deltas, co.last_row())
        return y, W, S
    grads = _per_token_grads(memory_fn, W, keys, values)
    if normalize_chunk_lr:
        lr = lr / causal_overlap([keys])
    if max_grad_norm is not None:
        lr = lr * _clip_scale(sum(g.flatten(2).square().sum(-1) for g in grads.values()), max_grad_norm)
    co = products.coefficients(lr)
    y = _read_per_token(memory_fn, _weights_at(co.last_row() if last_only else co, W, S, grads), queries)
    if complete:
        end = co.last_row()
        W, S = {k: w.squeeze(1) for k, w in _weights_at(end, W, S, grads).items()}, _momentum_at_end(end, S, grads)
    return y, W, S


AUTO_CHECKPOINT_BELOW = 16
"""`checkpoint_chunks="auto"` checkpoints chunk sizes below this (benchmarks/NOTES.md has the measurements)."""


def auto_checkpoint_chunks(chunk_size: int, n_chunks: int) -> int:
    """The group size `checkpoint_chunks="auto"` picks (0: off) for a scan of n_chunks chunks of chunk_size tokens.
    Without checkpointing, backward keeps every chunk's W and S (weight-sized) next to its token-sized
    intermediates: the weights dominate at small chunks. Checkpointing in groups of g keeps n / g boundary states and
    one group's intermediates at a time, least near g = sqrt(n), for one more forward pass of the op. The saving is in
    live tensors; glibc before 2.38 hardly reuses freed PyTorch blocks (bug 14581), so there the process's resident
    size falls less (the blocks the checkpointed forward pass frees stay resident) unless the allocator is jemalloc or
    the mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_=131072): benchmarks/NOTES.md."""
    if chunk_size >= AUTO_CHECKPOINT_BELOW or n_chunks < 4:
        return 0
    return math.ceil(math.sqrt(n_chunks))


def checkpoint_group(checkpoint_chunks: int | Literal["auto"] | None, chunk_size: int, n_chunks: int) -> int:
    """The group size (0: off) that `checkpoint_chunks` (0: off, n > 0: groups of n chunks, "auto" or None: the
    automatic rule) means for this scan."""
    if checkpoint_chunks is None or checkpoint_chunks == "auto":
        return auto_checkpoint_chunks(chunk_size, n_chunks)
    if isinstance(checkpoint_chunks, str) or int(checkpoint_chunks) != checkpoint_chunks or checkpoint_chunks < 0:
        raise ValueError(f"checkpoint_chunks must be 'auto' or an integer >= 0, got {checkpoint_chunks!r}")
    return int(checkpoint_chunks)


@functools.cache
def _compiled_chunk_step() -> Callable:
    """`_chunk_step` through torch.compile (inductor), built on first use. Every chunk of a scan has the same shapes,
    so one compiled graph serves them all (and every layer of a model): on CPU 1.6-1.8x faster training of the memory
    variants; a small model compiles in 1-2 minutes from a cold cache (benchmarks/NOTES.md). A new batch shape or grad
    mode compiles once more; from the second shape on, torch.compile compiles a dynamic-shape graph."""
    return torch.compile(_chunk_step)


def _chunk_group(memory_fn: MemoryFn, W: Params, S: Params, chunks: list, max_grad_norm: float | None,
                 normalize_chunk_lr: bool, compile_chunks: bool = False):
    """Consecutive chunks, (keys, values, queries, lr, products, complete) each: their retrievals, W and S after."""
    step = _compiled_chunk_step() if compile_chunks and isinstance(memory_fn, MLPMemory) else _chunk_step
    outputs = []
    for keys, values, queries, lr, products, complete in chunks:
        y, W, S = step(memory_fn, W, S, keys, values, queries, lr, products, max_grad_norm, complete,
                       normalize_chunk_lr)
        outputs.append(y)
    return torch.cat(outputs, dim=1), W, S


@torch.compiler.disable  # a compiled model graph-breaks here instead of unrolling the chunk loop (see compile_chunks)
def memory_scan(memory_fn: MemoryFn, params: Params, keys: Tensor, values: Tensor, queries: Tensor, lr: Tensor,
                momentum: Tensor | None, decay: Tensor | None, chunk_size: int,
                state: MemoryState | None = None, max_grad_norm: float | None = None,
                normalize_chunk_lr: bool = False,
                checkpoint_chunks: int | Literal["auto"] | None = "auto",
                compile_chunks: bool = False) -> tuple[Tensor, MemoryState]:
    """Store (keys, values) into the memory and read it with `queries`, token by token, with chunked gradients.

    memory_fn: f(params, x), a pure function of batched params (BH, ...) and inputs (BH, N, d), rows independent; an
        `MLPMemory` takes the fast dual-form path, anything else a general torch.func path (per-token gradients and
        weights materialised per chunk: simple, memory-hungry).
    params: the initial weights M_0 (dict of (BH, ...) tensors), used when `state` is None.
    keys, values, queries: (BH, T, d). lr (theta, >= 0), momentum (eta in [0, 1), None: no momentum) and decay (alpha in
        [0, 1], None: no forgetting): (BH, T).
    max_grad_norm: if set, each token's surprise gradient is scaled to norm <= max_grad_norm (a stabiliser that is
        not in the paper; None gives the paper's rule exactly).
    normalize_chunk_lr: divide theta_t by `causal_overlap` of its chunk (theta_t stays data-dependent and causal;
        nothing changes at chunk_size 1): one step-size bound then stays stable at any chunk size.
    checkpoint_chunks: activation checkpointing: with n > 0, backward recomputes each group of n chunks from its start
        state, so training holds the weights of every n-th chunk boundary only, instead of every chunk's
        intermediates (small chunks stay affordable). 0: off. "auto" (or None), the default: `auto_checkpoint_chunks`
        picks the group from the chunk size and the number of chunks (about sqrt(n_chunks) below chunk size
        AUTO_CHECKPOINT_BELOW, off from there on; off on the general path, whose torch.func.grad cannot run under
        checkpointing). Only when something requires grad.
    compile_chunks: run each chunk through `torch.compile` of the chunk step (`MLPMemory` only; same results up to
        rounding). The scan itself is never traced by torch.compile: unrolled into one graph, a layer's 16 chunks
        took 151 s to compile on CPU for no further speed, and a whole small model over 15 minutes.
    Returns the retrievals y_t = f(W_t, q_t) of shape (BH, T, d_v) and the state after the last token.
    """
    _check_inputs(keys, values, queries, lr, momentum, decay, chunk_size)
    state = state if state is not None else MemoryState.initial(params)
    rows = {w.shape[0] for w in state.weights.values()}
    if rows != {keys.shape[0]}:
        raise ValueError(f"the memory state holds {sorted(rows)} rows (batch x heads) but the inputs have "
                         f"{keys.shape[0]}: a state carries on only the batch it was built for")
    pending = state.pending
    offset = 0 if pending is None else len(pending)
    keys = _cat_pending(pending, "keys", keys)
    values = _cat_pending(pending, "values", values)
    lr = _cat_pending(pending, "lr", lr)
    momentum = _cat_pending(pending, "momentum", momentum)
    decay = _cat_pending(pending, "decay", decay)
    if offset:
        queries = torch.cat([queries.new_zeros(queries.shape[0], offset, queries.shape[2]), queries], dim=1)

    bh, total = keys.shape[:2]
    n_chunks = -(-total // chunk_size)
    padding = n_chunks * chunk_size - total

    def chunked(x: Tensor | None) -> Tensor | None:  # (BH, T, ...) -> (BH, n_chunks, C, ...), zero padded
        if x is None:
            return None
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, padding))
        return x.reshape(bh, n_chunks, chunk_size, *x.shape[2:])

    products = GateProducts.build(chunked(momentum), chunked(decay), like=chunked(lr)).unbind()
    ks, vs, qs, lrs = (chunked(x).unbind(1) for x in (keys, values, queries, lr))
    group = checkpoint_group(checkpoint_chunks, chunk_size, n_chunks)
    if not isinstance(memory_fn, MLPMemory) and checkpoint_chunks in ("auto", None):
        group = 0  # the general path's torch.func.grad refuses the saved-tensor hooks of checkpointing
    tensors = [*state.weights.values(), *state.momentum.values(), keys, values, queries, lr, momentum, decay]
    checkpointing = group > 0 and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    group = group if checkpointing else n_chunks
    W, S = state.weights, state.momentum
    outputs = []
    for first in range(0, n_chunks, group):
        chunks = [(ks[c], vs[c], qs[c], lrs[c], products[c], c < n_chunks - 1 or padding == 0)
                  for c in range(first, min(first + group, n_chunks))]
        if checkpointing:
            y, W, S = torch.utils.checkpoint.checkpoint(_chunk_group, memory_fn, W, S, chunks, max_grad_norm,
                                                        normalize_chunk_lr, compile_chunks, use_reentrant=False,
                                                        preserve_rng_state=False)  # the op draws no random numbers
        else:
            y, W, S = _chunk_group(memory_fn, W, S, chunks, max_grad_norm, normalize_chunk_lr, compile_chunks)
        outputs.append(y)

    retrieved = torch.cat(outputs, dim=1)[:, offset:total]
    new_pending = None
    if padding:
        start = (n_chunks - 1) * chunk_size
        tail = lambda x: None if x is None else x[:, start:]  # noqa: E731
        new_pending = PendingTokens(tail(keys), tail(values), tail(lr), tail(momentum), tail(decay))
    return retrieved, MemoryState(W, S, new_pending)


def memory_step(memory_fn: MemoryFn, key: Tensor, value: Tensor, query: Tensor, lr: Tensor, momentum: Tensor | None,
                decay: Tensor | None, chunk_size: int, state: MemoryState, max_grad_norm: float | None = None,
                normalize_chunk_lr: bool = False) -> tuple[Tensor, MemoryState]:
    """`memory_scan` of one token (key, value, query (BH, 1, d); gates (BH, 1)) continuing `state`, for decoding.
    On an MLPMemory it costs O(1) in the pending tokens: the token's gradient at the chunk-start weights (Eq. 16)
    advances the running S_t and W_t that the state carries (`_token_update`, the recurrences the chunk's closed form
    unrolls) and the token reads W_t directly; no padding, no chunk loop, nothing recomputed for the other pending
    tokens. Any other memory reads its row of the partial chunk's closed form, W_t = b_t W_c + c_t S_c - sum_j A_tj
    G_j. When the token completes the chunk, W_t and S_t start the next one. Equal to memory_scan up to rounding."""
    _check_inputs(key, value, query, lr, momentum, decay, chunk_size)
    if key.shape[1] != 1:
        raise ValueError(f"memory_step reads one token, got {key.shape[1]}")
    pending = state.pending
    keys, values = _cat_pending(pending, "keys", key), _cat_pending(pending, "values", value)
    lrs, momenta, decays = (_cat_pending(pending, name, x) for name, x in
                            (("lr", lr), ("momentum", momentum), ("decay", decay)))
    complete = keys.shape[1] == chunk_size
    if not isinstance(memory_fn, MLPMemory):
        y, W, S = _chunk_step(memory_fn, state.weights, state.momentum, keys, values, query, lrs,
                              GateProducts.build(momenta, decays, like=lrs), max_grad_norm, complete,
                              normalize_chunk_lr, last_only=True)
        pending = None if complete else PendingTokens(keys, values, lrs, momenta, decays)
        return y, MemoryState(W, S, pending)
    W_now, S_now, units = _running_values(memory_fn, state, max_grad_norm, normalize_chunk_lr)
    inputs, deltas = _inner_gradient_factors(memory_fn, state.weights, key, value)
    overlap = None
    if normalize_chunk_lr:  # the token's row of causal_overlap, against the pending tokens' unit inputs
        new = {name: torch.nn.functional.normalize(z, dim=-1) for name, z in zip(memory_fn.names, inputs)}
        units = new if units is None else {name: torch.cat([units[name], u], dim=1) for name, u in new.items()}
        overlap = torch.stack([(units[name] @ u.transpose(-1, -2)).abs().sum(1) for name, u in new.items()])
        overlap = overlap.amax(0).clamp(min=1)
    theta = _scaled_lr(lr, inputs, deltas, max_grad_norm, normalize_chunk_lr, overlap)
    W_now, S_now = _token_update(memory_fn, W_now, S_now, inputs, deltas, theta, momentum, decay)
    y = memory_fn(W_now, query)
    if complete:
        return y, MemoryState(W_now, S_now)
    return y, MemoryState(state.weights, state.momentum,
                          PendingTokens(keys, values, lrs, momenta, decays, W_now, S_now, units))


def _token_update(memory: MLPMemory, W: Params, S: Params, inputs, deltas, theta: Tensor, momentum: Tensor | None,
                  decay: Tensor | None) -> tuple[Params, Params]:
    """One token's S_t = eta_t S_{t-1} - theta_t G_t and W_t = (1 - alpha_t) W_{t-1} + S_t (Eqs. 13-14), its gradient
    G_t = delta_t z_t^T per layer taken at the chunk-start weights; gates (BH, 1)."""
    per_row = lambda g: g.unsqueeze(-1)  # noqa: E731  (BH, 1) -> (BH, 1, 1), against (BH, d_out, d_in) weights
    new_W, new_S = {}, {}
    for i, name in enumerate(memory.names):
        step = (per_row(theta) * deltas[i]).transpose(-1, -2) @ inputs[i]
        new_S[name] = -step if momentum is None else per_row(momentum) * S[name] - step
        new_W[name] = new_S[name] + (W[name] if decay is None else per_row(1 - decay) * W[name])
    return new_W, new_S


def _running_values(memory: MLPMemory, state: MemoryState, max_grad_norm: float | None,
                    normalize_chunk_lr: bool) -> tuple[Params, Params, Params | None]:
    """W_t, S_t after the state's pending tokens and their unit inputs (None without chunk normalisation): carried by
    a state `memory_step` made, else folded in once from the pending tokens (a state that `memory_scan` left
    mid-chunk)."""
    pending = state.pending
    if pending is None:
        return state.weights, state.momentum, None
    if pending.weights_now is not None and (pending.unit_inputs is not None or not normalize_chunk_lr):
        return pending.weights_now, pending.momentum_now, pending.unit_inputs
    inputs, deltas = _inner_gradient_factors(memory, state.weights, pending.keys, pending.values)
    theta = _scaled_lr(pending.lr, inputs, deltas, max_grad_norm, normalize_chunk_lr)
    end = GateProducts.build(pending.momentum, pending.decay, like=pending.lr).coefficients(theta).last_row()
    W, S = _advance(memory, state.weights, state.momentum, inputs, deltas, end)
    units = None
    if normalize_chunk_lr:
        units = {name: torch.nn.functional.normalize(z, dim=-1) for name, z in zip(memory.names, inputs)}
    return W, S, units


def current_weights(memory_fn: MemoryFn, state: MemoryState, max_grad_norm: float | None = None,
                    normalize_chunk_lr: bool = False) -> Params:
    """The weights after the last token seen, W_t (folds the pending tokens in; the state itself is unchanged)."""
    pending = state.pending
    if pending is None:
        return state.weights
    if pending.weights_now is not None:  # a decoding state carries them
        return pending.weights_now
    p = len(pending)
    _, advanced = memory_scan(memory_fn, state.weights, pending.keys, pending.values, pending.keys, pending.lr,
                              pending.momentum, pending.decay, chunk_size=p,
                              state=replace(state, pending=None), max_grad_norm=max_grad_norm,
                              normalize_chunk_lr=normalize_chunk_lr)
    return advanced.weights


def surprise_norms(memory_fn: MemoryFn, weights: Params, keys: Tensor, values: Tensor) -> Tensor:
    """||grad_W l(W; k_t, v_t)|| for every token (BH, T): the momentary surprise of Eq. 8 at the weights W."""
    if isinstance(memory_fn, MLPMemory):
        return _squared_gradient_norms(*_inner_gradient_factors(memory_fn, weights, keys, values)).sqrt()
    return sum(g.flatten(2).square().sum(-1) for g in _per_token_grads(memory_fn, weights, keys, values).values()).sqrt()


def memory_retrieve(memory_fn: MemoryFn, state: MemoryState, queries: Tensor, max_grad_norm: float | None = None,
                    normalize_chunk_lr: bool = False) -> Tensor:
    """y = f(W_t, q) for every query with the current weights: a read that stores nothing (M* in the paper)."""
    return memory_fn(current_weights(memory_fn, state, max_grad_norm, normalize_chunk_lr), queries)
