"""`TTT`: the TTT-Linear / TTT-MLP sequence-modeling layer (Sun et al. 2024), a baseline for Titans.

The hidden state is an inner model f(x; W) = x + LN(g(x; W)) trained online on the sequence itself (see
`titans.ops.ttt` for the inner loop). For input x_t (B, T, dim), per head:

    q_t = RoPE(theta_Q x_t),  k_t = RoPE(theta_K x_t),  v_t = theta_V x_t        test / train / label views
    l_t(W) = 1/2 || f(k_t; W) - v_t ||^2                                         self-supervised inner loss
    W_i = W^0 - sum_{j<=i} s_i lr_j grad l_j(W^0)                                mini-batch TTT (b tokens)
    lr_j = base_lr * sigmoid(x_j . w_lr + b_lr) / head_dim,  s_i = max(1/i + offset_i, 0)
    z_t = f(q_t; W_t)

then y = W_o (GELU(W_g x) * LayerNorm(z)) (the gate optional). RoPE uses the position inside the mini-batch
(t mod b), as the reference code does. Defaults follow the Transformer-backbone layer of the reference code
(`ttt_linear_base` / `ttt_mlp_base`: separate q/k/v projections, no convolution), plus the GELU output gate of their
Mamba-backbone layer; `gate=False` gives the Transformer-backbone layer exactly, and `conv_kernel > 0` the
Mamba-backbone projections (one shared q/k projection, then a causal depthwise convolution each for q and k).
Initialisation as published: projections, W1, W2 and the lr gate weights normal(0, 0.02), biases zero, LN scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import depthwise_conv
from .ops.ttt import (LN_EPS, TTTInnerState, ttt_current_weights, ttt_decode_state, ttt_decode_step, ttt_scan,
                       ttt_state_from_decode, ttt_step)


@dataclass
class TTTState:
    """Everything `TTT` needs to continue a sequence: the inner state (weights at the last mini-batch boundary and
    the pending tokens; their count is the position inside the current mini-batch) and, with convolutions, the last
    kernel_size - 1 inputs of each ('q', 'k')."""

    inner: TTTInnerState
    conv: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> "TTTState":
        return TTTState(self.inner.detach(), {k: v.detach() for k, v in self.conv.items()})


class _CausalConv(nn.Module):
    """Depthwise causal convolution over time (with bias); its input tail carries across calls."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=True)

    def forward(self, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[2])
        if x.shape[1] == 0:
            return x, tail
        padded = torch.cat([tail.to(x.dtype), x], dim=1)
        return depthwise_conv(self.conv, padded), padded[:, padded.shape[1] - (self.kernel_size - 1):]


