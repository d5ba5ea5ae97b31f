"""The (gated) delta rule of DeltaNet and Gated DeltaNet: a naive per-token reference and the exact chunked form.

Per batch row and head, with state S (d_v x d_k), S_0 = 0 unless an initial state is given:

    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    o_t = S_t q_t,

with a_t = exp(g_t), g_t <= 0 the log decay (a_t = 1 without a gate: DeltaNet, Yang et al. 2024, Eq. 1-2; with a
gate: Gated DeltaNet, Yang, Kautz and Hatamizadeh 2024, Eq. 10). Token t reads S_t, after its own update.

Both functions take q, k (B, H, T, d_k), v (B, H, T, d_v), beta (B, H, T), log_decay (B, H, T) or None and
initial_state (B, H, d_v, d_k) or None, and return (o (B, H, T, d_v), S_T (B, H, d_v, d_k)). Neither normalises or
scales q and k: the caller L2-normalises them and scales q (DeltaNet and Gated DeltaNet use 1 / sqrt(d_k)). The
recurrence is exact for any chunking, so a stream continues by passing the returned state as `initial_state`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None,
           initial_state: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, H, T, d_k) and v (B, H, T, d_v), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"expected beta of shape {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    if log_decay is not None and log_decay.shape != q.shape[:3]:
        raise ValueError(f"expected log_decay of shape {tuple(q.shape[:3])}, got {tuple(log_decay.shape)}")
    expected = (*q.shape[:2], v.shape[-1], q.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"expected initial_state of shape {expected}, got {tuple(initial_state.shape)}")


def _initial(q: Tensor, v: Tensor, initial_state: Tensor | None) -> Tensor:
    if initial_state is None:
        return q.new_zeros(*q.shape[:2], v.shape[-1], q.shape[-1])
    return initial_state.to(q.dtype)


def delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None = None,
                         initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence token by token, written for clarity (the reference the chunked form is tested against)."""
    _check(q, k, v, beta, log_decay, initial_state)
    state = _initial(q, v, initial_state)
    outputs = []
    for t in range(q.shape[2]):
        k_t, v_t, q_t, beta_t = k[:, :, t], v[:, :, t], q[:, :, t], beta[:, :, t, None]
        if log_decay is not None:
            state = torch.exp(log_decay[:, :, t, None, None]) * state              # a_t S_{t-1}
        error = torch.einsum("bhvk,bhk->bhv", state, k_t) - v_t                     # a_t S_{t-1} k_t - v_t
        state = state - torch.einsum("bhv,bhk->bhvk", beta_t * error, k_t)          # one delta-rule step
        outputs.append(torch.einsum("bhvk,bhk->bhv", state, q_t))                   # o_t = S_t q_t
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return o, state


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None = None,
                       chunk_size: int = 16, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The same recurrence, chunk by chunk, through the WY/UT representation (DeltaNet Section 3; GDN Section 3.3).

    Within a chunk starting from state S, with G_t the cumulative log decay from the chunk start to token t and
    Gamma_tj = exp(G_t - G_j) for j <= t, the "new values" u_t = beta_t (v_t - a_t S_{t-1} k_t) satisfy
        (I + A) U = diag(beta) V - diag(beta e^G) K S^T,    A = StrictTril(diag(beta) K K^T (.) Gamma),
    so with the unit lower-triangular solve T = (I + A)^{-1}:  U = T diag(beta) V - T diag(beta e^G) K S^T, and
        O = diag(e^G) Q S^T + Tril(Q K^T (.) Gamma) U,     S <- e^{G_C} S + U^T diag(e^{G_C - G}) K.
    Everything but the state is computed for all chunks at once; a last partial chunk is padded with identity
    tokens (beta = 0, g = 0), which leave the state unchanged, and their outputs are dropped.
    """
    _check(q, k, v, beta, log_decay, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    state = _initial(q, v, initial_state)
    b, h, length, d_k = q.shape
    d_v = v.shape[-1]
    if length == 0:
        return v.new_zeros(v.shape), state
    c = min(chunk_size, length)
    pad = -length % c
    if log_decay is None:
        log_decay = beta.new_zeros(beta.shape)
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta, log_decay = (torch.nn.functional.pad(x, (0, pad)) for x in (beta, log_decay))
    n = (length + pad) // c
    q, k, v = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    beta, g = beta.reshape(b, h, n, c), log_decay.reshape(b, h, n, c).cumsum(-1)  # G_t within each chunk

    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()            # j <= t
    # log Gamma_tj = G_t - G_j, set to -inf above the diagonal before exp (there it could overflow).
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    strict = (k @ k.transpose(-1, -2)) * decay * beta[..., :, None]
    strict = strict.masked_fill(~causal.tril(-1), 0.0)                              # strictly lower: j < t
    rhs = torch.cat([beta[..., None] * v, (beta * g.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(eye + strict, rhs, upper=False, unitriangular=True)
    u_free, w = solved[..., :d_v], solved[..., d_v:]                                # T beta V, T beta e^G K
    scores = (q @ k.transpose(-1, -2)) * decay                                      # Tril(Q K^T (.) Gamma)
    q_decayed = g.exp()[..., None] * q                                              # diag(e^G) Q
    k_to_end = (g[..., -1:] - g).exp()[..., None] * k                               # diag(e^{G_C - G}) K
    chunk_decay = g[..., -1].exp()[..., None, None]                                 # e^{G_C}

    outputs = []
    for i in range(n):
        u = u_free[:, :, i] - w[:, :, i] @ state.transpose(-1, -2)
        outputs.append(q_decayed[:, :, i] @ state.transpose(-1, -2) + scores[:, :, i] @ u)
        state = chunk_decay[:, :, i] * state + u.transpose(-1, -2) @ k_to_end[:, :, i]
    o = torch.stack(outputs, dim=2).reshape(b, h, n * c, d_v)[:, :, :length]
    return o, state
