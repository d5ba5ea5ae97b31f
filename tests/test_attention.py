"""Tests for titans.attention against an independent naive reference (explicit masked softmax in float64)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans.attention import AttentionState, CausalSelfAttention, RotaryEmbedding, attention_mask

DIM, HEADS = 16, 2


def make_attention(seed: int = 0, dtype=torch.float64, **kwargs) -> CausalSelfAttention:
    torch.manual_seed(seed)
    module = CausalSelfAttention(DIM, HEADS, **kwargs).to(dtype)
    if module.query_norm is not None:  # non-trivial norm gains, so the reference must really apply them
        for norm in (module.query_norm, module.key_norm):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    return module


def inputs(batch: int, length: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rotate_reference(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE with complex numbers: channel pair (i, i + D/2) is z = x_i + j x_{i+D/2}, multiplied by e^{j pos theta_i}."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    phase = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions[:, None] * theta)
    z = torch.complex(x[..., :half], x[..., half:]) * phase
    return torch.cat((z.real, z.imag), dim=-1)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_attention(module: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Naive float64 attention of the whole sequence x (B, T, dim) from the module's weights."""
    with torch.no_grad():
        w = {name: p.double() for name, p in module.named_parameters()}
        x = x.double()
        batch, length, _ = x.shape
        heads, head_dim = module.heads, module.head_dim

        def split(t):  # (..., n, heads * head_dim) -> (..., heads, n, head_dim)
            return t.reshape(*t.shape[:-1], heads, head_dim).transpose(-3, -2)

        q, k, v = split(x @ w["query.weight"].T), split(x @ w["key.weight"].T), split(x @ w["value.weight"].T)
        num_persistent = module.num_persistent
        if num_persistent:
            pk = split(w["persistent"] @ w["key.weight"].T).expand(batch, -1, -1, -1)
            pv = split(w["persistent"] @ w["value.weight"].T).expand(batch, -1, -1, -1)
        if module.query_norm is not None:
            eps = module.query_norm.eps or torch.finfo(torch.float64).eps
            q = rms_norm_reference(q, w["query_norm.weight"], eps)
            k = rms_norm_reference(k, w["key_norm.weight"], eps)
            if num_persistent:
                pk = rms_norm_reference(pk, w["key_norm.weight"], eps)
        if module.rotary is not None:
            positions = torch.arange(length, dtype=torch.float64)
            q, k = rotate_reference(q, positions), rotate_reference(k, positions)
        if num_persistent:
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)

        allowed = torch.zeros(length, num_persistent + length, dtype=torch.bool)
        for t in range(length):
            allowed[t, :num_persistent] = True
            for s in range(t + 1):
                if module.window is None or t - s < module.window:
                    allowed[t, num_persistent + s] = True
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return y.transpose(1, 2).reshape(batch, length, heads * head_dim) @ w["out.weight"].T


def stream(module: CausalSelfAttention, x: torch.Tensor, pieces: list[int]):
    state, outputs, start = None, [], 0
    for size in pieces:
        y, state = module(x[:, start : start + size], state)
        outputs.append(y)
        start += size
    assert start == x.shape[1]
    return torch.cat(outputs, dim=1), state


# ---------------------------------------------------------------- rotary


def test_rotary_matches_complex_reference_at_any_offset():
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    for offset in (0, 7, 1000):
        expected = rotate_reference(x, torch.arange(offset, offset + 5, dtype=torch.float64))
        torch.testing.assert_close(rotary(x, offset), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(rotary(x, torch.tensor(offset)), expected, rtol=0, atol=1e-12)


def test_rotary_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    
    def dot(m: int, n: int) -> float:
        return (rotary(q[None], m) * rotary(k[None], n)).sum().item()

    assert dot(12, 5) == pytest.approx(dot(7, 0), abs=1e-12)
    assert dot(5012, 5005) == pytest.approx(dot(7, 0), abs=1e-10)
    assert dot(8, 5) != pytest.approx(dot(7, 0), abs=1e-3)
    torch.testing.assert_close(rotary(q[None], 123).norm(), q.norm())


def test_rotary_cache_grows_and_follows_dtype():
    rotary = RotaryEmbedding(8)
    x = torch.randn(1, 4, 8)
    rotary(x)  # caches 4 positions in float32
    long = torch.randn(1, 50, 8, dtype=torch.float64)
    torch.testing.assert_close(rotary(long, 3), rotate_reference(long, torch.arange(3, 53.0).double()), atol=1e-12, rtol=0)
    torch.testing.assert_close(rotary(x, 10), RotaryEmbedding(8)(x, 10))


def test_rotary_keeps_bfloat16():
    x = torch.randn(2, 6, 8)
    rotated = RotaryEmbedding(8)(x.bfloat16(), 3)
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float(), RotaryEmbedding(8)(x, 3), atol=3e-2, rtol=2e-2)


# ---------------------------------------------------------------- correctness against the naive reference


