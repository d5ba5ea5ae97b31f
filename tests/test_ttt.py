"""TTT-Linear / TTT-MLP (Sun et al. 2024): the dual-form op against the naive token-by-token reference, the layer
against a composition written from the equations, streaming, causality, gradients and the published init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titans.ops import ttt_current_weights, ttt_reference, ttt_scan
from titans.ttt import TTT, TTTState

DT = torch.float64


def _problem(inner: str, T: int, b: int, bh: int = 3, d: int = 6, seed: int = 0, requires_grad: bool = False):
    """Random op inputs away from the init (non-trivial LN scale/bias, biases, token offsets)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=DT) * scale)  # noqa: E731
    h = 3 * d if inner == "mlp" else d
    params = {"W1": rnd(bh, d, h, scale=0.4), "b1": rnd(bh, h, scale=0.2)}
    if inner == "mlp":
        params.update(W2=rnd(bh, h, d, scale=0.3), b2=rnd(bh, d, scale=0.2))
    tensors = dict(
        params=params,
        ln_weight=1 + rnd(bh, d, scale=0.2), ln_bias=rnd(bh, d, scale=0.2),
        queries=rnd(bh, T, d), keys=rnd(bh, T, d), values=rnd(bh, T, d),
        lr=torch.rand(bh, T, generator=g, dtype=DT) * 0.5,
        token_scale=1 / torch.arange(1, b + 1, dtype=DT) + 0.2 * torch.rand(b, generator=g, dtype=DT))
    if requires_grad:
        for t in list(params.values()) + [v for k, v in tensors.items() if k != "params"]:
            t.requires_grad_(True)
    return tensors


def _leaves(p: dict) -> dict:
    out = {f"params.{k}": v for k, v in p["params"].items()}
    out.update({k: v for k, v in p.items() if k != "params"})
    return out


def _fast(p, b, state=None):
    y, state = ttt_scan(p["params"], p["ln_weight"], p["ln_bias"], p["queries"], p["keys"], p["values"], p["lr"],
                        p["token_scale"], b, state=state)
    return y, ttt_current_weights(state, p["ln_weight"], p["ln_bias"], p["token_scale"]), state


def _ref(p, b):
    return ttt_reference(p["params"], p["ln_weight"], p["ln_bias"], p["queries"], p["keys"], p["values"], p["lr"],
                         p["token_scale"], b)


