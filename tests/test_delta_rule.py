"""The (gated) delta rule: the chunked WY form against the per-token reference, and the DeltaNet / Gated DeltaNet
layer built on it (streaming, causality, overwrite by a single token, published gate initialisation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from titans.deltanet import DeltaNet, DeltaNetState
from titans.ops import delta_rule_chunked, delta_rule_reference
from titans.optim import param_groups

DT = torch.float64


def _inputs(T, gated=True, d_k=5, d_v=4, B=2, H=3, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d_k, generator=g, dtype=DT)
    k = F.normalize(torch.randn(B, H, T, d_k, generator=g, dtype=DT), dim=-1)
    v = torch.randn(B, H, T, d_v, generator=g, dtype=DT)
    beta = torch.rand(B, H, T, generator=g, dtype=DT)
    log_decay = -torch.rand(B, H, T, generator=g, dtype=DT) if gated else None
    s0 = torch.randn(B, H, d_v, d_k, generator=g, dtype=DT) if state else None
    return q, k, v, beta, log_decay, s0


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T, chunk", [(16, 4), (23, 8), (7, 64), (9, 1), (12, 12), (5, 2)])
def test_chunked_matches_reference(T, chunk, gated):
    q, k, v, beta, log_decay, s0 = _inputs(T, gated)
    for initial in (None, s0):
        o_ref, s_ref = delta_rule_reference(q, k, v, beta, log_decay, initial)
        o, s = delta_rule_chunked(q, k, v, beta, log_decay, chunk, initial)
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_strong_decay_stays_finite():
    """Log decays down to -30 per token (a chunk's cumulative decay far below float64's range) stay exact."""
    q, k, v, beta, _, s0 = _inputs(20)
    log_decay = -30 * torch.rand(beta.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    o_ref, s_ref = delta_rule_reference(q, k, v, beta, log_decay, s0)
    o, s = delta_rule_chunked(q, k, v, beta, log_decay, 16, s0)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_empty_sequence_returns_initial_state():
    q, k, v, beta, log_decay, s0 = _inputs(0)
    for op in (delta_rule_reference, delta_rule_chunked):
        o, s = op(q, k, v, beta, log_decay, initial_state=s0)
        assert o.shape == (2, 3, 0, 4)
        torch.testing.assert_close(s, s0)
    o, s = delta_rule_chunked(q, k, v, beta)
    assert o.shape == (2, 3, 0, 4) and s.shape == (2, 3, 4, 5) and not s.any()


@pytest.mark.parametrize("gated", [False, True])
def test_chunked_gradients_match_reference(gated):
    inputs = _inputs(13, gated)
    weights = [torch.randn(13, 4, dtype=DT), torch.randn(4, 5, dtype=DT)]

    def grads(op, *extra):
        leaves = [x.clone().requires_grad_() for x in inputs if x is not None]
        it = iter(leaves)
        args = [next(it) if x is not None else None for x in inputs]
        o, s = op(*args[:5], *extra, initial_state=args[5])
        ((o[0, 0] * weights[0]).sum() + (s * weights[1]).sum() + o.pow(2).sum()).backward()
        return [x.grad for x in leaves]

    for g_ref, g in zip(grads(delta_rule_reference), grads(delta_rule_chunked, 4), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", [delta_rule_reference, lambda *a, **kw: delta_rule_chunked(*a, chunk_size=4, **kw)])
def test_single_token_with_beta_one_overwrites_its_key(op):
    """beta = 1 and a unit key: S_t k_t = v_t exactly, whatever was bound to k_t before (and whatever the decay)."""
    q, k, v, beta, log_decay, s0 = _inputs(10)
    t = 6
    beta = beta.clone()
    beta[:, :, t] = 1.0
    q = q.clone()
    q[:, :, t] = k[:, :, t]
    o, _ = op(q, k, v, beta, log_decay, initial_state=s0)
    torch.testing.assert_close(o[:, :, t], v[:, :, t], rtol=1e-10, atol=1e-10)
    # with beta < 1 it is only partly overwritten
    beta[:, :, t] = 0.5
    o, _ = op(q, k, v, beta, log_decay, initial_state=s0)
    assert (o[:, :, t] - v[:, :, t]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------ the layer


def _layer(gated, seed=0, **kw):
    torch.manual_seed(seed)
    return DeltaNet(24, heads=2, gated=gated, chunk_size=4, **kw).to(DT)


@pytest.mark.parametrize("gated", [False, True])
def test_layer_streaming_equals_one_call(gated):
    layer = _layer(gated)
    x = torch.randn(2, 19, 24, dtype=DT)
    y, state = layer(x)
    assert y.shape == x.shape and state.S.shape == (2, 2, 12, 12)
    pieces, s = [], None
    for a, b in [(0, 1), (1, 6), (6, 6), (6, 15), (15, 19)]:
        piece, s = layer(x[:, a:b], s)
        pieces.append(piece)
        s = s.detach()
    torch.testing.assert_close(torch.cat(pieces, dim=1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.S, state.S, rtol=1e-10, atol=1e-10)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(s.conv[name], state.conv[name])


@pytest.mark.parametrize("gated", [False, True])
def test_layer_is_causal(gated):
    layer = _layer(gated)
    x = torch.randn(1, 14, 24, dtype=DT)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 9] += torch.randn(24, dtype=DT)
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[:, :9], y[:, :9], rtol=0, atol=0)
    assert (y2[:, 9:] - y[:, 9:]).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_reach_every_parameter(gated):
    layer = _layer(gated)
    layer(torch.randn(2, 9, 24, dtype=DT))[0].pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in layer.named_parameters()} >= ({"A_log", "dt_bias"} if gated else {"to_beta.weight"})


def test_gate_initialisation_as_published():
    """GDN (Mamba-2) init: A = exp(A_log) ~ U(0, 16), softplus(dt_bias) log-uniform in [1e-3, 0.1]; both excluded
    from weight decay."""
    torch.manual_seed(0)
    layer = DeltaNet(64, heads=256, head_dim=1, gated=True)
    A, dt = layer.A_log.exp(), F.softplus(layer.dt_bias)
    assert A.min() > 0 and A.max() <= 16 and A.min() < 1 and A.max() > 15 and abs(A.mean() - 8) < 1
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    log_dt = dt.log()
    assert log_dt.min() < math.log(2e-3) and log_dt.max() > math.log(0.05)
    assert abs(log_dt.mean() - (math.log(1e-3) + math.log(0.1)) / 2) < 0.3  # log-uniform, not uniform
    assert layer.A_log.no_weight_decay and layer.dt_bias.no_weight_decay
    no_decay = next(g for g in param_groups(layer, 0.1) if g["weight_decay"] == 0.0)["params"]
    assert any(p is layer.A_log for p in no_decay) and any(p is layer.dt_bias for p in no_decay)
    assert not hasattr(DeltaNet(64, heads=4), "A_log")


def test_layer_dtypes_and_state_checks():
    """The recurrence runs in fp32 under bf16 autocast (fp64 for fp64 inputs); a state serves only its batch."""
    torch.manual_seed(0)
    layer = DeltaNet(16, heads=2, gated=True, expand_v=2.0)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
    assert state.S.dtype == torch.float32 and state.S.shape == (2, 2, 16, 8) and torch.isfinite(y).all()
    assert isinstance(state.detach(), DeltaNetState) and not state.detach().S.requires_grad
    with pytest.raises(ValueError, match="batch"):
        layer(x[:1], state)
    assert layer.double()(x.double())[1].S.dtype == torch.float64


@pytest.mark.parametrize("gated", [False, True])
def test_layer_feeds_the_op_as_published(gated, monkeypatch):
    """q, k unit-norm per head, then q scaled by 1/sqrt(d_k); beta in (0, 1); log decay <= 0 (None for DeltaNet)."""
    import titans.deltanet as module

    seen = {}

    def spy(q, k, v, beta, log_decay, chunk_size, initial_state):
        seen.update(q=q, k=k, beta=beta, log_decay=log_decay)
        return delta_rule_chunked(q, k, v, beta, log_decay, chunk_size, initial_state)

    monkeypatch.setattr(module, "delta_rule_chunked", spy)
    layer = _layer(gated)
    layer(torch.randn(2, 7, 24, dtype=DT))
    torch.testing.assert_close(seen["k"].norm(dim=-1), torch.ones(2, 2, 7, dtype=DT), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["q"].norm(dim=-1), torch.full((2, 2, 7), 12 ** -0.5, dtype=DT),
                               rtol=1e-5, atol=1e-5)
    assert seen["beta"].shape == (2, 2, 7) and 0 < seen["beta"].min() and seen["beta"].max() < 1
    if gated:
        assert seen["log_decay"].shape == (2, 2, 7) and seen["log_decay"].max() < 0
    else:
        assert seen["log_decay"] is None
