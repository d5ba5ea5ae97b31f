"""The memory state as an object: save -> load -> continue equals an unbroken stream for every variant; a state for
another model is a one-line error; detach, to and nbytes cover every tensor; `titans generate --state/--save-state`."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from titans.cli import main
from titans.config import RunConfig
from titans.fileio import save_yaml
from titans.model import TitansLM, TitansState, preset
from titans.state import METADATA_KEY, tensors
from titans.typed_yaml import from_dict

VARIANTS = ["lmm", "mac", "mag", "mal", "swa", "transformer", "deltanet", "gated_deltanet", "ttt"]
T, SPLIT = 45, 21  # the split falls inside a memory chunk (8), a MAC segment (16) and past the window (16)


def tiny(variant: str, seed: int = 0, **overrides) -> TitansLM:
    torch.manual_seed(seed)
    return TitansLM(preset("tiny", variant, vocab_size=32, **overrides)).double()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_continue_equals_an_unbroken_stream(tmp_path, tokens, variant):
    model = tiny(variant)
    with torch.no_grad():
        full, _ = model(tokens)
        _, state = model(tokens[:, :SPLIT])
    state.save(tmp_path / "state.safetensors")
    fresh = tiny(variant, seed=123)
    fresh.load_state_dict(model.state_dict())
    loaded = TitansState.load(tmp_path / "state.safetensors", fresh)
    assert (loaded.variant, loaded.dim, loaded.position) == (variant, 32, SPLIT)
    with torch.no_grad():
        rest, after = fresh(tokens[:, SPLIT:], loaded)
    torch.testing.assert_close(rest, full[:, SPLIT:], atol=1e-10, rtol=0)
    assert loaded.nbytes == state.nbytes
    assert after.position == T
    # the file is safetensors with its structure as JSON metadata, and nothing else beside it
    assert json.loads(safetensors.safe_open(str(tmp_path / "state.safetensors"), "pt").metadata()[METADATA_KEY])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_a_decoding_state_round_trips_with_or_without_its_running_weights(tokens, variant):
    """A state left mid-chunk by `step` carries the running W_t, S_t (O(1) decoding); packed and unpacked it continues
    the stream exactly, and so does a file written before those fields existed (they are rebuilt from the pending
    tokens)."""
    from titans.state import pack_state, unpack_state

    model = tiny(variant)
    with torch.no_grad():
        full, _ = model(tokens)
        _, state = model(tokens[:, :SPLIT])
        for t in range(SPLIT, SPLIT + 2):  # two decoded tokens: still mid-chunk (8)
            _, state = model.step(tokens[:, t:t + 1], state)
    packed = pack_state(state)
    structure = json.loads(packed["structure"])
    running, stripped = ("weights_now", "momentum_now", "unit_inputs"), []

    def strip(node):  # the file as the release before the running weights wrote it
        if isinstance(node, dict):
            if node.get("type") == "PendingTokens":
                assert node["fields"]["weights_now"] is not None
                node["fields"] = {k: v for k, v in node["fields"].items() if k not in running}
                stripped.append(node)
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)
    strip(structure)
    assert stripped
    older = {"structure": json.dumps(structure), "tensors": packed["tensors"]}
    for loaded in (unpack_state(packed), unpack_state(older)):
        with torch.no_grad():
            rest, _ = model(tokens[:, SPLIT + 2:], loaded)
            step, _ = model.step(tokens[:, SPLIT + 2:SPLIT + 3], loaded)
        torch.testing.assert_close(rest, full[:, SPLIT + 2:], atol=1e-10, rtol=0)
        torch.testing.assert_close(step, full[:, SPLIT + 2:SPLIT + 3], atol=1e-10, rtol=0)


def test_an_empty_state_round_trips(tmp_path, tokens):
    model = tiny("mac")
    _, state = model(tokens[:, :0])
    assert state.nbytes == 0
    state.save(tmp_path / "empty.safetensors")
    loaded = TitansState.load(tmp_path / "empty.safetensors", model)
    assert loaded.layers == [None, None] and loaded.position == 0
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, loaded)[0], model(tokens)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("maker, other, message", [
    ("mac", dict(variant="mag"), "different model (variant mac, width 32); this model is variant mag, width 32"),
    ("lmm", dict(dim=64), "different model (variant lmm, width 32); this model is variant lmm, width 64"),
    ("mag", dict(layers=3), "its state holds 2 layers but the model has 3"),
    ("lmm", dict(memory_depth=1), "layer 0 memory weights"),
    ("deltanet", dict(heads=4), "layer 0 fast weights S has shape"),
])
def test_a_state_for_another_model_is_a_one_line_error(tmp_path, tokens, maker, other, message):
    _, state = tiny(maker)(tokens[:, :SPLIT])
    state.save(tmp_path / "state.safetensors")
    variant = other.pop("variant", maker)
    with pytest.raises(ValueError, match="^.*$") as info:
        TitansState.load(tmp_path / "state.safetensors", tiny(variant, **other))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_state_file_missing_a_part_is_a_one_line_error(tmp_path, tokens):
    model = tiny("deltanet")
    _, state = model(tokens[:, :SPLIT])
    state.save(tmp_path / "state.safetensors")
    with safetensors.safe_open(str(tmp_path / "state.safetensors"), "pt") as f:
        structure = json.loads(f.metadata()[METADATA_KEY])
        named = {k: f.get_tensor(k) for k in f.keys()}
    del structure["layers"][1]["fields"]["conv"]["dict"]["k"]  # a convolution tail the model needs
    safetensors.torch.save_file(named, tmp_path / "edited.safetensors", metadata={METADATA_KEY: json.dumps(structure)})
    with pytest.raises(ValueError) as info:
        TitansState.load(tmp_path / "edited.safetensors", model)
    assert "layer 1 conv holds ['q', 'v'], this model's ['k', 'q', 'v']" in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_files_that_are_not_states_are_one_line_errors(tmp_path):
    model = tiny("swa")
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "weights.safetensors")
    for name, message in (("junk", "not a readable state file"), ("weights.safetensors", "not a titans state")):
        with pytest.raises(ValueError) as info:
            TitansState.load(tmp_path / name, model)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(FileNotFoundError):
        TitansState.load(tmp_path / "absent", model)


@pytest.mark.parametrize("variant", ["mac", "mal", "ttt"])
def test_nbytes_detach_and_to_cover_every_tensor(tokens, variant):
    model = tiny(variant)
    _, state = model(tokens[:, :SPLIT])  # with grad: the state's tensors are in the autograd graph
    every = tensors(state.layers)
    assert every and state.nbytes == sum(t.numel() * t.element_size() for t in every)
    assert any(t.requires_grad for t in every)
    assert not any(t.requires_grad for t in tensors(state.detach().layers))
    single = state.detach().to(torch.float32)
    assert all(t.dtype == torch.float32 for t in tensors(single.layers)) and single.nbytes * 2 == state.nbytes
    assert (single.position, single.variant, single.dim) == (state.position, state.variant, state.dim)
    moved = single.to("cpu")
    assert all(t.device.type == "cpu" for t in tensors(moved.layers))
    with torch.no_grad():  # a float32 state carries on in a float32 model
        model.float()(tokens[:, SPLIT:], single)


def test_cli_generate_with_a_saved_state(tmp_path, capsys, monkeypatch):
    from test_cli import TINY

    save_yaml(from_dict(RunConfig, TINY), tmp_path / "tiny.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", str(tmp_path / "tiny.yaml"), "--run-dir", str(run_dir), "--stop-at", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()

    def generate(*args):
        code = main(["generate", str(run_dir), "--max-new-tokens", "3", *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    # read a document once (8 tokens and 3 generated), then ask twice from the saved state
    code, doc_out, _ = generate("--prompt", "1 2 3 1 2 3 1 2", "--save-state", tmp_path / "doc.state")
    assert code == 0 and (tmp_path / "doc.state").is_file()
    doc = [1, 2, 3, 1, 2, 3, 1, 2] + [int(t) for t in doc_out.split()]
    answers = []
    for _ in range(2):
        code, out, _ = generate("--prompt", "3 1", "--state", tmp_path / "doc.state")
        assert code == 0
        answers.append(out)
    assert answers[0] == answers[1]  # the saved state is not changed by reading it
    # the saved state ends after the last generated token was fed: the same stream as doc + "3 1"
    code, unbroken, _ = generate("--prompt", " ".join(map(str, doc + [3, 1])))
    assert code == 0 and unbroken == answers[0]
    # --compile reaches generate (compiled decoding itself: tests/test_decoding.py)
    asked = []
    original = TitansLM.generate
    monkeypatch.setattr(TitansLM, "generate", lambda self, *a, **kw: asked.append(kw["compile"]) or original(
        self, *a, **{**kw, "compile": False}))
    code, compiled, _ = generate("--prompt", " ".join(map(str, doc + [3, 1])), "--compile")
    assert code == 0 and compiled == unbroken and asked == [True]
    monkeypatch.undo()

    # a state made by another model, and a path that is not a state: one line, exit status 2
    other = TitansLM(preset("tiny", "lmm", vocab_size=16))
    other(torch.tensor([[1, 2]]))[1].save(tmp_path / "other.state")
    (tmp_path / "junk.state").write_text("junk")
    for args, message in (((tmp_path / "other.state"), "made by a different model (variant lmm"),
                          ((tmp_path / "junk.state"), "not a readable state file"),
                          ((tmp_path / "absent.state"), "no state file at")):
        code, _, err = generate("--prompt", "1", "--state", args)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    code, _, err = generate("--prompt", "1", "--save-state", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "is a directory" in err, err
