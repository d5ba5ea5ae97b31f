"""The chunked memory op against independent references: the token loop with autograd, a closed-form online rule,
finite differences."""

import itertools

import pytest
import torch

from titans.ops import (MLPMemory, MemoryState, auto_checkpoint_chunks, current_weights, memory_retrieve, memory_scan,
                         memory_scan_reference, memory_step)
from titans.ops.memory_decode import decode_state, decode_step, memory_state
from titans.ops.memory_scan import _chunk_step, _compiled_chunk_step, checkpoint_group
from titans.state import tensors

F64 = torch.float64


def make_inputs(bh=3, t=13, d=4, *, seed=0, dtype=F64, with_momentum=True, with_decay=True):
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(bh, t, d, generator=g, dtype=dtype), dim=-1)
    values = torch.randn(bh, t, d, generator=g, dtype=dtype)
    queries = torch.nn.functional.normalize(torch.randn(bh, t, d, generator=g, dtype=dtype), dim=-1)
    lr = 0.2 * torch.rand(bh, t, generator=g, dtype=dtype)
    momentum = 0.9 * torch.rand(bh, t, generator=g, dtype=dtype) if with_momentum else None
    decay = 0.3 * torch.rand(bh, t, generator=g, dtype=dtype) if with_decay else None
    return keys, values, queries, lr, momentum, decay


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = list(itertools.product([1, 2, 3], [1, 2, 5, 8], [True, False], [True, False]))


@pytest.mark.parametrize("depth,chunk,with_momentum,with_decay", CASES)
def test_fast_path_equals_reference_float64(depth, chunk, with_momentum, with_decay):
    memory = MLPMemory(dim=4, depth=depth, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(1), dtype=F64)
    inputs = make_inputs(with_momentum=with_momentum, with_decay=with_decay)
    y, state = memory_scan(memory, params, *inputs, chunk_size=chunk)
    y_ref, w_ref, s_ref = memory_scan_reference(memory, params, *inputs, chunk_size=chunk)
    assert rel_err(y, y_ref) < 1e-10
    weights = current_weights(memory, state)  # 13 tokens: the last chunk is partial unless chunk = 1
    for name in w_ref:
        assert rel_err(weights[name], w_ref[name]) < 1e-10


@pytest.mark.parametrize("depth,chunk", [(1, 1), (1, 5), (2, 4), (3, 8)])
def test_chunk_normalised_step_equals_reference(depth, chunk):
    """normalize_chunk_lr: theta_t divided by the overlap of each layer's input with the chunk's earlier ones (the
    keys' alone for a general memory function); fast path, general path, streaming and the token loop agree, and it
    changes nothing at chunk size 1."""
    memory = MLPMemory(dim=4, depth=depth, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(4), dtype=F64)
    keys, values, queries, lr, momentum, decay = make_inputs(seed=5)
    keys = torch.nn.functional.normalize(keys + 1.0, dim=-1)  # correlated keys: the overlap matters
    inputs = (keys, values, queries, lr, momentum, decay)
    y, state = memory_scan(memory, params, *inputs, chunk_size=chunk, normalize_chunk_lr=True)
    y_ref, w_ref, _ = memory_scan_reference(memory, params, *inputs, chunk_size=chunk, normalize_chunk_lr=True)
    assert rel_err(y, y_ref) < 1e-10
    function = lambda p, x: memory(p, x)  # noqa: E731  (not an MLPMemory: the keys' overlap only)
    y_general, _ = memory_scan(function, params, *inputs, chunk_size=chunk, normalize_chunk_lr=True)
    y_general_ref, _, _ = memory_scan_reference(function, params, *inputs, chunk_size=chunk, normalize_chunk_lr=True)
    assert rel_err(y_general, y_general_ref) < 1e-10
    for name, w in current_weights(memory, state, normalize_chunk_lr=True).items():
        assert rel_err(w, w_ref[name]) < 1e-10
    first, st = memory_scan(memory, params, *(x[:, :6] for x in inputs), chunk_size=chunk, normalize_chunk_lr=True)
    second, _ = memory_scan(memory, params, *(x[:, 6:] for x in inputs), chunk_size=chunk, state=st,
                            normalize_chunk_lr=True)
    assert rel_err(torch.cat([first, second], 1), y_ref) < 1e-10
    y_plain, _, _ = memory_scan_reference(memory, params, *inputs, chunk_size=chunk)
    assert (rel_err(y_plain, y_ref) < 1e-12) == (chunk == 1)


