"""NeuralMemory, the layer: streaming, causality, gradients, stability, dtypes, ablation switches."""

import pytest
import torch

from titans.memory import NeuralMemory, NeuralMemoryState
from titans.ops import current_weights

F64 = torch.float64


def make_layer(**kwargs):
    torch.manual_seed(0)
    defaults = dict(dim=16, memory_heads=2, memory_depth=2, chunk_size=4)
    return NeuralMemory(**{**defaults, **kwargs}).to(F64)


@pytest.mark.parametrize("splits", [[4, 8, 8], [3, 1, 7, 9], [1] * 20, [0, 5, 0, 15, 0]])
def test_streaming_equals_whole_sequence(splits):
    layer = make_layer()
    x = torch.randn(2, 20, 16, dtype=F64)
    y_whole, _ = layer(x)
    state, outs, start = None, [], 0
    for n in splits:
        y, state = layer(x[:, start:start + n], state)
        outs.append(y)
        start += n
    assert torch.allclose(torch.cat(outs, 1), y_whole, rtol=0, atol=1e-12)


def test_empty_piece_reads_and_stores_nothing():
    layer = make_layer()
    empty = torch.zeros(2, 0, 16, dtype=F64)
    y, state = layer(empty)
    assert y.shape == (2, 0, 16)
    _, state = layer(torch.randn(2, 6, 16, dtype=F64), state)
    y, after = layer(empty, state)
    assert y.shape == (2, 0, 16) and after.memory is state.memory
    assert layer.retrieve(empty, state)[0].shape == (2, 0, 16)


def test_layer_is_causal():
    layer = make_layer()
    x = torch.randn(1, 16, 16, dtype=F64)
    y, _ = layer(x)
    for t in (0, 6, 15):
        x2 = x.clone()
        x2[:, t] += 1.0
        y2, _ = layer(x2)
        assert torch.equal(y2[:, :t], y[:, :t])
        assert not torch.allclose(y2[:, t], y[:, t])


def test_retrieve_reads_without_storing():
    layer = make_layer()
    x, probe = torch.randn(1, 12, 16, dtype=F64), torch.randn(1, 5, 16, dtype=F64)
    _, state = layer(x)
    read1, after = layer.retrieve(probe, state)
    for name, w in state.memory.weights.items():
        assert torch.equal(after.memory.weights[name], w)
    read2, _ = layer.retrieve(probe, state)
    assert torch.equal(read1, read2)
    fresh, _ = layer.retrieve(probe)  # the initial memory reads differently from the one that stored x
    assert not torch.allclose(fresh, read1)
    # reading in pieces equals reading at once (the read path keeps its own convolution tail)
    first, st = layer.retrieve(probe[:, :2], state)
    second, _ = layer.retrieve(probe[:, 2:], st)
    assert torch.allclose(torch.cat([first, second], 1), read1, rtol=0, atol=1e-12)


def test_signals_are_the_gates_and_the_surprise_gradient_norm():
    layer = make_layer(max_grad_norm=0.5)
    _, state = layer(torch.randn(2, 7, 16, dtype=F64))
    probe = torch.randn(2, 5, 16, dtype=F64)
    signals = layer.signals(probe, state)
    by_head = lambda t: t.transpose(1, 2)  # noqa: E731  (B, T, heads) -> (B, heads, T)
    assert torch.allclose(signals["theta"], layer.max_lr * by_head(torch.sigmoid(layer.to_lr(probe))))
    assert torch.allclose(signals["eta"], by_head(torch.sigmoid(layer.to_momentum(probe))))
    assert torch.allclose(signals["alpha"], by_head(torch.sigmoid(layer.to_decay(probe))))
    # the surprise is the norm of the inner gradient at the weights the state holds, by autograd token by token
    scratch = NeuralMemoryState(state.memory, dict(state.conv))
    k, v = (layer._project(probe, name, scratch, name) for name in ("k", "v"))
    weights = current_weights(layer.memory, state.memory, layer.max_grad_norm, layer.normalize_chunk_lr)
    for t in range(5):
        grads = torch.func.grad(lambda w: ((layer.memory(w, k[:, t:t + 1]) - v[:, t:t + 1]) ** 2).sum())(weights)
        norms = sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt()
        assert torch.allclose(signals["surprise"].reshape(-1, 5)[:, t], norms)
    assert torch.allclose(signals["clip"], (0.5 / signals["surprise"]).clamp(max=1))
    assert (signals["clip"] < 1).any()
    again = layer.signals(probe, state)  # the state was not advanced
    assert all(torch.equal(again[name], signals[name]) for name in signals)