def _rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """RoPE on adjacent pairs (x_{2m}, x_{2m+1}), angle position * theta^(-2m/d) (the reference's JAX layout)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    angles = positions.to(x.dtype).unsqueeze(-1) * freqs  # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class TTT(nn.Module):
    """TTT-Linear (inner="linear") or TTT-MLP (inner="mlp", hidden mlp_expansion * head_dim) over (B, T, dim)
    inputs; `forward(x, state) -> (y, state)`.

    Args:
        dim: model width. heads / head_dim: TTT heads (head_dim defaults to dim // heads).
        chunk_size: b, the mini-batch: tokens per inner gradient step (16 in the paper).
        base_lr: eta_base of the inner learning rate (the paper: 1.0 for TTT-Linear, 0.1 for TTT-MLP).
        rope / rope_theta: rotary embedding of q and k by position inside the mini-batch.
        gate: multiply the post-norm output by GELU(W_g x) (Mamba-backbone layer; off in the Transformer backbone).
        conv_kernel: 0: separate q, k projections (Transformer backbone); > 0: a shared q/k projection followed by
            a causal depthwise convolution of this width for each (Mamba backbone).
        init_std: std of the normal initialisation of the projections, W_0 and the lr gate.
        compile_chunks: run each mini-batch of `ttt_scan` through torch.compile (decoding stays eager).
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int | None = None,
                 inner: Literal["linear", "mlp"] = "linear", chunk_size: int = 16, base_lr: float = 1.0,
                 mlp_expansion: int = 4, rope: bool = True, rope_theta: float = 10000.0, gate: bool = True,
                 conv_kernel: int = 0, init_std: float = 0.02, compile_chunks: bool = False):
        super().__init__()
        head_dim = head_dim if head_dim is not None else dim // max(heads, 1)
        if dim < 1 or heads < 1 or head_dim < 1:
            raise ValueError(f"dim, heads and head_dim must be positive, got {dim}, {heads}, {head_dim}")
        if inner not in ("linear", "mlp"):
            raise ValueError(f"inner must be 'linear' or 'mlp', got {inner!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.dim, self.heads, self.head_dim, self.inner = dim, heads, head_dim, inner
        self.chunk_size, self.base_lr, self.rope, self.rope_theta = chunk_size, base_lr, rope, rope_theta
        self.compile_chunks = compile_chunks
        width = heads * head_dim
        # views theta_Q, theta_K, theta_V (and the Mamba-backbone variant's convolutions)
        self.q_proj = nn.Linear(dim, width, bias=False)
        self.k_proj = nn.Linear(dim, width, bias=False) if conv_kernel == 0 else None
        self.v_proj = nn.Linear(dim, width, bias=False)
        self.convs = nn.ModuleDict(
            {name: _CausalConv(width, conv_kernel) for name in ("q", "k")} if conv_kernel > 0 else {})
        # inner learning rate gate, one per head: lr_t = base_lr * sigmoid(x_t . w + b) / head_dim
        self.lr_weight = nn.Parameter(torch.randn(heads, dim) * init_std)
        self.lr_bias = nn.Parameter(torch.zeros(heads))
        # token scale s_i = 1/i + learnable offset (clamped >= 0)
        self.token_idx_offset = nn.Parameter(torch.zeros(chunk_size))
        # W_0 per head, and the inner LayerNorm
        hidden = mlp_expansion * head_dim if inner == "mlp" else head_dim
        self.W1 = nn.Parameter(torch.randn(heads, head_dim, hidden) * init_std)
        self.b1 = nn.Parameter(torch.zeros(heads, hidden))
        if inner == "mlp":
            self.W2 = nn.Parameter(torch.randn(heads, hidden, head_dim) * init_std)
            self.b2 = nn.Parameter(torch.zeros(heads, head_dim))
        self.ln_weight = nn.Parameter(torch.ones(heads, head_dim))
        self.ln_bias = nn.Parameter(torch.zeros(heads, head_dim))
        # output: post-norm, optional GELU gate, projection
        self.post_norm = nn.LayerNorm(width, eps=LN_EPS)
        self.g_proj = nn.Linear(dim, width, bias=False) if gate else None
        self.o_proj = nn.Linear(width, dim, bias=False)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj):
            if linear is not None:
                nn.init.normal_(linear.weight, std=init_std)

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def param_names(self) -> list[str]:
        return ["W1", "b1", "W2", "b2"] if self.inner == "mlp" else ["W1", "b1"]

    def _rows(self, p: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """A per-head tensor (heads, ...) repeated for every batch element: (batch * heads, ...)."""
        return p.to(dtype).unsqueeze(0).expand(batch, *p.shape).reshape(batch * self.heads, *p.shape[1:])

    def initial_state(self, batch: int, dtype: torch.dtype = torch.float32) -> TTTState:
        return TTTState(TTTInnerState({n: self._rows(getattr(self, n), batch, dtype) for n in self.param_names}))

    def token_scale(self, dtype: torch.dtype = torch.float32) -> Tensor:
        offset = self.token_idx_offset.to(dtype)
        first = 1.0 / torch.arange(1, self.chunk_size + 1, dtype=dtype, device=offset.device)
        return (first + offset).clamp_min(0)

    def _heads(self, h: Tensor) -> Tensor:  # (B, T, heads * head_dim) -> (B * heads, T, head_dim)
        b, t, _ = h.shape
        return h.view(b, t, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, t, self.head_dim)

    def _views(self, x: Tensor, state: TTTState) -> tuple[Tensor, Tensor, Tensor]:
        """The test, train and label views, (B * heads, T, head_dim) each, before RoPE."""
        if self.convs:
            shared = self.q_proj(x)
            q, state.conv["q"] = self.convs["q"](shared, state.conv.get("q"))
            k, state.conv["k"] = self.convs["k"](shared, state.conv.get("k"))
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        return self._heads(q), self._heads(k), self._heads(self.v_proj(x))

    def _check(self, x: Tensor, state: TTTState | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TTT expects input of shape (batch, time, {self.dim}), got {tuple(x.shape)}")
        if state is not None:
            rows = state.inner.weights["W1"].shape[0]
            if rows != x.shape[0] * self.heads:
                raise ValueError(f"the TTT state was built for batch {rows // self.heads}, got batch {x.shape[0]}: "
                                 f"a state carries on only the batch it was built for")

    # ------------------------------------------------------------------------------------------------ API

    def forward(self, x: Tensor, state: TTTState | None = None) -> tuple[Tensor, TTTState]:
        """z_t = f(q_t; W_t) for every token (W_t after the gradient steps of tokens <= t of its mini-batch), then
        post-norm, gate and output projection. The inner loop runs in fp32 (fp64 for fp64 input), even under
        autocast."""
        return self._mix(x, state, "forward")

    def step(self, x: Tensor, state: TTTState | None) -> tuple[Tensor, TTTState]:
        """`forward` of one token x (B, 1, dim), for decoding: the inner loop is `ttt_step` (the token joins the
        pending mini-batch and reads its own row of the dual form) instead of `ttt_scan`."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"TTT.step reads one token, got x of shape {tuple(x.shape)}")
        return self._mix(x, state, "step")

    # Fixed-shape decoding (`titans.decoding`): the pending mini-batch in buffers (`ttt_decode_state`).
    def decode_state(self, state: TTTState, capacity: int) -> TTTState:
        return TTTState(ttt_decode_state(state.inner, self.chunk_size), dict(state.conv))

    def decode_step(self, x: Tensor, state: TTTState) -> tuple[Tensor, TTTState]:
        return self._mix(x, state, "decode_step")

    def state_from_decode(self, state: TTTState) -> TTTState:
        return TTTState(ttt_state_from_decode(state.inner), dict(state.conv))

    def _mix(self, x: Tensor, state: TTTState | None, mode: str) -> tuple[Tensor, TTTState]:
        """mode: "forward" (the chunked scan), "step" (`ttt_step`) or "decode_step" (on a `decode_state`)."""
        self._check(x, state)
        dtype = torch.promote_types(x.dtype, torch.float32)
        batch = x.shape[0]
        state = self.initial_state(batch, dtype) if state is None else TTTState(state.inner, dict(state.conv))
        q, k, v = self._views(x, state)
        lr = self.base_lr * torch.sigmoid(x @ self.lr_weight.to(x.dtype).t() + self.lr_bias.to(x.dtype))
        lr = (lr / self.head_dim).transpose(1, 2).reshape(batch * self.heads, x.shape[1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, lr = q.to(dtype), k.to(dtype), v.to(dtype), lr.to(dtype)
            if self.rope:  # position inside the current mini-batch
                filled = state.inner.filled if mode == "decode_step" else len(state.inner)
                positions = (filled + torch.arange(x.shape[1], device=x.device)) % self.chunk_size
                q, k = _rotate(q, positions, self.rope_theta), _rotate(k, positions, self.rope_theta)
            ln = self._rows(self.ln_weight, batch, dtype), self._rows(self.ln_bias, batch, dtype)
            if mode == "decode_step":
                z, state.inner = ttt_decode_step(*ln, q, k, v, lr, self.token_scale(dtype), state.inner)
            elif mode == "step":
                z, state.inner = ttt_step(*ln, q, k, v, lr, self.token_scale(dtype), self.chunk_size, state.inner)
            else:
                z, state.inner = ttt_scan(state.inner.weights, *ln, q, k, v, lr, self.token_scale(dtype),
                                          self.chunk_size, state=state.inner, compile_chunks=self.compile_chunks)
        t, width = x.shape[1], self.heads * self.head_dim
        y = z.reshape(batch, self.heads, t, self.head_dim).transpose(1, 2).reshape(batch, t, width).to(x.dtype)
        y = self.post_norm(y)
        if self.g_proj is not None:
            y = F.gelu(self.g_proj(x), approximate="tanh") * y
        return self.o_proj(y), state

    def current_weights(self, state: TTTState) -> dict[str, Tensor]:
        """The inner weights after the last token of `state`, per (batch * head) row."""
        dtype = state.inner.weights["W1"].dtype
        batch = state.inner.weights["W1"].shape[0] // self.heads
        return ttt_current_weights(state.inner, self._rows(self.ln_weight, batch, dtype),
                                   self._rows(self.ln_bias, batch, dtype), self.token_scale(dtype))