@pytest.mark.parametrize("residual,activation", [(True, "silu"), (False, "gelu"), (False, "tanh")])
def test_fast_path_residual_and_activations(residual, activation):
    memory = MLPMemory(dim=4, depth=2, hidden=8, activation=activation, residual=residual)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(2), dtype=F64)
    inputs = make_inputs(seed=3)
    y, _ = memory_scan(memory, params, *inputs, chunk_size=4)
    y_ref, _, _ = memory_scan_reference(memory, params, *inputs, chunk_size=4)
    assert rel_err(y, y_ref) < 1e-10


def test_general_path_for_any_memory_function():
    """A memory that is not an MLPMemory (here with a bias and a layer norm) takes the torch.func path."""

    def memory_fn(p, x):
        h = torch.nn.functional.layer_norm(torch.tanh(x @ p["w"].transpose(-1, -2) + p["b"].unsqueeze(-2)), (4,))
        return h @ p["u"].transpose(-1, -2)

    g = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(3, 4, 4, generator=g, dtype=F64) / 2, "b": torch.randn(3, 4, generator=g, dtype=F64),
              "u": torch.randn(3, 4, 4, generator=g, dtype=F64) / 2}
    inputs = make_inputs(seed=5)
    y, state = memory_scan(memory_fn, params, *inputs, chunk_size=5)
    y_ref, w_ref, _ = memory_scan_reference(memory_fn, params, *inputs, chunk_size=5)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(current_weights(memory_fn, state)["b"], w_ref["b"]) < 1e-10


def test_chunk_size_one_is_the_plain_online_rule():
    """Linear memory, written in closed form: grad ||W k - v||^2 = 2 (W k - v) k^T, taken at W_{t-1}."""
    keys, values, queries, lr, momentum, decay = make_inputs(bh=2, t=9, seed=6)
    W = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    y, _ = memory_scan(MLPMemory(dim=4, depth=1), {"w0": W}, keys, values, queries, lr, momentum, decay, chunk_size=1)
    S = torch.zeros_like(W)
    for t in range(9):
        k, v = keys[:, t, :, None], values[:, t, :, None]
        grad = 2 * (W @ k - v) @ k.transpose(1, 2)
        S = momentum[:, t, None, None] * S - lr[:, t, None, None] * grad
        W = (1 - decay[:, t, None, None]) * W + S
        assert torch.allclose(y[:, t], (W @ queries[:, t, :, None]).squeeze(-1), rtol=0, atol=1e-12)