@pytest.mark.parametrize(
    "window, num_persistent, qk_norm, rope, length",
    [
        (None, 0, False, True, 29),
        (None, 3, False, True, 29),
        (None, 2, True, False, 17),
        (1, 0, False, True, 13),
        (4, 0, False, True, 29),  # T not a multiple of the window
        (4, 3, True, True, 29),
        (5, 2, False, False, 20),  # T a multiple of the window
        (7, 2, False, True, 29),
        (64, 2, False, True, 29),  # window larger than T
    ],
)
def test_matches_naive_reference(window, num_persistent, qk_norm, rope, length):
    module = make_attention(window=window, num_persistent=num_persistent, qk_norm=qk_norm, rope=rope)
    x = inputs(2, length)
    y, state = module(x)
    torch.testing.assert_close(y, reference_attention(module, x), rtol=0, atol=1e-12)
    assert state.offset == length


def test_head_dim_independent_of_dim():
    module = make_attention(window=3, num_persistent=1, head_dim=6)
    x = inputs(1, 11)
    torch.testing.assert_close(module(x)[0], reference_attention(module, x), rtol=0, atol=1e-12)


def test_attention_mask_hand_checked():
    # keys: [persistent, past 0, past 1, query 0, query 1, query 2]; window 3 = the token itself and two before
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 0, 1, 1, 1, 0],
            [1, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attention_mask(3, num_past=2, window=3, num_persistent=1), expected)
    full = attention_mask(2, num_past=1, window=None, num_persistent=0)
    assert torch.equal(full, torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))


@pytest.mark.parametrize("window, num_persistent", [(None, 0), (None, 2), (5, 0), (5, 2)])
def test_causality(window, num_persistent):
    module = make_attention(window=window, num_persistent=num_persistent)
    x = inputs(2, 23)
    changed = x.clone()
    changed[:, 11] += 1.0
    y, y_changed = module(x)[0], module(changed)[0]
    torch.testing.assert_close(y_changed[:, :11], y[:, :11], rtol=0, atol=0)
    assert (y_changed[:, 11] - y[:, 11]).abs().max() > 1e-3


def test_sliding_window_forgets_tokens_out_of_the_window():
    module = make_attention(window=5)
    x = inputs(1, 30)
    changed = x.clone()
    changed[:, 10] += 1.0
    y, y_changed = module(x)[0], module(changed)[0]
    assert (y_changed[:, 14] - y[:, 14]).abs().max() > 1e-3  # 14 - 10 = 4 < window
    torch.testing.assert_close(y_changed[:, 15:], y[:, 15:], rtol=0, atol=1e-14)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("window, num_persistent", [(None, 0), (None, 2), (4, 0), (4, 3), (1, 1)])
@pytest.mark.parametrize("pieces", [[1] * 23, [4] * 5 + [3], [3, 1, 9, 2, 8], [10, 13], [22, 1]])
def test_streaming_in_pieces_equals_whole(window, num_persistent, pieces):
    module = make_attention(window=window, num_persistent=num_persistent, qk_norm=True)
    x = inputs(2, 23)
    whole, whole_state = module(x)
    streamed, state = stream(module, x, pieces)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-10)
    assert state.offset == 23
    torch.testing.assert_close(state.keys, whole_state.keys, rtol=0, atol=1e-12)


def test_sliding_window_state_is_constant_while_streaming_ten_windows():
    window = 6
    module = make_attention(window=window, num_persistent=2)
    x = inputs(2, 10 * window)
    state, sizes = None, set()
    for t in range(x.shape[1]):
        _, state = module(x[:, t : t + 1], state)
        if t >= window:
            sizes.add((tuple(state.keys.shape), state.keys.untyped_storage().nbytes(), state.values.untyped_storage().nbytes()))
    bytes_kept = 2 * HEADS * (window - 1) * module.head_dim * 8
    assert sizes == {((2, HEADS, window - 1, module.head_dim), bytes_kept, bytes_kept)}
    _, state = module(x[:, :25], state)  # a long piece must not leave its whole buffer behind
    assert state.keys.untyped_storage().nbytes() == bytes_kept


def test_full_attention_state_is_a_growing_kv_cache():
    module = make_attention()
    _, state = stream(module, inputs(1, 12), [5, 7])
    assert state.keys.shape == (1, HEADS, 12, module.head_dim) and state.values.shape == state.keys.shape


def test_state_detach_cuts_the_graph():
    module = make_attention(window=3)
    _, state = module(inputs(1, 8))
    assert state.keys.requires_grad
    detached = state.detach()
    assert not detached.keys.requires_grad and not detached.values.requires_grad and detached.offset == 8


# ---------------------------------------------------------------- persistent memory


