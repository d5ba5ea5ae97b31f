"""The inner loop of TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States"): a fast dual-form op and a naive token-by-token reference.

Per head (rows are batch x head), the hidden state is the weights W of an inner model, row-vector convention:

    f(x; W) = x + LN(g(x; W)),   g(x) = x W1 + b1                        (TTT-Linear)
                                 g(x) = gelu(x W1 + b1) W2 + b2          (TTT-MLP, tanh-approximate GELU)

with a per-head LayerNorm (learnable scale and bias, eps 1e-6). Token t's self-supervised loss on its train view
k_t and label view v_t is

    l_t(W) = 1/2 || f(k_t; W) - v_t ||^2  =  1/2 || LN(g(k_t; W)) - (v_t - k_t) ||^2.

(The paper writes the loss without the 1/2; the released code back-propagates LN(g(k)) - (v - k), the gradient of
the 1/2 form. We follow the code, so the inner learning rates mean what they mean there.)

Mini-batch TTT, mini-batch size b: with W^0 the weights at the start of the mini-batch and G_j = grad l_j(W^0),
token i of the mini-batch (i = 1..b) is read with

    W_i = W^0 - sum_{j <= i} eta_ij G_j,    eta_ij = s_i * lr_j,    z_i = f(q_i; W_i),

s_i the token scale (1/i plus a learnable offset, clamped >= 0, built by the caller) and lr_j the inner learning rate
of token j. The next mini-batch starts from W_b.

Dual form (fast path): each G_j is a rank-one outer product per layer, for a layer Z = X W + b: dW_j = X_j^T dZ_j,
db_j = dZ_j. So for all query rows of the mini-batch at once

    X'_i W_i + b_i = X'_i W^0 + b^0 - sum_{j <= i} eta_ij (X'_i . X_j + 1) dZ_j,

a masked b x b product; no per-token weights. For TTT-MLP the layer-1 pre-activations of the queries come from this
formula, X'_2 = gelu of them, and layer 2 uses the same formula with X'_2 against the train-view hidden X_2 (as the
reference implementation does). The gradients dZ are written by hand (LayerNorm fused with the L2 loss, GELU'),
in plain differentiable torch ops, so the outer loop back-propagates through them.

Streaming: the state keeps W at the last mini-batch boundary plus the (< b) train/label views and learning rates
of the tokens seen since. A sequence fed in pieces of any length gives exactly the result of one call.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]  # "W1" (BH, d, h), "b1" (BH, h)[, "W2" (BH, h, d), "b2" (BH, d)]

LN_EPS = 1e-6
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


# --------------------------------------------------------------------------------------------- state


@dataclass
class TTTPending:
    """Tokens after the last mini-batch boundary (fewer than b): their train and label views and learning rates."""

    keys: Tensor  # (BH, p, d)
    values: Tensor  # (BH, p, d)
    lr: Tensor  # (BH, p)

    def __len__(self) -> int:
        return self.keys.shape[1]


@dataclass
class TTTInnerState:
    """Inner-model weights at the last mini-batch boundary and the tokens seen since."""

    weights: Params
    pending: TTTPending | None = None

    def __len__(self) -> int:  # tokens since the last boundary: the position inside the current mini-batch
        return 0 if self.pending is None else len(self.pending)

    def detach(self) -> "TTTInnerState":
        pending = self.pending
        if pending is not None:
            pending = TTTPending(pending.keys.detach(), pending.values.detach(), pending.lr.detach())
        return TTTInnerState({k: v.detach() for k, v in self.weights.items()}, pending)


# --------------------------------------------------------------------------------------------- inner model pieces


def _layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LN over the last axis with per-row scale/bias (BH, d): (output, normalised z, std)."""
    mu = z.mean(-1, keepdim=True)
    std = (z.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    z_hat = (z - mu) / std
    return weight.unsqueeze(1) * z_hat + bias.unsqueeze(1), z_hat, std


def _ln_l2_backward(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """d/dz of 1/2 ||LN(z) - target||^2, per row: with g = LN(z) - target, u = g * scale,
    dz = (u - mean(u) - z_hat * mean(u * z_hat)) / std."""
    y, z_hat, std = _layer_norm(z, weight, bias, eps)
    u = (y - target) * weight.unsqueeze(1)
    return (u - u.mean(-1, keepdim=True) - z_hat * (u * z_hat).mean(-1, keepdim=True)) / std


def gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _gelu_tanh_derivative(x: Tensor) -> Tensor:
    """d/dx of 0.5 x (1 + tanh(c (x + a x^3)))."""
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_C * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * x * x)


def is_mlp(params: Params) -> bool:
    return "W2" in params


def inner_forward(params: Params, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float = LN_EPS) -> Tensor:
    """f(x; W) = x + LN(g(x; W)) for x (BH, N, d) and one set of weights per row."""
    z = x @ params["W1"] + params["b1"].unsqueeze(1)
    if is_mlp(params):
        z = gelu_tanh(z) @ params["W2"] + params["b2"].unsqueeze(1)
    return x + _layer_norm(z, ln_weight, ln_bias, eps)[0]


# --------------------------------------------------------------------------------------------- fast path


def _layer_names(params: Params) -> list[tuple[str, str]]:
    return [("W1", "b1"), ("W2", "b2")] if is_mlp(params) else [("W1", "b1")]


def _minibatch(W: Params, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, scale: Tensor, ln_weight: Tensor,
               ln_bias: Tensor, eps: float, end: bool, last_only: bool = False) -> tuple[Tensor, Params | None]:
    """One mini-batch of n <= b tokens from weights W: the outputs f(q_i; W_i) (BH, n, d) and, if `end`, W_n.
    last_only: q (BH, 1, d) is the last token's query alone, and only its output is computed."""
    layers = _layer_names(W)
    # train view through the inner model at W^0: the inputs X_l of each layer and the pre-activations
    inputs, z = [k], k @ W["W1"] + W["b1"].unsqueeze(1)
    pre = [z]
    if len(layers) == 2:
        inputs.append(gelu_tanh(z))
        pre.append(inputs[1] @ W["W2"] + W["b2"].unsqueeze(1))
    # hand-written backward of l_j at W^0: dZ_l for every token j
    grads = [_ln_l2_backward(pre[-1], v - k, ln_weight, ln_bias, eps)]
    if len(layers) == 2:
        grads.insert(0, (grads[0] @ W["W2"].transpose(-1, -2)) * _gelu_tanh_derivative(pre[0]))
    eta = torch.tril(scale.unsqueeze(-1) * lr.unsqueeze(-2))  # (BH, n, n): eta_ij = s_i lr_j, j <= i
    # dual form, layer by layer: X'_i W_i + b_i = X'_i W^0 + b^0 - sum_j eta_ij (X'_i . X_j + 1) dZ_j
    h, eta_read = q, eta[:, -1:] if last_only else eta
    for layer, ((w, b), x_train, dz) in enumerate(zip(layers, inputs, grads)):
        if layer:
            h = gelu_tanh(h)
        mix = eta_read * (h @ x_train.transpose(-1, -2) + 1)
        h = h @ W[w] + W[b].unsqueeze(1) - mix @ dz
    out = q + _layer_norm(h, ln_weight, ln_bias, eps)[0]
    if not end:
        return out, None
    last = eta[:, -1, :].unsqueeze(-1)  # (BH, n, 1): eta_nj
    new = {}
    for (w, b), x_train, dz in zip(layers, inputs, grads):
        new[w] = W[w] - x_train.transpose(-1, -2) @ (last * dz)
        new[b] = W[b] - (last * dz).sum(1)
    return out, new


def _check(params: Params, ln_weight: Tensor, ln_bias: Tensor, queries: Tensor, keys: Tensor, values: Tensor,
           lr: Tensor, token_scale: Tensor, mini_batch_size: int) -> None:
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if queries.dim() != 3 or keys.shape != queries.shape or values.shape != queries.shape:
        raise ValueError(f"queries, keys, values must all be (BH, T, d); got {tuple(queries.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}")
    bh, t, d = queries.shape
    if lr.shape != (bh, t):
        raise ValueError(f"lr must be (BH, T) = {(bh, t)}, got {tuple(lr.shape)}")
    if token_scale.shape != (mini_batch_size,):
        raise ValueError(f"token_scale must be (mini_batch_size,) = ({mini_batch_size},), got "
                         f"{tuple(token_scale.shape)}")
    if ln_weight.shape != (bh, d) or ln_bias.shape != (bh, d):
        raise ValueError(f"ln_weight and ln_bias must be (BH, d) = {(bh, d)}, got {tuple(ln_weight.shape)}, "
                         f"{tuple(ln_bias.shape)}")
    if set(params) not in ({"W1", "b1"}, {"W1", "b1", "W2", "b2"}):
        raise ValueError(f"params must hold W1, b1 (linear) or W1, b1, W2, b2 (MLP); got {sorted(params)}")
    rows = {p.shape[0] for p in params.values()}
    if rows != {bh}:
        raise ValueError(f"the inner weights hold {sorted(rows)} rows (batch x heads) but the inputs have {bh}: "
                         f"a state carries on only the batch it was built for")


@functools.cache
def _compiled_minibatch():
    """`_minibatch` through torch.compile, built on first use (as `memory_scan`'s compiled chunk step)."""
    return torch.compile(_minibatch)


@torch.compiler.disable  # a compiled model graph-breaks here instead of unrolling the mini-batch loop
def ttt_scan(params: Params, ln_weight: Tensor, ln_bias: Tensor, queries: Tensor, keys: Tensor, values: Tensor,
             lr: Tensor, token_scale: Tensor, mini_batch_size: int = 16, state: TTTInnerState | None = None,
             eps: float = LN_EPS, compile_chunks: bool = False) -> tuple[Tensor, TTTInnerState]:
    """Mini-batch TTT over a sequence (dual form within a mini-batch, a Python loop over mini-batches).

    params: the initial inner weights W_0 (used when `state` is None), W1 (BH, d, h), b1 (BH, h) and, for TTT-MLP,
        W2 (BH, h, d), b2 (BH, d). ln_weight, ln_bias: (BH, d), the inner LayerNorm.
    queries, keys, values: the test, train and label views (BH, T, d). lr: inner learning rates (BH, T).
    token_scale: s_i, (mini_batch_size,): row i of a mini-batch uses eta_ij = s_i lr_j.
    compile_chunks: run each mini-batch through torch.compile of `_minibatch` (same results up to rounding).
    Returns z_t = f(q_t; W_t) (BH, T, d) and the state after the last token.
    """
    _check(params if state is None else state.weights, ln_weight, ln_bias, queries, keys, values, lr, token_scale,
           mini_batch_size)
    state = state if state is not None else TTTInnerState(dict(params))
    offset = len(state)
    if offset:
        p = state.pending
        keys, values, lr = torch.cat([p.keys, keys], 1), torch.cat([p.values, values], 1), torch.cat([p.lr, lr], 1)
        queries = torch.cat([queries.new_zeros(queries.shape[0], offset, queries.shape[2]), queries], 1)
    total, b = keys.shape[1], mini_batch_size
    W, outputs = state.weights, []
    minibatch = _compiled_minibatch() if compile_chunks else _minibatch
    for start in range(0, total, b):
        n = min(b, total - start)
        piece = slice(start, start + n)
        out, new = minibatch(W, queries[:, piece], keys[:, piece], values[:, piece], lr[:, piece],
                              token_scale[:n], ln_weight, ln_bias, eps, end=n == b)
        outputs.append(out)
        W = new if new is not None else W
    full = total - total % b
    pending = TTTPending(keys[:, full:], values[:, full:], lr[:, full:]) if total % b else None
    y = torch.cat(outputs, 1)[:, offset:] if outputs else queries[:, offset:]
    return y, TTTInnerState(W, pending)


def ttt_step(ln_weight: Tensor, ln_bias: Tensor, query: Tensor, key: Tensor, value: Tensor, lr: Tensor,
             token_scale: Tensor, mini_batch_size: int, state: TTTInnerState,
             eps: float = LN_EPS) -> tuple[Tensor, TTTInnerState]:
    """`ttt_scan` of one token (query, key, value (BH, 1, d), lr (BH, 1)) continuing `state`: the token joins the
    pending ones and only its own output is read (the dual form's last row); no loop, no padded queries."""
    _check(state.weights, ln_weight, ln_bias, query, key, value, lr, token_scale, mini_batch_size)
    if key.shape[1] != 1:
        raise ValueError(f"ttt_step reads one token, got {key.shape[1]}")
    p = state.pending
    if p is not None:
        key, value, lr = torch.cat([p.keys, key], 1), torch.cat([p.values, value], 1), torch.cat([p.lr, lr], 1)
    n = key.shape[1]
    out, new = _minibatch(state.weights, query, key, value, lr, token_scale[:n], ln_weight, ln_bias, eps,
                          end=n == mini_batch_size, last_only=True)
    if new is not None:  # the mini-batch is complete
        return out, TTTInnerState(new)
    return out, TTTInnerState(state.weights, TTTPending(key, value, lr))


@dataclass
class TTTDecodeState:
    """A `TTTInnerState` in fixed shapes, for `ttt_decode_step`: the pending mini-batch in buffers of b rows, the
    learning rates zero beyond the `filled` rows (so those rows add nothing to the dual form)."""

    weights: Params  # W^0, at the last mini-batch boundary
    keys: Tensor  # (BH, b, d)
    values: Tensor
    lr: Tensor  # (BH, b)
    filled: Tensor  # 0-d int64: tokens since the boundary, < b


def ttt_decode_state(state: TTTInnerState, mini_batch_size: int) -> TTTDecodeState:
    first = state.weights["W1"]
    bh, d = first.shape[0], first.shape[1]
    keys, values, lr = first.new_zeros(bh, mini_batch_size, d), first.new_zeros(bh, mini_batch_size, d), \
        first.new_zeros(bh, mini_batch_size)
    p = state.pending
    if p is not None:
        keys[:, :len(p)], values[:, :len(p)], lr[:, :len(p)] = p.keys, p.values, p.lr
    return TTTDecodeState(dict(state.weights), keys, values, lr, torch.tensor(len(state), device=first.device))


def ttt_decode_step(ln_weight: Tensor, ln_bias: Tensor, query: Tensor, key: Tensor, value: Tensor, lr: Tensor,
                    token_scale: Tensor, state: TTTDecodeState, eps: float = LN_EPS) -> tuple[Tensor, TTTDecodeState]:
    """`ttt_step` on a `ttt_decode_state`, every shape fixed: the token takes row `filled` and is read with the last
    row of the dual form over the whole buffer, every row scaled by its s_i (rows beyond it have lr 0); at the
    mini-batch's end W_b starts the next one."""
    b = state.keys.shape[1]
    row = state.filled.reshape(1)
    keys, values = state.keys.index_copy(1, row, key), state.values.index_copy(1, row, value)
    lrs = state.lr.index_copy(1, row, lr)
    scale = token_scale.index_select(0, row).expand(b)  # not token_scale[filled]: a scalar read inductor refuses
    out, new = _minibatch(state.weights, query, keys, values, lrs, scale, ln_weight, ln_bias, eps, end=True,
                          last_only=True)
    complete = state.filled == b - 1
    return out, TTTDecodeState({k: torch.where(complete, new[k], w) for k, w in state.weights.items()}, keys,
                               values, torch.where(complete, torch.zeros_like(lrs), lrs),
                               (state.filled + 1) % b)


def ttt_state_from_decode(state: TTTDecodeState) -> TTTInnerState:
    p = int(state.filled)
    if p == 0:
        return TTTInnerState(dict(state.weights))
    return TTTInnerState(dict(state.weights), TTTPending(state.keys[:, :p], state.values[:, :p], state.lr[:, :p]))


def ttt_current_weights(state: TTTInnerState, ln_weight: Tensor, ln_bias: Tensor, token_scale: Tensor,
                        eps: float = LN_EPS) -> Params:
    """W_t, the weights the last token seen was read with (the pending tokens folded in, with the token scale of the
    last of them, as the reference code ends a partial mini-batch). The state is unchanged."""
    if state.pending is None:
        return state.weights
    p = state.pending
    k = p.keys
    _, W = _minibatch(state.weights, k, k, p.values, p.lr, token_scale[:len(p)], ln_weight, ln_bias, eps, end=True)
    return W


# --------------------------------------------------------------------------------------------- naive reference


def ttt_reference(params: Params, ln_weight: Tensor, ln_bias: Tensor, queries: Tensor, keys: Tensor, values: Tensor,
                  lr: Tensor, token_scale: Tensor, mini_batch_size: int = 16,
                  eps: float = LN_EPS) -> tuple[Tensor, Params]:
    """Token-by-token mini-batch TTT straight from the equations: G_j by torch.func.grad of the inner loss at the
    mini-batch-start weights, W_i = W^0 - s_i sum_{j<=i} lr_j G_j formed explicitly, z_i = f(q_i; W_i).
    Returns (z, W of the last token). Slow; for tests. Differentiable (torch.func.grad composes with autograd)."""
    def inner_loss(weights: Params, k: Tensor, v: Tensor) -> Tensor:  # summed over the independent rows
        return 0.5 * ((inner_forward(weights, k, ln_weight, ln_bias, eps) - v) ** 2).sum()

    W_start, W = dict(params), dict(params)
    outputs, running = [], {}
    for t in range(keys.shape[1]):
        i = t % mini_batch_size
        if i == 0:
            W_start = dict(W)  # every gradient of this mini-batch is taken here
            running = {name: torch.zeros_like(w) for name, w in W.items()}
        grads = torch.func.grad(inner_loss)(W_start, keys[:, t:t + 1], values[:, t:t + 1])
        for name, g in grads.items():
            running[name] = running[name] + lr[:, t].reshape(-1, *(1,) * (g.dim() - 1)) * g
        W = {name: W_start[name] - token_scale[i] * running[name] for name in W_start}
        outputs.append(inner_forward(W, queries[:, t:t + 1], ln_weight, ln_bias, eps))
    y = torch.cat(outputs, 1) if outputs else queries[:, :0]
    return y, W