def test_chunked_linear_memory_is_one_minibatch_step_per_chunk():
    """Eq. 16-17 without momentum or forgetting: a chunk's end weights are W_c - sum_i theta_i grad l_i(W_c)."""
    keys, values, queries, lr, _, _ = make_inputs(bh=2, t=6, seed=8)
    W0 = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    _, state = memory_scan(MLPMemory(dim=4, depth=1), {"w0": W0}, keys, values, queries, lr, None, None, chunk_size=6)
    residuals = W0 @ keys.transpose(1, 2) - values.transpose(1, 2)  # (BH, d, C), all at W_0
    expected = W0 - 2 * (residuals * lr[:, None, :]) @ keys
    assert torch.allclose(state.weights["w0"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("splits", [[8, 8, 4], [4, 12, 4], [3, 5, 1, 11], [1] * 20, [20]])
@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_in_pieces_equals_one_call(splits, depth):
    """Pieces at chunk boundaries and anywhere else: the state keeps the partial chunk, so results are exact."""
    memory = MLPMemory(dim=4, depth=depth, hidden=5)
    params = memory.init_params(2, generator=torch.Generator().manual_seed(10), dtype=F64)
    inputs = make_inputs(bh=2, t=20, seed=11)
    y_whole, state_whole = memory_scan(memory, params, *inputs, chunk_size=4)
    state, outs, start = None, [], 0
    for n in splits:
        piece = [None if x is None else x[:, start:start + n] for x in inputs]
        y, state = memory_scan(memory, params, *piece, chunk_size=4, state=state)
        outs.append(y)
        start += n
    assert rel_err(torch.cat(outs, dim=1), y_whole) < 1e-12
    for name in params:
        assert rel_err(state.weights[name], state_whole.weights[name]) < 1e-12
        assert rel_err(state.momentum[name], state_whole.momentum[name]) < 1e-12


def test_state_stays_bounded_while_streaming():
    memory = MLPMemory(dim=4, depth=2, hidden=5)
    params = memory.init_params(2, dtype=F64)
    state = None
    for step in range(25):
        piece = make_inputs(bh=2, t=3, seed=step)
        _, state = memory_scan(memory, params, *piece, chunk_size=8, state=state)
        assert state.pending is None or len(state.pending) < 8


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_retrieval_is_causal(chunk):
    memory = MLPMemory(dim=4, depth=2, hidden=6)
    params = memory.init_params(2, generator=torch.Generator().manual_seed(12), dtype=F64)
    inputs = make_inputs(bh=2, t=16, seed=13)
    y, _ = memory_scan(memory, params, *inputs, chunk_size=chunk)
    for t in (1, 5, 9, 15):  # (at t = 0 the momentum gate multiplies S_0 = 0 and cannot matter)
        for which in range(6):  # perturb token t of keys, values, queries, lr, momentum and decay in turn
            changed = [x.clone() for x in inputs]
            changed[which][:, t] += 0.1
            y2, _ = memory_scan(memory, params, *changed, chunk_size=chunk)
            assert torch.equal(y2[:, :t], y[:, :t]), f"token {t} leaked into earlier outputs (input {which})"
            assert not torch.allclose(y2[:, t:], y[:, t:]), "a perturbation changed nothing: the test is vacuous"


def test_outer_gradients_match_finite_differences():
    memory = MLPMemory(dim=3, depth=2, hidden=4)
    params = memory.init_params(2, generator=torch.Generator().manual_seed(14), dtype=F64)
    keys, values, queries, lr, momentum, decay = make_inputs(bh=2, t=7, d=3, seed=15)
    tensors = [params["w0"], params["w1"], keys, values, queries, lr, momentum, decay]
    tensors = [t.clone().requires_grad_() for t in tensors]

    def run(w0, w1, k, v, q, lr_, mom, dec):
        y, state = memory_scan(memory, {"w0": w0, "w1": w1}, k, v, q, lr_, mom, dec, chunk_size=3)
        return y, current_weights(memory, state)["w1"]

    assert torch.autograd.gradcheck(run, tensors, eps=1e-6, atol=1e-6)


def test_outer_gradients_match_the_reference():
    memory = MLPMemory(dim=4, depth=3, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(16), dtype=F64)
    inputs = [x.clone().requires_grad_() for x in make_inputs(seed=17)]
    p1 = {k: v.clone().requires_grad_() for k, v in params.items()}
    y, _ = memory_scan(memory, p1, *inputs, chunk_size=4)
    grads = torch.autograd.grad(y.square().sum(), list(p1.values()) + inputs)
    p2 = {k: v.clone().requires_grad_() for k, v in params.items()}
    y_ref, _, _ = memory_scan_reference(memory, p2, *inputs, chunk_size=4)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(p2.values()) + inputs)
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_learns_at_test_time_and_forgetting_erases(depth):
    """Store 64 random key->value pairs; recall error on those keys falls by a large factor; decay = 1 erases."""
    g = torch.Generator().manual_seed(18)
    d, n = 128, 64
    memory = MLPMemory(dim=d, depth=depth, hidden=256)
    params = memory.init_params(1, generator=g, dtype=F64)
    keys = torch.nn.functional.normalize(torch.randn(1, n, d, generator=g, dtype=F64), dim=-1)
    values = torch.nn.functional.normalize(torch.randn(1, n, d, generator=g, dtype=F64), dim=-1)
    gate = lambda value: torch.full((1, n), value, dtype=F64)  # noqa: E731
    state, error_before = None, ((memory(params, keys) - values) ** 2).mean()
    for _ in range(4):  # four passes over the same pairs, all at test time
        _, state = memory_scan(memory, params, keys, values, keys, gate(0.2), gate(0.5), gate(0.0), chunk_size=8,
                               state=state)
    error_after = ((memory_retrieve(memory, state, keys) - values) ** 2).mean()
    assert error_after < error_before / 10
    # one more token with alpha = 1: W <- 0 * W + S; with lr = 0 and no momentum the memory is wiped
    _, erased = memory_scan(memory, params, keys[:, :1], values[:, :1], keys[:, :1], gate(0.0)[:, :1], None,
                            gate(1.0)[:, :1], chunk_size=1, state=state)
    assert all(w.abs().max() < 1e-300 for w in erased.weights.values())  # 0 up to the log-space floor
    empty_error = (values**2).mean()
    assert torch.isclose(((memory_retrieve(memory, erased, keys) - values) ** 2).mean(), empty_error)


def test_bad_inputs_are_named():
    memory = MLPMemory(dim=4, depth=1)
    params = memory.init_params(2)
    k = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="lr must have shape"):
        memory_scan(memory, params, k, k, k, torch.rand(2, 4), None, None, chunk_size=2)
    with pytest.raises(ValueError, match="disagree"):
        memory_scan(memory, params, k, k[:, :3], k, torch.rand(2, 5), None, None, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        memory_scan(memory, params, k, k, k, torch.rand(2, 5), None, None, chunk_size=0)
    _, state = memory_scan(memory, params, k, k, k, torch.rand(2, 5), torch.rand(2, 5), None, chunk_size=2)
    with pytest.raises(ValueError, match="momentum"):
        memory_scan(memory, params, k, k, k, torch.rand(2, 5), None, None, chunk_size=2, state=state)
    with pytest.raises(ValueError, match="depth"):
        MLPMemory(dim=4, depth=0)
    with pytest.raises(ValueError, match="activation"):
        MLPMemory(dim=4, activation="swish2")


@pytest.mark.parametrize("depth", [1, 3])
def test_gradient_clipping_matches_reference(depth):
    """With max_grad_norm every token's surprise is clipped; fast path, general path and reference agree."""
    memory = MLPMemory(dim=4, depth=depth, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(19), dtype=F64)
    inputs = make_inputs(seed=20)
    y, state = memory_scan(memory, params, *inputs, chunk_size=4, max_grad_norm=0.5)
    y_general, _ = memory_scan(lambda p, x: memory(p, x), params, *inputs, chunk_size=4, max_grad_norm=0.5)
    y_ref, w_ref, _ = memory_scan_reference(memory, params, *inputs, chunk_size=4, max_grad_norm=0.5)
    y_unclipped, _ = memory_scan(memory, params, *inputs, chunk_size=4)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(y_general, y_ref) < 1e-10
    assert rel_err(current_weights(memory, state, max_grad_norm=0.5)["w0"], w_ref["w0"]) < 1e-10
    assert rel_err(y_unclipped, y_ref) > 1e-3, "clipping was never active: the test is vacuous"


def test_chunk_checkpointing_gives_the_same_values_and_gradients():
    memory = MLPMemory(dim=4, depth=2, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(21), dtype=F64)
    results = []
    for checkpointed in (0, 1, 3):  # off, every chunk, groups of three chunks (13 tokens: 4 chunks of 4)
        inputs = [x.clone().requires_grad_() for x in make_inputs(seed=22)]
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        y, _ = memory_scan(memory, p, *inputs, chunk_size=4, max_grad_norm=1.0, checkpoint_chunks=checkpointed)
        results.append([y] + list(torch.autograd.grad(y.square().sum(), list(p.values()) + inputs)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_compiled_chunk_step_gives_the_same_values_and_gradients(monkeypatch):
    """compile_chunks runs every chunk through torch.compile of the chunk step: the same retrievals, state and
    gradients as eager, with and without checkpointing (13 tokens: three whole chunks and a partial one). Dynamo's
    graph capture and AOT autograd are ours to check; the test swaps inductor's code generation (a minute to compile
    here; checked by benchmarks/bench_compile.py) for the aot_eager backend."""
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: compiled.append(fn) or real_compile(fn, backend="aot_eager", **kw))
    _compiled_chunk_step.cache_clear()
    memory = MLPMemory(dim=4, depth=2, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(23), dtype=F64)
    results = []
    for compile_chunks, checkpointed in ((False, 0), (True, 0), (True, 2)):
        inputs = [x.clone().requires_grad_() for x in make_inputs(seed=24)]
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        y, state = memory_scan(memory, p, *inputs, chunk_size=4, max_grad_norm=1.0, normalize_chunk_lr=True,
                               checkpoint_chunks=checkpointed, compile_chunks=compile_chunks)
        results.append([y, *state.weights.values(), *state.momentum.values()]
                       + list(torch.autograd.grad(y.square().sum(), list(p.values()) + inputs)))
    _compiled_chunk_step.cache_clear()
    assert compiled == [_chunk_step], "the compiled path was not taken"
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _count_checkpoints(monkeypatch) -> list:
    """Spy on the op's torch.utils.checkpoint.checkpoint: one entry per checkpointed group."""
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(len(args[3]))  # the group's chunks
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_automatic_checkpointing_gives_the_same_values_and_gradients(chunk, monkeypatch):
    """The default checkpoint_chunks="auto" checkpoints small chunks (about sqrt(n_chunks) per group) and changes no
    value or gradient: 37 tokens (a partial last chunk), continuing a state with 2 pending tokens, float64."""
    memory = MLPMemory(dim=4, depth=2, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(23), dtype=F64)
    head = make_inputs(t=2, seed=24)
    calls = _count_checkpoints(monkeypatch)
    results = []
    for checkpointed in (0, "auto"):
        inputs = [x.clone().requires_grad_() for x in make_inputs(t=37, seed=25)]
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        _, state = memory_scan(memory, p, *head, chunk_size=chunk, checkpoint_chunks=0)  # pending unless chunk 1
        y, end = memory_scan(memory, p, *inputs, chunk_size=chunk, state=state, max_grad_norm=1.0,
                             normalize_chunk_lr=True, checkpoint_chunks=checkpointed)
        loss = y.square().sum() + sum(w.square().sum() for w in current_weights(memory, end).values())
        results.append([y] + list(torch.autograd.grad(loss, list(p.values()) + inputs)))
    n_chunks = -(-(2 % chunk + 37) // chunk)  # the pending tokens join the first chunk
    group = auto_checkpoint_chunks(chunk, n_chunks)
    assert group > 0 and calls == [min(group, n_chunks - i) for i in range(0, n_chunks, group)]
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_automatic_checkpointing_rule():
    """Off from chunk size 16 up and for few chunks; about sqrt(n_chunks) chunks per group below; 0 and integers
    pass through; anything else is refused."""
    assert auto_checkpoint_chunks(64, 16) == 0 and auto_checkpoint_chunks(16, 64) == 0
    assert auto_checkpoint_chunks(16, 4096) == 0 and auto_checkpoint_chunks(1, 3) == 0
    assert auto_checkpoint_chunks(1, 1024) == 32 and auto_checkpoint_chunks(8, 128) == 12
    assert auto_checkpoint_chunks(3, 13) == 4 and auto_checkpoint_chunks(1, 4) == 2
    assert checkpoint_group("auto", 1, 1024) == checkpoint_group(None, 1, 1024) == 32
    assert checkpoint_group(0, 1, 1024) == 0 and checkpoint_group(5, 64, 16) == 5 and checkpoint_group(True, 8, 9) == 1
    for bad in (-1, 1.5, "sqrt"):
        with pytest.raises(ValueError, match="checkpoint_chunks"):
            checkpoint_group(bad, 1, 1024)


def test_no_automatic_checkpointing_without_gradients_or_on_the_general_path(monkeypatch):
    """Under no_grad, or with nothing that requires grad, the automatic rule has nothing to save: no recomputation;
    nor on the general path (torch.func.grad refuses checkpointing's saved-tensor hooks), which still trains."""
    memory = MLPMemory(dim=4, depth=2, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(26), dtype=F64)
    calls = _count_checkpoints(monkeypatch)
    memory_scan(memory, params, *make_inputs(t=37, seed=27), chunk_size=1)
    params = {k: v.requires_grad_() for k, v in params.items()}
    with torch.no_grad():
        memory_scan(memory, params, *make_inputs(t=37), chunk_size=1)
    y, _ = memory_scan(lambda p, x: memory(p, x), params, *make_inputs(t=37), chunk_size=1)
    y.sum().backward()
    assert calls == [] and all(p.grad is not None for p in params.values())


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize("depth,chunk,with_momentum,with_decay,bounded", [
    (1, 1, True, True, True), (2, 5, True, True, True), (3, 4, False, True, True), (2, 8, True, False, True),
    (2, 5, True, True, False)])
def test_single_token_step_equals_the_chunked_scan(depth, chunk, with_momentum, with_decay, bounded, general):
    """memory_step token by token, after a 3-token memory_scan (a state left mid-chunk), gives the chunked scan's
    retrievals and state, with and without clipping and chunk-normalised steps, on the fast path (the running W_t and
    S_t, O(1) per token) and the general one (the row of the closed form); a scan continuing from the stepped state
    (its running values ignored) stays on the one-call result."""
    memory = MLPMemory(dim=4, depth=depth, hidden=6)
    fn = (lambda p, x: memory(p, x)) if general else memory  # noqa: E731
    params = memory.init_params(3, generator=torch.Generator().manual_seed(2), dtype=F64)
    inputs = make_inputs(t=26, seed=3, with_momentum=with_momentum, with_decay=with_decay)
    options = dict(chunk_size=chunk, max_grad_norm=0.5 if bounded else None, normalize_chunk_lr=bounded)
    bounds = (options["max_grad_norm"], bounded)
    y, state = memory_scan(fn, params, *[None if x is None else x[:, :21] for x in inputs], **options)
    y_all, state_all = memory_scan(fn, params, *inputs, **options)
    head = [None if x is None else x[:, :3] for x in inputs]
    outs, stepped = [memory_scan(fn, params, *head, **options)[0]], memory_scan(fn, params, *head, **options)[1]
    for t in range(3, 21):
        token = [None if x is None else x[:, t:t + 1] for x in inputs]
        out, stepped = memory_step(fn, *token, state=stepped, **options)
        outs.append(out)
    assert rel_err(torch.cat(outs, 1), y) < 1e-10
    assert isinstance(stepped, MemoryState) and len(stepped.pending or ()) == len(state.pending or ())
    for name in state.weights:
        assert rel_err(current_weights(fn, stepped, *bounds)[name], current_weights(fn, state, *bounds)[name]) < 1e-10
    rest = [None if x is None else x[:, 21:] for x in inputs]
    y_rest, continued = memory_scan(fn, params, *rest, state=stepped, **options)
    assert rel_err(y_rest, y_all[:, 21:]) < 1e-10
    for name in state.weights:
        assert rel_err(current_weights(fn, continued, *bounds)[name], current_weights(fn, state_all, *bounds)[name]) \
            < 1e-10


@pytest.mark.parametrize("depth,chunk,with_momentum,with_decay,bounded", [
    (1, 1, True, True, True), (2, 5, True, True, True), (3, 4, False, True, True), (2, 8, True, False, True),
    (2, 5, True, True, False), (2, 4, False, False, False)])
def test_fixed_shape_decoding_equals_the_chunked_scan(depth, chunk, with_momentum, with_decay, bounded):
    """ops.memory_decode token by token from a 3-token memory_scan (a state left mid-chunk, folded in by
    decode_state): the chunked scan's retrievals, buffers that keep their shapes, and a state (memory_state) that a
    scan continues on the one-call result, with and without each gate, clipping and chunk-normalised steps."""
    memory = MLPMemory(dim=4, depth=depth, hidden=6)
    params = memory.init_params(3, generator=torch.Generator().manual_seed(2), dtype=F64)
    inputs = make_inputs(t=26, seed=3, with_momentum=with_momentum, with_decay=with_decay)
    options = dict(max_grad_norm=0.5 if bounded else None, normalize_chunk_lr=bounded)
    y_all, state_all = memory_scan(memory, params, *inputs, chunk_size=chunk, **options)
    head = [None if x is None else x[:, :3] for x in inputs]
    out, state = memory_scan(memory, params, *head, chunk_size=chunk, **options)
    fixed = decode_state(memory, state, chunk, *options.values(), with_momentum, with_decay)
    outs, shapes = [out], None
    for t in range(3, 21):
        keys, values, queries, lr, momentum, decay = (None if x is None else x[:, t:t + 1] for x in inputs)
        out, fixed = decode_step(memory, keys, values, queries, lr, momentum, decay, fixed, *options.values())
        outs.append(out)
        now = [t.shape for t in tensors(fixed)]
        assert shapes is None or now == shapes
        shapes = now
    assert rel_err(torch.cat(outs, 1), y_all[:, :21]) < 1e-10
    rest = [None if x is None else x[:, 21:] for x in inputs]
    y_rest, continued = memory_scan(memory, params, *rest, chunk_size=chunk,
                                    state=memory_state(fixed, options["normalize_chunk_lr"]), **options)
    assert rel_err(y_rest, y_all[:, 21:]) < 1e-10
    for name in state_all.weights:
        assert rel_err(current_weights(memory, continued, *options.values())[name],
                       current_weights(memory, state_all, *options.values())[name]) < 1e-10
