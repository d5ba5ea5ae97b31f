"""Naive float64 references of every sequence mixer and of the whole TitansLM, written straight from the equations
(Titans Section 4, Eqs. 21-31; DeltaNet, Gated DeltaNet and TTT as published) and independent of the production
modules: they read a module's weights, take the shape of the model from its `TitansConfig`, and recompute everything
else themselves, token by token where that is clearer: projections, the causal depthwise convolutions, SiLU, L2
norms, per-head RMSNorm, the output gates, RoPE, softmax attention with an explicit list of the keys each position
sees (sliding window, persistent tokens), MAC's segments. The recurrences come from the ops' own naive token loops
(`memory_scan_reference`, `delta_rule_reference`, `ttt_reference`), which have their own tests.

Slow (Python loops over positions); for tests at tiny sizes only. Every function takes (B, T, dim) float64 inputs
and the whole sequence from its start: streaming is checked by comparing pieces run through production against one
run of the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from titans.ops import delta_rule_reference, memory_scan_reference, ttt_reference

# --------------------------------------------------------------------------------------------- elementwise pieces


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T (+ b) for a torch-layout weight (out, in)."""
    y = torch.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


def sigmoid(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x: Tensor) -> Tensor:
    return x * sigmoid(x)


def softplus(x: Tensor) -> Tensor:
    return torch.where(x > 20, x, torch.log1p(torch.exp(x.clamp(max=20))))  # torch's threshold 20


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def l2_normalise(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / max(||x||, eps) over the last axis."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float | None = None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (eps None: the dtype's machine epsilon, as torch)."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Depthwise causal convolution of x (B, T, C) with a Conv1d weight (C, 1, K): y_t = sum_j w_j x_{t-K+1+j} (+ b),
    inputs before the sequence start being zero."""
    kernel = weight.shape[-1]
    y = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(kernel):
            source = t - (kernel - 1) + j
            if source >= 0:
                y[:, t] = y[:, t] + weight[:, 0, j] * x[:, source]
    return y if bias is None else y + bias


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, heads * d) -> (B, T, heads, d)."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def rope_rotate_half(x: Tensor, position: float, base: float = 10000.0) -> Tensor:
    """RoPE, "rotate-half" layout: channels i and i + d/2 are rotated by position * base^(-2i/d). x (..., d)."""
    d = x.shape[-1]
    i = torch.arange(d // 2, dtype=x.dtype)
    angle = position * base ** (-2 * i / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * torch.cos(angle) - x2 * torch.sin(angle), x1 * torch.sin(angle) + x2 * torch.cos(angle)], -1)


def rope_adjacent(x: Tensor, position: float, base: float = 10000.0) -> Tensor:
    """RoPE on adjacent pairs (x_2m, x_2m+1) rotated by position * base^(-2m/d) (TTT's layout). x (..., d)."""
    d = x.shape[-1]
    out = x.clone()
    for m in range(d // 2):
        angle = torch.tensor(position * base ** (-2 * m / d), dtype=x.dtype)
        a, b = x[..., 2 * m], x[..., 2 * m + 1]
        out[..., 2 * m] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., 2 * m + 1] = a * torch.sin(angle) + b * torch.cos(angle)
    return out


def softmax_attend(q: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
    """One query q (B, H, d) over the listed keys/values (each (B, H, d)): softmax(q.k / sqrt(d)) written out."""
    scores = torch.stack([(q * k).sum(-1) for k in keys], -1) / math.sqrt(q.shape[-1])  # (B, H, N)
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
    weights = weights / weights.sum(-1, keepdim=True)
    return sum(weights[..., n, None] * v for n, v in enumerate(values))


# --------------------------------------------------------------------------------------------- attention


def attention_reference(attention, x: Tensor, window: int | None, rope: bool,
                        prefix: Tensor | None = None) -> Tensor:
    """Causal multi-head self-attention (a CausalSelfAttention's weights). Position t sees positions t - window + 1
    .. t (all of 0 .. t when window is None) and every persistent token: the attention's own learned ones, or
    `prefix` (B, n, dim) in their place, projected by the same key/value maps without RoPE. RoPE by absolute
    position."""
    assert attention.query_norm is None, "the references cover attention without qk-norm"
    batch, length, _ = x.shape
    heads = attention.heads
    q = split_heads(linear(x, attention.query.weight), heads)  # (B, T, H, d)
    k = split_heads(linear(x, attention.key.weight), heads)
    v = split_heads(linear(x, attention.value.weight), heads)
    if rope:
        q = torch.stack([rope_rotate_half(q[:, t], t) for t in range(length)], 1)
        k = torch.stack([rope_rotate_half(k[:, t], t) for t in range(length)], 1)
    persistent = prefix
    if persistent is None and attention.persistent is not None:
        persistent = attention.persistent.unsqueeze(0).expand(batch, -1, -1)
    pk, pv = [], []
    if persistent is not None:
        pk = list(split_heads(linear(persistent, attention.key.weight), heads).unbind(1))
        pv = list(split_heads(linear(persistent, attention.value.weight), heads).unbind(1))
    outputs = []
    for t in range(length):
        visible = [j for j in range(t + 1) if window is None or j > t - window]
        outputs.append(softmax_attend(q[:, t], pk + [k[:, j] for j in visible], pv + [v[:, j] for j in visible]))
    y = torch.stack(outputs, 1).flatten(2)  # (B, T, H * d)
    return linear(y, attention.out.weight)


# --------------------------------------------------------------------------------------------- neural memory (LMM)


def _memory_heads(config) -> int:
    return config.memory_heads or config.heads


def _mlp(memory, weights: dict[str, Tensor], x: Tensor) -> Tensor:
    """f(W, x) of the memory MLP per row (BH, N, d): W_L silu(... silu(W_1 x))."""
    assert memory.memory.activation == "silu" and not memory.memory.residual
    names = sorted(weights)
    h = x
    for i, name in enumerate(names):
        h = torch.einsum("boi,bni->bno", weights[name], h)
        if i < len(names) - 1:
            h = silu(h)
    return h


def _memory_view(memory, config, x: Tensor, name: str) -> Tensor:
    """Linear -> causal depthwise conv (if on) -> SiLU, per head as rows (B * H, T, d); q and k L2-normalised."""
    batch, length, _ = x.shape
    heads = _memory_heads(config)
    h = linear(x, getattr(memory, f"to_{name}").weight)
    if config.memory_conv:
        h = causal_conv(h, memory.convs[name].conv.weight)
    h = silu(h)
    h = split_heads(h, heads).permute(0, 2, 1, 3).reshape(batch * heads, length, -1)
    return l2_normalise(h) if name in ("q", "k") else h


def _memory_rows(memory, config, batch: int) -> dict[str, Tensor]:
    """M_0 per (batch, head) row."""
    heads = _memory_heads(config)
    return {name: w.unsqueeze(0).expand(batch, *w.shape).reshape(batch * heads, *w.shape[1:])
            for name, w in memory.initial_weights.items()}


def _memory_output(memory, config, retrieved: Tensor, x: Tensor) -> Tensor:
    """Per-head RMSNorm of the retrieval, times silu(W_gate x), then the output projection (Section 4.4)."""
    batch, length, _ = x.shape
    heads = _memory_heads(config)
    y = rms_norm(retrieved.reshape(batch, heads, length, -1), memory.norm.weight, memory.norm.eps)
    y = y.permute(0, 2, 1, 3).reshape(batch, length, -1)
    return linear(y * silu(linear(x, memory.to_gate.weight)), memory.to_out.weight)


def memory_reference(memory, config, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The neural memory over x from M_0 (Sections 3.1-3.2): store k_t -> v_t, token t reads M_t(q_t). Returns the
    layer's outputs (B, T, dim) and the memory's weights after the last token (per row)."""
    batch, length, _ = x.shape
    heads = _memory_heads(config)
    q, k, v = (_memory_view(memory, config, x, name) for name in ("q", "k", "v"))

    def gate(linear_layer):  # sigmoid(W x + b), one per head and token: (B * H, T)
        return sigmoid(linear(x, linear_layer.weight, linear_layer.bias)).permute(0, 2, 1).reshape(batch * heads,
                                                                                                  length)

    theta = config.max_lr * gate(memory.to_lr)
    eta = gate(memory.to_momentum) if config.momentum else None
    alpha = gate(memory.to_decay) if config.forgetting else None
    retrieved, weights, _ = memory_scan_reference(
        memory.memory, _memory_rows(memory, config, batch), k, v, q, theta, eta, alpha, config.chunk_size,
        max_grad_norm=config.max_grad_norm, normalize_chunk_lr=config.normalize_chunk_lr)
    return _memory_output(memory, config, retrieved, x), weights


def _with_persistent(persistent, x: Tensor) -> Tensor:
    """[p] || x (Section 3.3)."""
    if persistent is None:
        return x
    return torch.cat([persistent.unsqueeze(0).expand(x.shape[0], -1, -1), x], 1)


def _n(persistent) -> int:
    return 0 if persistent is None else persistent.shape[0]


def lmm_reference(mixer, config, x: Tensor) -> Tensor:
    """LMM: M([p] || x), the persistent positions' outputs dropped."""
    n = _n(mixer.persistent)
    return memory_reference(mixer.memory, config, _with_persistent(mixer.persistent, x))[0][:, n:]


# --------------------------------------------------------------------------------------------- Titans hybrids


def mag_reference(mixer, config, x: Tensor) -> Tensor:
    """MAG (Eqs. 26-28): y = SW-Attn*([p] || x) (the persistent tokens visible to all); m = M([p] || x) on the x
    positions; o = RMSNorm_m(m) * sigmoid(RMSNorm_y(y)) (the memory carries the content)."""
    persistent = mixer.attention.persistent
    y = attention_reference(mixer.attention, x, config.window, config.rope)
    m = memory_reference(mixer.memory, config, _with_persistent(persistent, x))[0][:, _n(persistent):]
    g = mixer.gate
    return rms_norm(m, g.norm_memory.weight, g.norm_memory.eps) * sigmoid(
        rms_norm(y, g.norm_attention.weight, g.norm_attention.eps))


def mal_reference(mixer, config, x: Tensor) -> Tensor:
    """MAL (Eqs. 29-31) with a residual around each layer: x~ = [p] || x; y = x~ + g * M(x~) (g: the series gate);
    o = y + SW-Attn(y), the persistent positions' y the attention's always-visible prefix. Returns o - x = M(x~) +
    SW-Attn(y) on the x positions (the block adds x back). Unless config.attention_trains_memory, the attention reads
    M(x~) as a constant: no gradient reaches the memory through it."""
    n = _n(mixer.persistent)
    inputs = _with_persistent(mixer.persistent, x)
    m = memory_reference(mixer.memory, config, inputs)[0]
    y = inputs + mixer.series_gate * (m if config.attention_trains_memory else m.detach())
    attended = attention_reference(mixer.attention, y[:, n:], config.window, config.rope,
                                   prefix=y[:, :n] if n else None)
    return m[:, n:] + attended


def _mac_attention(mixer, config, segment: Tensor, h: Tensor) -> Tensor:
    """Attn([p] || h || S) on the segment's positions: position i sees every persistent token and h_j, x_j for
    j <= i; RoPE by in-segment position on queries and on the keys of h and x (not the persistent ones)."""
    batch, length, _ = segment.shape
    heads = config.heads

    def project(z, weight, rotate):
        z = split_heads(linear(z, weight), heads)
        if rotate and config.rope:
            z = torch.stack([rope_rotate_half(z[:, i], i) for i in range(z.shape[1])], 1)
        return z

    q = project(segment, mixer.attention.query.weight, True)
    kh, kx = project(h, mixer.attention.key.weight, True), project(segment, mixer.attention.key.weight, True)
    vh, vx = project(h, mixer.attention.value.weight, False), project(segment, mixer.attention.value.weight, False)
    pk, pv = [], []
    if mixer.attention.persistent is not None:
        p = mixer.attention.persistent.unsqueeze(0).expand(batch, -1, -1)
        pk = list(project(p, mixer.attention.key.weight, False).unbind(1))
        pv = list(project(p, mixer.attention.value.weight, False).unbind(1))
    outputs = []
    for i in range(length):
        keys = pk + [kh[:, j] for j in range(i + 1)] + [kx[:, j] for j in range(i + 1)]
        values = pv + [vh[:, j] for j in range(i + 1)] + [vx[:, j] for j in range(i + 1)]
        outputs.append(softmax_attend(q[:, i], keys, values))
    return linear(torch.stack(outputs, 1).flatten(2), mixer.attention.out.weight)


def mac_reference(mixer, config, x: Tensor) -> Tensor:
    """MAC (Eqs. 21-25) with the residual of Section 4.4, segment by segment (segments of segment_len tokens):
        h = M*_{t-1}(q)        read with the segment's queries (the read path's own convolution, over x) from the
                               memory as it was at the segment start: M_0 after storing every earlier z;
        y = Attn([p] || h || S);
        M_t = M_{t-1} after storing z = RMSNorm(S + y) (no weight; the store path runs over the sequence of z);
        o = RMSNorm_m(M*_t(z)) * sigmoid(RMSNorm_y(y))    token i's read of M*_t(z_i) sees the memory after z_i.
    """
    memory, batch, length = mixer.memory, x.shape[0], x.shape[1]
    read_q = _memory_view(memory, config, x, "q")  # (B * H, T, d): queries of the read path, conv over x
    weights = _memory_rows(memory, config, batch)  # M_0
    stored, outputs = [], []
    g = mixer.gate
    for start in range(0, length, config.segment_len):
        segment = x[:, start:start + config.segment_len]
        end = start + segment.shape[1]
        h = _memory_output(memory, config, _mlp(memory, weights, read_q[:, start:end]), segment)
        y = _mac_attention(mixer, config, segment, h)
        stored.append(rms_norm(segment + y, 1.0))
        m, weights = memory_reference(memory, config, torch.cat(stored, 1))  # store every z so far from M_0
        m = m[:, start:end]
        outputs.append(rms_norm(m, g.norm_memory.weight, g.norm_memory.eps)
                       * sigmoid(rms_norm(y, g.norm_attention.weight, g.norm_attention.eps)))
    return torch.cat(outputs, 1)


# --------------------------------------------------------------------------------------------- baselines


def deltanet_reference(mixer, config, x: Tensor, gated: bool) -> Tensor:
    """DeltaNet / Gated DeltaNet as published (fla layout): q, k, v = SiLU(conv(W x)); q, k L2-normalised per head
    (x / sqrt(||x||^2 + 1e-6)), q scaled by 1 / sqrt(d_k); beta = sigmoid(W_beta x); GDN decay a_t = exp(-exp(A_log)
    softplus(W_a x + dt_bias)); S_t = a_t S_{t-1} (I - beta k k^T) + beta v k^T, o_t = S_t q_t; per-head RMSNorm
    (eps 1e-5) times silu(W_g x); output projection."""
    heads = _memory_heads(config)
    d = config.dim // heads

    def view(name):
        h = linear(x, getattr(mixer, f"to_{name}").weight)
        if config.memory_conv:
            h = causal_conv(h, mixer.convs[name].conv.weight)
        return split_heads(silu(h), heads).transpose(1, 2)  # (B, H, T, d)

    def l2(z):
        return z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6)

    q, k, v = l2(view("q")) / math.sqrt(d), l2(view("k")), view("v")
    beta = sigmoid(linear(x, mixer.to_beta.weight)).transpose(1, 2)
    log_decay = None
    if gated:
        log_decay = (-torch.exp(mixer.A_log) * softplus(linear(x, mixer.to_decay.weight) + mixer.dt_bias)).transpose(
            1, 2)
    o, _ = delta_rule_reference(q, k, v, beta, log_decay)
    o = rms_norm(o.transpose(1, 2), mixer.norm.weight, 1e-5)  # (B, T, H, d)
    o = o * silu(split_heads(linear(x, mixer.to_gate.weight), heads))
    return linear(o.flatten(2), mixer.to_out.weight)


def ttt_reference_mixer(mixer, config, x: Tensor) -> Tensor:
    """TTT-Linear (memory_depth 1) / TTT-MLP, mini-batch b = chunk_size, Mamba-backbone projections (one shared q/k
    projection, a causal conv with bias for each) when memory_conv: views q, k (RoPE, adjacent pairs, by position
    t mod b), v; lr_t = sigmoid(w . x_t + b) / head_dim (base lr 1); token scale s_i = max(1/i + offset_i, 0);
    z = mini-batch TTT; then LayerNorm, times gelu_tanh(W_g x), output projection."""
    batch, length, _ = x.shape
    heads = _memory_heads(config)
    d, b = config.dim // heads, config.chunk_size
    if config.memory_conv:
        shared = linear(x, mixer.q_proj.weight)
        q = causal_conv(shared, mixer.convs["q"].conv.weight, mixer.convs["q"].conv.bias)
        k = causal_conv(shared, mixer.convs["k"].conv.weight, mixer.convs["k"].conv.bias)
    else:
        q, k = linear(x, mixer.q_proj.weight), linear(x, mixer.k_proj.weight)
    v = linear(x, mixer.v_proj.weight)
    q, k, v = (split_heads(z, heads) for z in (q, k, v))  # (B, T, H, d)
    q = torch.stack([rope_adjacent(q[:, t], t % b) for t in range(length)], 1)
    k = torch.stack([rope_adjacent(k[:, t], t % b) for t in range(length)], 1)
    rows = lambda z: z.permute(0, 2, 1, 3).reshape(batch * heads, length, d)  # noqa: E731
    lr = sigmoid(linear(x, mixer.lr_weight, mixer.lr_bias)) / d  # (B, T, H)
    lr = lr.permute(0, 2, 1).reshape(batch * heads, length)
    per_row = lambda p: p.unsqueeze(0).expand(batch, *p.shape).reshape(batch * heads, *p.shape[1:])  # noqa: E731
    names = ["W1", "b1"] if config.memory_depth == 1 else ["W1", "b1", "W2", "b2"]
    scale = (1.0 / torch.arange(1, b + 1, dtype=x.dtype) + mixer.token_idx_offset).clamp(min=0)
    z, _ = ttt_reference({n: per_row(getattr(mixer, n)) for n in names}, per_row(mixer.ln_weight),
                         per_row(mixer.ln_bias), rows(q), rows(k), rows(v), lr, scale, b)
    y = z.reshape(batch, heads, length, d).permute(0, 2, 1, 3).reshape(batch, length, heads * d)
    y = layer_norm(y, mixer.post_norm.weight, mixer.post_norm.bias, 1e-6)
    y = gelu_tanh(linear(x, mixer.g_proj.weight)) * y
    return linear(y, mixer.o_proj.weight)


# --------------------------------------------------------------------------------------------- the model


def mixer_reference(mixer, config, x: Tensor) -> Tensor:
    """The sequence mixer of `config.variant` (production module `mixer`'s weights) over x from the start."""
    variant = config.variant
    if variant == "transformer":
        return attention_reference(mixer.attention, x, None, config.rope)
    if variant == "swa":
        return attention_reference(mixer.attention, x, config.window, config.rope)
    if variant == "lmm":
        return lmm_reference(mixer, config, x)
    if variant == "mag":
        return mag_reference(mixer, config, x)
    if variant == "mal":
        return mal_reference(mixer, config, x)
    if variant == "mac":
        return mac_reference(mixer, config, x)
    if variant in ("deltanet", "gated_deltanet"):
        return deltanet_reference(mixer, config, x, gated=variant == "gated_deltanet")
    if variant == "ttt":
        return ttt_reference_mixer(mixer, config, x)
    raise ValueError(f"no reference for variant {variant!r}")


def lm_reference(model, tokens: Tensor) -> Tensor:
    """TitansLM logits: embedding; per block x + mixer(RMSNorm(x)), then x + W_down(silu(W_g x') * W_u x') with
    x' = RMSNorm(x); final RMSNorm; LM head."""
    config = model.config
    x = model.embed.weight[tokens]
    for block in model.blocks:
        x = x + mixer_reference(block.mixer, config, rms_norm(x, block.mixer_norm.weight, block.mixer_norm.eps))
        h = rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps)
        hidden = config.ffn_width
        gate_weight, up_weight = block.ffn.gate_up.weight[:hidden], block.ffn.gate_up.weight[hidden:]
        x = x + linear(silu(linear(h, gate_weight)) * linear(h, up_weight), block.ffn.down.weight)
    return linear(rms_norm(x, model.norm.weight, model.norm.eps), model.head.weight)
