"""titans.decoding: the fixed-shape decode states and step of every mixer equal `TitansLM.step` (and so one chunked
forward call), hand back a state that continues like forward's, keep every shape from token to token, and the
compiled graph generates the same tokens as eager decoding without recompiling."""

import pytest
import torch

from titans.decoding import Decoder, DecodeState, capacity_for
from titans.model import VARIANTS, TitansLM, preset
from titans.state import map_tensors


def tiny(variant, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return TitansLM(preset("tiny", variant, vocab_size=32, **kw)).to(dtype).eval()


def shapes(state: DecodeState) -> list:
    found = []
    map_tensors(state.layers, lambda t: found.append((tuple(t.shape), t.stride(), t.dtype)) or t)
    return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_shape_decoding_equals_chunked_forward(variant):
    """From a 3-token prompt (a partial memory chunk that memory_scan left, without running weights) over 40 tokens
    that cross memory chunk (8), window and segment (16) boundaries: the logits of one chunked forward call, shapes
    and strides that never change after the first token, and a state that continues like forward's (43 tokens: the
    sliding window's ring of 15 slots does not end in chronological order)."""
    model = tiny(variant)
    tokens = torch.randint(0, 32, (2, 48))
    whole, _ = model(tokens)
    decoder = Decoder(model, compile=False)
    with torch.no_grad():
        logits, state = model(tokens[:, :3])
        state = decoder.begin(state, capacity=43)
        outs = [logits]
        for t in range(3, 43):
            logits, state = decoder.step(tokens[:, t:t + 1], state)
            outs.append(logits)
            if t == 3:
                first = shapes(state)
            assert shapes(state) == first, f"a shape changed at token {t}"
        with pytest.raises(ValueError, match="full \\(43 tokens\\)"):
            decoder.step(tokens[:, :1], state)
        state = decoder.end(state)
        outs.append(model(tokens[:, 43:], state)[0])
    assert torch.allclose(torch.cat(outs, 1), whole, rtol=0, atol=1e-10)
    assert state.position == 43


@pytest.mark.parametrize("variant", ["swa", "mac", "ttt"])
def test_begin_takes_a_state_that_step_made(variant):
    """A state left by `step` mid-chunk (running weights carried; TTT's pending mini-batch) and with a full sliding
    window."""
    model = tiny(variant)
    tokens = torch.randint(0, 32, (1, 40))
    whole, _ = model(tokens)
    decoder = Decoder(model, compile=False)
    with torch.no_grad():
        _, state = model(tokens[:, :20])
        for t in range(20, 27):
            _, state = model.step(tokens[:, t:t + 1], state)
        fixed = decoder.begin(state, capacity=64)
        outs = []
        for t in range(27, 40):
            logits, fixed = decoder.step(tokens[:, t:t + 1], fixed)
            outs.append(logits)
    assert torch.allclose(torch.cat(outs, 1), whole[:, 27:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", ["mac", "mal"])
def test_compiled_generation_equals_eager_and_compiles_once(variant):
    """generate(compile=True): the greedy tokens of eager decoding, a returned state that continues alike, one graph
    for every token and for a second generation of another prompt and length (same capacity; MAL's prefix passes
    through the graph unchanged, which must not make its identity part of the graph's guards)."""
    model = tiny(variant, dtype=torch.float32)
    prompt = torch.randint(0, 32, (2, 11))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, eager_state = model.generate(prompt, 20, return_state=True)
    fast, fast_state = model.generate(prompt, 20, return_state=True, compile=True)
    assert torch.equal(fast, eager)
    model.generate(prompt[:, :7], 9, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    more = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        assert torch.allclose(model(more, fast_state)[0], model(more, eager_state)[0], rtol=0, atol=1e-4)


def test_every_model_compiles_its_own_graphs():
    """torch.compile keeps at most recompile_limit graphs per code object; each decoder has a code object of its own,
    so a process decodes with more models than that (here the limit is 1 and there are two models)."""
    with torch._dynamo.config.patch(recompile_limit=1):  # not monkeypatch: its undo deletes the config entry
        for variant in ("swa", "deltanet"):
            model = tiny(variant, dtype=torch.float32)
            prompt = torch.randint(0, 32, (1, 6))
            assert torch.equal(model.generate(prompt, 5, compile=True), model.generate(prompt, 5))


def test_refusals_are_one_line():
    decoder = Decoder(tiny("lmm"), compile=False)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.begin(decoder.model(torch.zeros(1, 0, dtype=torch.long))[1], capacity=8)
    full = tiny("transformer")
    with torch.no_grad():
        _, state = full(torch.randint(0, 32, (1, 12)))
    with pytest.raises(ValueError, match="holds 12 tokens, more than the capacity 8"):
        Decoder(full, compile=False).begin(state, capacity=8)


def test_capacity_rounds_up_to_a_power_of_two():
    assert [capacity_for(n) for n in (1, 256, 257, 1000, 1025)] == [256, 256, 512, 1024, 2048]