def test_gradients_reach_every_parameter():
    layer = make_layer()
    x = torch.randn(2, 10, 16, dtype=F64, requires_grad=True)
    y, _ = layer(x)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert x.grad.abs().sum() > 0


def test_layer_gradcheck():
    layer = make_layer(dim=4, memory_heads=1, memory_depth=2, memory_expansion=1.0, chunk_size=2)
    x = torch.randn(1, 5, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp)[0], (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_untrained_memory_stays_alive_over_100k_tokens(depth):
    """Over 100K random tokens the memory neither explodes nor decays to zero: its read M(q) and every layer's
    weights at 100K are within 10x of their size at 1K, both ways. (With std-1/sqrt(d) hidden layers and alpha = 1e-3
    at initialisation, depth 4 read exactly 0 from ~40K tokens on.)"""
    torch.manual_seed(0)
    layer = NeuralMemory(dim=32, memory_heads=2, memory_depth=depth, chunk_size=64)
    probe = torch.nn.functional.normalize(torch.randn(2, 64, 16), dim=-1)  # (batch x heads, queries, head_dim)

    def sizes(state):
        weights = current_weights(layer.memory, state.memory, None, layer.normalize_chunk_lr)
        read = layer.memory(weights, probe).square().mean().sqrt()
        return torch.stack([read] + [w.norm() for w in weights.values()])

    state, early = None, None
    with torch.no_grad():
        for i in range(26):  # 1,024 + 25 x 4,096 = 103,424 tokens
            y, state = layer(torch.randn(1, 4096 if i else 1024, 32), state)
            if i == 0:
                early = sizes(state)
    late = sizes(state)
    assert torch.isfinite(y).all() and torch.isfinite(late).all()
    ratio = late / early
    assert (ratio < 10).all() and (ratio > 0.1).all(), f"read and weight sizes at 100K / at 1K: {ratio.tolist()}"


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_largest_step_is_stable_at_any_chunk_size(depth, chunk):
    """theta at its bound from the start (max_lr 0.5, twice the default): the chunk-normalised step keeps the memory
    bounded whatever the chunk size (without normalize_chunk_lr, depth 1 diverges at chunk 64 and depth 2 at 16)."""
    torch.manual_seed(0)
    layer = NeuralMemory(dim=64, memory_heads=2, memory_depth=depth, chunk_size=chunk, max_lr=0.5, init_lr=0.49)
    state = None
    with torch.no_grad():
        for _ in range(4):
            y, state = layer(torch.randn(1, 2048, 64), state)
    assert torch.isfinite(y).all()
    assert max(w.abs().max() for w in state.memory.weights.values()) < 5


def test_state_is_fp32_under_autocast_and_output_keeps_input_dtype():
    torch.manual_seed(0)
    layer = NeuralMemory(dim=16, memory_heads=2, chunk_size=4)
    x = torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
    assert all(w.dtype == torch.float32 for w in state.memory.weights.values())
    assert torch.isfinite(y).all()
    y32, _ = layer(x)
    assert y32.dtype == torch.float32


def test_ablation_switches_remove_their_part():
    full = make_layer()
    assert full.to_momentum is not None and full.to_decay is not None and len(full.convs) == 3
    bare = make_layer(momentum=False, forgetting=False, memory_conv=False, memory_depth=1)
    assert bare.to_momentum is None and bare.to_decay is None and len(bare.convs) == 0
    assert list(bare.initial_weights) == ["w0"]
    y, state = bare(torch.randn(1, 8, 16, dtype=F64))
    assert state.conv == {} and y.shape == (1, 8, 16)


def test_bad_input_shape_is_named():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"\(batch, time, 16\)"):
        layer(torch.randn(2, 10, 8, dtype=F64))
    with pytest.raises(ValueError, match="init_lr"):
        NeuralMemory(16, init_lr=0.5, max_lr=0.1)


def test_automatic_checkpointing_leaves_the_layer_gradients_unchanged():
    """The layer's default checkpoint_chunks="auto" (groups of ~sqrt(n_chunks) at chunk 1: 4 groups of 5 and 6 at
    23 tokens) gives the gradients of checkpointing off, odd length, float64; a bad value is refused up front."""
    x = torch.randn(2, 23, 16, dtype=F64)
    grads = []
    for checkpoint_chunks in (0, "auto"):
        layer = make_layer(chunk_size=1, checkpoint_chunks=checkpoint_chunks)
        y, _ = layer(x)
        grads.append(torch.autograd.grad(y.square().sum(), list(layer.parameters())))
    for off, auto in zip(*grads):
        assert torch.allclose(off, auto, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="checkpoint_chunks"):
        NeuralMemory(16, checkpoint_chunks="sqrt")