# --------------------------------------------------------------------------------------------- op


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("T,b", [(12, 4), (13, 4), (7, 1), (5, 8), (16, 16)])
def test_fast_matches_reference(inner, T, b):
    p = _problem(inner, T, b)
    y, W, _ = _fast(p, b)
    y_ref, W_ref = _ref(p, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name in W_ref:
        torch.testing.assert_close(W[name], W_ref[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_gradients_match_reference(inner):
    """d(loss)/d(every input and inner parameter), through outputs and end weights, equals the reference's."""
    T, b = 10, 4
    p = _problem(inner, T, b, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    probe_y = torch.randn(3, T, 6, generator=g, dtype=DT)
    probe_w = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in p["params"].items()}

    def loss(y, W):
        return (y * probe_y).sum() + sum((W[k] * probe_w[k]).sum() for k in W)

    leaves = _leaves(p)
    grads = torch.autograd.grad(loss(*_fast(p, b)[:2]), list(leaves.values()))
    grads_ref = torch.autograd.grad(loss(*_ref(p, b)), list(leaves.values()))
    for name, g1, g2 in zip(leaves, grads, grads_ref):
        assert g2.abs().max() > 0, name
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_op_streaming_any_split(inner):
    T, b = 19, 4
    p = _problem(inner, T, b)
    y, W, _ = _fast(p, b)
    for cuts in ([0, 1, 2, 2, 7, 8, 15, 19], [0, 3, 19], [0, 0, 4, 5, 19, 19]):
        outputs, state = [], None
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            piece = {k: (v[:, lo:hi] if k in ("queries", "keys", "values", "lr") else v) for k, v in p.items()}
            out, W_piece, state = _fast(piece, b, state)
            assert out.shape[1] == hi - lo
            outputs.append(out)
        torch.testing.assert_close(torch.cat(outputs, 1), y, rtol=1e-12, atol=1e-12)
        for name in W:
            torch.testing.assert_close(W_piece[name], W[name], rtol=1e-12, atol=1e-12)


def test_op_empty_sequence():
    p = _problem("linear", 0, 4)
    y, W, state = _fast(p, 4)
    assert y.shape == (3, 0, 6) and state.pending is None
    assert all(torch.equal(W[k], p["params"][k]) for k in W)
    y_ref, _ = _ref(p, 4)
    assert y_ref.shape == (3, 0, 6)


# --------------------------------------------------------------------------------------------- layer


def _layer(inner="linear", conv_kernel=0, gate=True, b=4, perturb=True, seed=0):
    torch.manual_seed(seed)
    layer = TTT(12, heads=2, inner=inner, chunk_size=b, gate=gate, conv_kernel=conv_kernel).to(DT)
    if perturb:  # away from the init, so that e.g. a zero bias or unit LN scale cannot hide a mistake
        with torch.no_grad():
            for prm in layer.parameters():
                prm.add_(0.2 * torch.randn_like(prm))
    return layer


def _rope_complex(x, positions, theta=10000.0):
    """RoPE written the other way (pairs as complex numbers times e^{i pos freq})."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=DT) / d)
    rot = torch.polar(torch.ones(len(positions), d // 2, dtype=DT), positions[:, None].to(DT) * freqs)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous()) * rot
    return torch.view_as_real(z).flatten(-2)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_layer_matches_equations(inner):
    """The layer = views -> RoPE(t mod b) -> reference inner loop -> LayerNorm -> GELU gate -> output projection."""
    layer, b, T = _layer(inner), 4, 11
    x = torch.randn(2, T, 12, dtype=DT)
    heads = lambda h: h.view(2, T, 2, 6).transpose(1, 2).reshape(4, T, 6)  # noqa: E731
    pos = torch.arange(T) % b
    q, k, v = _rope_complex(heads(layer.q_proj(x)), pos), _rope_complex(heads(layer.k_proj(x)), pos), \
        heads(layer.v_proj(x))
    lr = torch.sigmoid(torch.einsum("btc,hc->bht", x, layer.lr_weight) + layer.lr_bias[:, None]) / 6
    scale = (1 / torch.arange(1, b + 1, dtype=DT) + layer.token_idx_offset).clamp_min(0)
    rows = lambda t: t.repeat(2, *(1,) * (t.dim() - 1))  # noqa: E731  (batch-major rows: b * heads + h)
    params = {n: rows(getattr(layer, n)) for n in layer.param_names}
    z, _ = ttt_reference(params, rows(layer.ln_weight), rows(layer.ln_bias), q, k, v, lr.reshape(4, T), scale, b)
    z = z.view(2, 2, T, 6).transpose(1, 2).reshape(2, T, 12)
    expected = layer.o_proj(F.gelu(layer.g_proj(x), approximate="tanh") * F.layer_norm(
        z, (12,), layer.post_norm.weight, layer.post_norm.bias, eps=1e-6))
    y, _ = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("inner,conv_kernel", [("linear", 0), ("mlp", 0), ("linear", 3)])
def test_layer_streaming_any_split(inner, conv_kernel):
    layer = _layer(inner, conv_kernel)
    x = torch.randn(2, 14, 12, dtype=DT)
    y, state = layer(x)
    for cuts in ([0, 1, 6, 6, 9, 14], [0, 4, 8, 14], [0, 13, 14]):
        outputs, s = [], None
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            out, s = layer(x[:, lo:hi], s)
            outputs.append(out)
        torch.testing.assert_close(torch.cat(outputs, 1), y, rtol=1e-12, atol=1e-12)
        for name, w in layer.current_weights(state).items():
            torch.testing.assert_close(layer.current_weights(s)[name], w, rtol=1e-12, atol=1e-12)
    y0, s0 = layer(x[:, :0])
    assert y0.shape == (2, 0, 12) and len(s0.inner) == 0


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_layer_causal(inner):
    layer = _layer(inner, conv_kernel=3)
    x = torch.randn(1, 13, 12, dtype=DT)
    y, _ = layer(x)
    for t0 in (0, 5, 8, 12):
        x2 = x.clone()
        x2[:, t0] += torch.randn(12, dtype=DT)
        y2, _ = layer(x2)
        torch.testing.assert_close(y2[:, :t0], y[:, :t0], rtol=0, atol=1e-13)
        assert (y2[:, t0] - y[:, t0]).abs().max() > 1e-6


@pytest.mark.parametrize("inner,conv_kernel,gate", [("linear", 0, True), ("mlp", 0, True), ("mlp", 3, False)])
def test_gradients_reach_every_parameter(inner, conv_kernel, gate):
    layer = _layer(inner, conv_kernel, gate, perturb=False)
    x = torch.randn(2, 10, 12, dtype=DT, requires_grad=True)
    y, state = layer(x)
    (y.square().sum() + sum(w.sum() for w in state.inner.weights.values())).backward()
    for name, prm in list(layer.named_parameters()) + [("x", x)]:
        assert prm.grad is not None and prm.grad.abs().max() > 0 and prm.grad.isfinite().all(), name
    detached = state.detach()
    assert not any(w.requires_grad for w in detached.inner.weights.values())
    assert not detached.inner.pending.keys.requires_grad


def test_init_as_published():
    torch.manual_seed(0)
    layer = TTT(256, heads=4, inner="mlp", chunk_size=16)
    for name in ("W1", "W2", "lr_weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                 "g_proj.weight"):
        w = layer.get_parameter(name)
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002, name
    assert layer.W1.shape == (4, 64, 256) and layer.W2.shape == (4, 256, 64)
    for name in ("b1", "b2", "lr_bias", "ln_bias", "token_idx_offset", "post_norm.bias"):
        assert torch.count_nonzero(layer.get_parameter(name)) == 0, name
    assert torch.all(layer.ln_weight == 1) and torch.all(layer.post_norm.weight == 1)
    torch.testing.assert_close(layer.token_scale(), 1 / torch.arange(1, 17, dtype=torch.float32))
    assert TTT(32, heads=2).W1.shape == (2, 16, 16) and not hasattr(TTT(32, heads=2), "W2")


def test_token_scale_clamped_at_zero():
    layer = TTT(8, heads=1, chunk_size=4)
    with torch.no_grad():
        layer.token_idx_offset.fill_(-0.6)
    scale = layer.token_scale().detach()
    assert torch.all(scale >= 0) and scale[1] == 0 and scale[0].item() == pytest.approx(0.4)


def test_autocast_keeps_inner_loop_fp32(monkeypatch):
    """Under bf16 autocast the inner loop still runs in fp32 with autocast off (its state stays fp32)."""
    import titans.ttt as ttt_module

    seen = []

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return ttt_scan(*args, **kwargs)

    monkeypatch.setattr(ttt_module, "ttt_scan", spy)
    layer = _layer("mlp", perturb=False).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(torch.randn(2, 9, 12))
    assert seen == [(False, {torch.float32})]
    assert state.inner.weights["W1"].dtype == torch.float32 and state.inner.pending.keys.dtype == torch.float32
    assert y.isfinite().all()


def test_state_for_another_batch_is_rejected():
    layer = _layer(perturb=False)
    _, state = layer(torch.randn(2, 5, 12, dtype=DT))
    assert isinstance(state, TTTState)
    with pytest.raises(ValueError, match="batch"):
        layer(torch.randn(3, 5, 12, dtype=DT), state)
    with pytest.raises(ValueError):
        TTT(12, heads=2, inner="conv")
    assert len(state.inner) == 1  # 5 tokens, b = 4: one pending
