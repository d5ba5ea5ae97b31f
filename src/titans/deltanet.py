"""Baselines DeltaNet (Yang, Wang, Shen, Panda and Kim 2024, "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length") and Gated DeltaNet (Yang, Kautz and Hatamizadeh 2024, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"), as published (layout of flash-linear-attention's `DeltaNet` / `GatedDeltaNet` layers).

x -> q, k, v (linear, short causal depthwise convolution, SiLU; q and k L2-normalised per head, q scaled by
1 / sqrt(d_k)) -> the (gated) delta rule S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t
(DeltaNet Eq. 1-2, a_t = 1; GDN Eq. 10) -> per-head RMSNorm times a SiLU gate from x -> output projection.
beta_t = sigmoid(W_beta x_t) per head. GDN's decay a_t = exp(-exp(A_log) softplus(W_a x_t + dt_bias)) per head, with
Mamba-2's initialisation: A = exp(A_log) ~ U(0, 16), softplus(dt_bias) log-uniform in [1e-3, 0.1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import CausalDepthwiseConv
from .ops.delta_rule import delta_rule_chunked, delta_rule_reference


@dataclass
class DeltaNetState:
    """Everything `DeltaNet` needs to continue a sequence: the fast-weight state S (B, heads, d_v, d_k) and the
    convolution tails of the q, k and v paths (keys 'q', 'k', 'v')."""

    S: Tensor
    conv: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> "DeltaNetState":
        return DeltaNetState(self.S.detach(), {name: tail.detach() for name, tail in self.conv.items()})


def _l2_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class DeltaNet(nn.Module):
    """DeltaNet (gated=False) or Gated DeltaNet (gated=True) over (B, T, dim) inputs; `forward(x, state) -> (y, state)`.

    Args:
        dim: model width. heads: number of heads. head_dim: d_k per head (default dim // heads).
        gated: add GDN's data-dependent decay alpha_t (else DeltaNet, alpha_t = 1).
        conv_kernel: kernel of the short causal convolutions on q, k, v (0: none; SiLU is applied either way).
        chunk_size: chunk length of the exact chunked (WY) form of the recurrence; it does not change the result.
        expand_v: d_v = head_dim * expand_v. DeltaNet publishes 1.0; GDN publishes 2.0 with heads * head_dim =
            0.75 dim (so that the layer has ~6 dim^2 parameters, like Mamba-2); the default here is 1.0.
        output_gate: the SiLU output gate after the per-head RMSNorm. GDN's default; fla's DeltaNet layer defaults
            to no gate (RMSNorm only).
        norm_eps: epsilon of the output RMSNorm.
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int | None = None, gated: bool = False,
                 conv_kernel: int = 4, chunk_size: int = 16, expand_v: float = 1.0, output_gate: bool = True,
                 norm_eps: float = 1e-5):
        super().__init__()
        if dim < 1 or heads < 1:
            raise ValueError(f"dim and heads must be positive, got dim={dim}, heads={heads}")
        head_dim = head_dim if head_dim is not None else dim // heads
        head_v_dim = int(round(head_dim * expand_v))
        if head_dim < 1 or head_v_dim < 1 or not math.isclose(head_dim * expand_v, head_v_dim):
            raise ValueError(f"need positive integer head dims, got head_dim={head_dim}, expand_v={expand_v}")
        if chunk_size < 1 or conv_kernel < 0:
            raise ValueError(f"need chunk_size >= 1 and conv_kernel >= 0, got {chunk_size}, {conv_kernel}")
        self.dim, self.heads, self.head_dim, self.head_v_dim = dim, heads, head_dim, head_v_dim
        self.gated, self.chunk_size = gated, chunk_size
        key_dim, value_dim = heads * head_dim, heads * head_v_dim
        self.to_q = nn.Linear(dim, key_dim, bias=False)
        self.to_k = nn.Linear(dim, key_dim, bias=False)
        self.to_v = nn.Linear(dim, value_dim, bias=False)
        self.convs = nn.ModuleDict(
            {name: CausalDepthwiseConv(width, conv_kernel) for name, width in
             (("q", key_dim), ("k", key_dim), ("v", value_dim))} if conv_kernel > 0 else {})
        self.to_beta = nn.Linear(dim, heads, bias=False)
        if gated:
            self.to_decay = nn.Linear(dim, heads, bias=False)
            A = torch.empty(heads).uniform_(0, 16).clamp_min(1e-4)
            self.A_log = nn.Parameter(torch.log(A))
            dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1))).clamp_min(1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)
            self.A_log.no_weight_decay = True
            self.dt_bias.no_weight_decay = True
        self.norm = nn.RMSNorm(head_v_dim, eps=norm_eps)
        self.to_gate = nn.Linear(dim, value_dim, bias=False) if output_gate else None
        self.to_out = nn.Linear(value_dim, dim, bias=False)

    def initial_state(self, batch: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | None = None) -> DeltaNetState:
        return DeltaNetState(torch.zeros(batch, self.heads, self.head_v_dim, self.head_dim, dtype=dtype,
                                         device=device))

    def _project(self, x: Tensor, name: str, conv: dict[str, Tensor]) -> Tensor:
        """Linear -> causal depthwise conv -> SiLU, split into heads: (B, heads, T, d)."""
        h = getattr(self, f"to_{name}")(x)
        if name in self.convs:
            h, conv[name] = self.convs[name](h, conv.get(name))
        b, t, _ = h.shape
        return F.silu(h).view(b, t, self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, state: DeltaNetState | None = None) -> tuple[Tensor, DeltaNetState]:
        return self._mix(x, state, step=False)

    def step(self, x: Tensor, state: DeltaNetState | None) -> tuple[Tensor, DeltaNetState]:
        """`forward` of one token x (B, 1, dim), for decoding: the recurrence's one step (`delta_rule_reference`)
        instead of the chunked form."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"DeltaNet.step reads one token, got x of shape {tuple(x.shape)}")
        return self._mix(x, state, step=True)

    # Fixed-shape decoding (`titans.decoding`): the state (S and the convolution tails) never changes shape.
    def decode_state(self, state: DeltaNetState, capacity: int) -> DeltaNetState:
        return state

    def decode_step(self, x: Tensor, state: DeltaNetState) -> tuple[Tensor, DeltaNetState]:
        return self.step(x, state)

    def state_from_decode(self, state: DeltaNetState) -> DeltaNetState:
        return state

    def _mix(self, x: Tensor, state: DeltaNetState | None, step: bool) -> tuple[Tensor, DeltaNetState]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"DeltaNet expects input of shape (batch, time, {self.dim}), got {tuple(x.shape)}")
        if state is not None and state.S.shape[0] != x.shape[0]:
            raise ValueError(f"the state was built for batch {state.S.shape[0]}, got batch {x.shape[0]}")
        b, t, _ = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)  # the recurrence runs in fp32 (or fp64) under autocast
        if t == 0:  # nothing to read or store: the state is unchanged
            return x.new_zeros(x.shape), state if state is not None else self.initial_state(b, dtype, x.device)
        conv = {} if state is None else dict(state.conv)
        q, k, v = (self._project(x, name, conv) for name in ("q", "k", "v"))
        beta_logits = self.to_beta(x)
        decay_logits = self.to_decay(x) if self.gated else None
        gate = self.to_gate(x) if self.to_gate is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = _l2_normalise(q.to(dtype)) * self.head_dim ** -0.5
            k = _l2_normalise(k.to(dtype))
            beta = torch.sigmoid(beta_logits.to(dtype)).transpose(1, 2)            # (B, heads, T)
            log_decay = None
            if decay_logits is not None:
                # g_t = -A softplus(W_a x_t + dt_bias) <= 0, alpha_t = exp(g_t)
                log_decay = (-self.A_log.to(dtype).exp()
                             * F.softplus(decay_logits.to(dtype) + self.dt_bias.to(dtype))).transpose(1, 2)
            initial = None if state is None else state.S
            if step:
                o, S = delta_rule_reference(q, k, v.to(dtype), beta, log_decay, initial)
            else:
                o, S = delta_rule_chunked(q, k, v.to(dtype), beta, log_decay, self.chunk_size, initial)
            o = F.rms_norm(o.transpose(1, 2), (self.head_v_dim,), self.norm.weight.to(dtype), self.norm.eps)
            if gate is not None:
                o = o * F.silu(gate.to(o.dtype).view(b, t, self.heads, self.head_v_dim))
        return self.to_out(o.reshape(b, t, -1).to(x.dtype)), DeltaNetState(S, conv)
