"""titans.hf: the config's keys, exact save_pretrained / from_pretrained round trips, AutoModelForCausalLM, generate()
with the memory state as its cache (equal to recomputation for every variant), padding refused, and `titans
export-hf` / `import-hf` between run directories and transformers directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from titans import VARIANTS, TitansConfig, TitansLM, preset  # noqa: E402
from titans.checkpoint import save_checkpoint  # noqa: E402
from titans.cli import main  # noqa: E402
from titans.config import RunConfig  # noqa: E402
from titans.evaluate import load_run  # noqa: E402
from titans.fileio import save_yaml  # noqa: E402
from titans.hf import TitansCache, TitansForCausalLM, TitansHFConfig  # noqa: E402
from titans.hf.configuration import FIELDS  # noqa: E402
from titans.typed_yaml import to_dict  # noqa: E402

VOCAB = 32


def tiny(variant: str = "mac", **overrides) -> TitansForCausalLM:
    torch.manual_seed(0)
    return TitansForCausalLM(TitansHFConfig.from_titans(preset("tiny", variant, vocab_size=VOCAB, **overrides))).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_keys_are_titans_fields():
    config = preset("tiny", "mag", tie_embeddings=True)
    hf = TitansHFConfig.from_titans(config)
    assert set(hf.to_diff_dict()) - {"model_type", "transformers_version"} == set(FIELDS)
    assert hf.to_titans() == config and TitansHFConfig().to_titans() == TitansConfig()
    assert hf == TitansHFConfig.from_titans(config) and hf != TitansHFConfig.from_titans(config.replace(window=8))
    assert (hf.hidden_size, hf.num_hidden_layers, hf.tie_word_embeddings) == (config.dim, config.layers, True)
    with pytest.raises(ValueError, match="divisible by heads"):
        TitansHFConfig(dim=30, heads=4)


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_round_trip_is_exact(tmp_path, tie):
    model = tiny("mag", tie_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is TitansForCausalLM and loaded.config.to_titans() == model.config.to_titans()
    assert (loaded.model.head.weight is loaded.model.embed.weight) == tie
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    x = tokens(2, 20)
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_missing_weights_are_refused(tmp_path):
    import safetensors.torch

    tiny().save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del weights["model.blocks.0.ffn.down.weight"]
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights .* model.blocks.0.ffn.down.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_an_export_written_before_the_series_gate_loads_as_it_computed(tmp_path):
    """A MAL directory saved without `series_gate` (weights and config key): from_pretrained fills g = 1 (the form it
    was trained with) instead of refusing it, and computes the same logits."""
    import json

    import safetensors.torch

    model = tiny("mal", series_gate_init=1.0)
    model.save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    weights = {k: v for k, v in weights.items() if not k.endswith("series_gate")}
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    del config["series_gate_init"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(b.mixer.series_gate, torch.ones(b.mixer.memory.dim)) for b in loaded.model.blocks)
    x = tokens(2, 20)
    assert torch.equal(model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_decoding_equals_recomputation(variant, monkeypatch):
    model, prompt = tiny(variant), tokens(2, 13)  # 13 + 12 tokens cross chunk (8) and segment / window (16) ends
    read, steps, step = [], [], model.model.step
    model.model.register_forward_pre_hook(lambda module, args: read.append(args[0].shape[1]))
    monkeypatch.setattr(model.model, "step", lambda ids, state: (steps.append(ids.shape[1]), step(ids, state))[1])
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                            output_logits=True)
    assert read == [13] and steps == [1] * 11 and isinstance(cached.cache, TitansCache)  # decoding steps: step()
    assert cached.cache.get_seq_length() == 24
    read.clear()
    recomputed = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False,
                                return_dict_in_generate=True, output_logits=True)
    assert read == list(range(13, 25))  # every step reads the whole sequence again
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=1e-5, rtol=1e-5)


def test_generate_continues_a_given_cache():
    model, prompt = tiny("mac"), tokens(2, 21)
    cache = model(prompt[:, :9]).cache
    continued = model.generate(prompt, max_new_tokens=6, do_sample=False, cache=cache)
    assert torch.equal(continued, model.generate(prompt, max_new_tokens=6, do_sample=False))
    assert cache.get_seq_length() == 26  # advanced in place
    with pytest.raises(ValueError, match="give the whole sequence"):
        model.generate(prompt[:, :5], max_new_tokens=2, cache=cache)


def test_sampling(monkeypatch):
    model, prompt = tiny("lmm"), tokens(3, 6)

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=8)

    out = sample(0)
    assert out.shape == (3, 16) and torch.equal(out[:, :6], prompt) and 0 <= out.min() and out.max() < VOCAB
    assert torch.equal(out, sample(0)) and not torch.equal(out, sample(1))


def test_padding_and_beam_search_are_refused():
    model, prompt = tiny("swa"), tokens(2, 5)
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for call in (lambda: model.generate(prompt, attention_mask=left_padded, max_new_tokens=3),
                 lambda: model(prompt, attention_mask=left_padded.flip(1))):
        with pytest.raises(ValueError, match=r"^attention_mask holds padding \(zeros\)") as error:
            call()
        assert "\n" not in str(error.value)
    ones = torch.ones_like(prompt)
    assert model.generate(prompt, attention_mask=ones, max_new_tokens=3).shape == (2, 8)
    with pytest.raises(ValueError, match="only supports"):
        model.generate(prompt, num_beams=2, max_new_tokens=3)


def test_labels_give_the_next_token_loss():
    model, x = tiny("deltanet"), tokens(2, 9)
    out = model(x, labels=x)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_export_and_import_round_trip(tmp_path, capsys):
    config = RunConfig(model=preset("tiny", "mal", vocab_size=VOCAB, tie_embeddings=True), name="tiny")
    torch.manual_seed(0)
    original = TitansLM(config.model).eval()
    run_dir = tmp_path / "run"
    save_yaml(config, run_dir / "config.yaml")
    save_checkpoint(run_dir, 7, original, extra={"config": to_dict(config)})
    x = tokens(2, 20)
    expected, _ = original(x)

    (tmp_path / "hf").mkdir()  # an empty directory is taken
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert "tiny (mal, step 7) ->" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(exported(x).logits, expected)

    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_run(tmp_path / "back")
    assert back.step == 0 and back.config.model == config.model and back.config.name == "back"
    assert torch.equal(back.model(x)[0], expected)

    before = snapshot(tmp_path)
    for argv in (["export-hf", str(run_dir), str(tmp_path / "back")], ["import-hf", str(tmp_path / "hf"),
                                                                      str(run_dir)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "already exists and is not an empty directory" in err and err.count("\n") == 1
    assert main(["import-hf", str(run_dir), str(tmp_path / "new")]) == 2  # a run directory is not an HF one
    assert "config.json not found" in capsys.readouterr().err
    assert snapshot(tmp_path) == before and not list(tmp_path.glob(".tmp-*"))


def test_import_titans_registers_lazily(tmp_path):
    tiny().save_pretrained(tmp_path)
    script = f"""
import importlib.util, sys, titans
assert "transformers" not in sys.modules  # imported only when the program imports it
assert importlib.util.find_spec("transformers") is not None  # a probe, which must not use up the registration
from transformers import AutoConfig, AutoModelForCausalLM
assert AutoConfig.for_model("titans", dim=16, heads=2).to_titans().dim == 16
print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TitansForCausalLM"]


def test_without_transformers(tmp_path):
    script = """
import sys

class Absent:  # transformers as if not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
import titans
from titans.cli import main
sys.exit(main(["export-hf", "run", "out"]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("titans: error: this command needs transformers") and out.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())