def test_persistent_tokens_reach_the_output_beyond_the_window():
    module = make_attention(window=3, num_persistent=2)
    x = inputs(1, 40)
    y = module(x)[0]
    (gradient,) = torch.autograd.grad(y[0, 35].sum(), module.persistent)
    assert gradient.abs().min() > 0  # position 35 is far beyond the window, every persistent entry matters
    with torch.no_grad():
        module.persistent.zero_()
    assert (module(x)[0][:, 35] - y[:, 35]).abs().max() > 1e-3


# ---------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("window", [None, 4])
def test_gradient_reaches_every_parameter(window):
    module = make_attention(window=window, num_persistent=2, qk_norm=True)
    x = inputs(2, 19).requires_grad_()
    module(x)[0].square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_dropout_only_in_training():
    module = make_attention(window=4, dropout=0.5)
    reference = make_attention(window=4)
    x = inputs(1, 12)
    module.eval()
    torch.testing.assert_close(module(x)[0], reference(x)[0], rtol=0, atol=0)
    module.train()
    assert (module(x)[0] - reference(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
def test_low_precision_close_to_float64(dtype, window):
    module = make_attention(window=window, num_persistent=2)
    x = inputs(2, 21)
    expected = module(x)[0]
    y = module.to(dtype)(x.to(dtype))[0]
    assert y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 16])
def test_cuda_matches_cpu(window):
    module = make_attention(window=window, num_persistent=2, dtype=torch.float32)
    x = inputs(2, 100, dtype=torch.float32)
    expected, _ = stream(module, x, [37, 1, 62])
    y, state = stream(module.cuda(), x.cuda(), [37, 1, 62])
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-3, atol=1e-3)
    assert state.keys.is_cuda


# ---------------------------------------------------------------- sub-quadratic memory of sliding-window attention


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by an operator."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("window", [16, 32])
def test_sliding_window_never_materialises_a_quadratic_tensor(window):
    length, num_persistent = 4096, 2
    module = make_attention(window=window, num_persistent=num_persistent, dtype=torch.float32)
    x = inputs(1, length, dtype=torch.float32)
    with LargestTensor() as probe:
        module(x)[0].sum().backward()
    linear_bound = HEADS * length * (2 * window + num_persistent)  # the scores of all query blocks together
    assert probe.largest <= linear_bound < length * length // 8
    with LargestTensor() as full_probe:  # the probe does see quadratic tensors: full attention's mask is T x T
        make_attention(num_persistent=num_persistent, dtype=torch.float32)(x[:, :1024])
    assert full_probe.largest >= 1024 * 1024


def test_sliding_window_on_32k_tokens_matches_a_local_recomputation():
    window, length, tail = 64, 32768, 200
    module = make_attention(window=window, num_persistent=2)
    x = inputs(1, length)
    with torch.no_grad():
        y, state = module(x)
        # The last `tail` outputs only see the persistent tokens and the last tail + window - 1 tokens.
        start = length - tail - (window - 1)
        empty = torch.empty(1, HEADS, 0, module.head_dim, dtype=torch.float64)
        local, _ = module(x[:, start:], AttentionState(empty, empty, offset=start))
    torch.testing.assert_close(local[:, -tail:], y[:, -tail:], rtol=0, atol=1e-10)
    assert state.keys.shape[2] == window - 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=10, heads=3), "divisible"),
        (dict(dim=0, heads=1), "positive"),
        (dict(dim=8, heads=2, window=0), "window"),
        (dict(dim=8, heads=2, num_persistent=-1), "num_persistent"),
        (dict(dim=8, heads=2, dropout=1.0), "dropout"),
        (dict(dim=12, heads=2, head_dim=3), "even"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalSelfAttention(**kwargs)


def test_bad_input_raises():
    module = make_attention(window=4)
    with pytest.raises(ValueError, match="shape"):
        module(torch.randn(2, 5, DIM + 1, dtype=torch.float64))
    _, state = module(inputs(2, 5))
    with pytest.raises(ValueError, match="batch"):
        module(inputs(3, 5), state)
    with pytest.raises(ValueError, match="offset"):
        RotaryEmbedding(8)(torch.randn(1, 2, 8), -1)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_decoding_appends_to_the_kv_cache_in_place(mode):
    """Full attention's step writes each token into spare room of one buffer (no copy of the cache per token), under
    inference_mode (which keeps no `_base` of views) as under no_grad; a second continuation of a state gets its own
    buffer, and the steps equal forward."""
    attn = make_attention()
    x = torch.randn(1, 12, attn.dim, dtype=torch.float64)
    whole, _ = attn(x)
    with mode():
        y, state = attn(x[:, :8])
        outs, buffers = [y], set()
        for t in range(8, 12):
            y, state = attn.step(x[:, t:t + 1], state)
            outs.append(y)
            buffers.add(id(state.keys.buffer))
        _, again = attn.step(x[:, 11:12], AttentionState(state.keys[:, :, :11], state.values[:, :, :11], 11))
    assert len(buffers) == 1 and again.keys.buffer is not state.keys.buffer
    assert torch.allclose(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
