"""The trainer: exact resume (in process and after a kill), DDP equivalence, gradient accumulation, truncated BPTT,
activation checkpointing, non-finite stops, the run directory."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from books_corpus import prepare_books_corpus
from safetensors.torch import load_file

import titans.train as train_module
from titans.batches import SyntheticBatches, make_batches
from titans.checkpoint import latest_checkpoint
from titans.config import RunConfig
from titans.data.synthetic import PatternTask
from titans.fileio import save_yaml
from titans.metrics import read_metrics
from titans.model import TitansLM
from titans.ops.memory_scan import _chunk_step, _compiled_chunk_step
from titans.ops.ttt import _compiled_minibatch, _minibatch
from titans.train import TrainingError, train
from titans.typed_yaml import ConfigError, from_dict

ROOT = Path(__file__).resolve().parents[1]


def tiny(variant: str = "mac", **sections) -> RunConfig:
    """A model of a few thousand parameters on the pattern task: a step takes milliseconds."""
    data = {
        "name": "tiny",
        "model": dict(variant=variant, vocab_size=16, dim=16, layers=2, heads=2, window=8, segment_len=8,
                      chunk_size=4, num_persistent=2),
        "data": {"task": "pattern", "kwargs": {"max_period": 4}},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 4, "seq_len": 16, "eval_every": 3, "eval_batches": 1,
                  "checkpoint_every": 2, "log_every": 1},
        "eval": {"batch_size": 4, "samples": 4, "lengths": [16, 32], "depths": [0.0, 1.0], "chunk_len": 8},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return from_dict(RunConfig, data)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


def losses(run_dir: Path) -> list[dict]:
    """Metric records without the timing ones (wall-clock dependent)."""
    return [{k: v for k, v in r.items() if "per_s" not in k} for r in read_metrics(run_dir)]


# ------------------------------------------------------------------------------------------------ batches
def test_synthetic_batches_shard_the_global_batch_and_resume():
    task = PatternTask(vocab_size=16, seq_len=8, max_period=4)
    whole = SyntheticBatches(task, 4, seed=3)
    halves = [SyntheticBatches(task, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        batch = next(whole)
        parts = [next(h) for h in halves]
        assert torch.equal(batch.inputs, torch.cat([p.inputs for p in parts]))
        assert torch.equal(batch.loss_mask, torch.cat([p.loss_mask for p in parts]))
    resumed = SyntheticBatches(task, 4, seed=3)
    resumed.load_state_dict(whole.state_dict())
    assert torch.equal(next(resumed).inputs, next(whole).inputs)
    with pytest.raises(ValueError, match="seed"):
        SyntheticBatches(task, 4, seed=4).load_state_dict(whole.state_dict())


def test_batch_config_errors():
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        make_batches(tiny(train={"batch_size": 3}), world_size=2)
    with pytest.raises(ConfigError, match="'model.vocab_size' is 16"):
        make_batches(tiny(data={"kwargs": {"vocab_size": 32}}))
    with pytest.raises(ConfigError, match="2 \\* length \\+ gap = 20 tokens but 'train.seq_len' is 16"):
        make_batches(tiny(data={"task": "copy", "kwargs": {"length": 10}}))
    with pytest.raises(ConfigError, match="train.seq_len"):
        make_batches(tiny(data={"kwargs": {"seq_len": 16}}))


# ------------------------------------------------------------------------------------------------ resume
def test_resume_is_bitwise_exact(tmp_path):
    config = tiny(optim={"grad_accum": 2}, train={"tbptt_segments": 2, "tbptt_horizon": 1, "log_every": 2})
    whole = train(config, tmp_path / "whole", progress=False)
    assert whole["step"] == 6 and whole["resumed_from"] is None
    first = train(config, tmp_path / "split", stop_at=3, progress=False)
    assert first["step"] == 3 and latest_checkpoint(tmp_path / "split").name == "ckpt-000003"
    second = train(config, tmp_path / "split", resume=True, progress=False)
    assert second["resumed_from"] == 3 and second["step"] == 6

    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = load_file(latest_checkpoint(tmp_path / "whole") / "state.safetensors")
    state_b = load_file(latest_checkpoint(tmp_path / "split") / "state.safetensors")
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # AdamW moments too
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    assert [r["step"] for r in losses(tmp_path / "whole") if "train/loss" in r] == [2, 4, 6]
    assert whole["eval"] == second["eval"]


def test_killed_run_resumes_exactly(tmp_path):
    config = tiny(train={"steps": 40, "checkpoint_every": 2, "eval_every": 0, "log_every": 1})
    path = tmp_path / "config.yaml"
    save_yaml(config, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "titans", "train", str(path), "--run-dir", str(run_dir), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoints" / "latest").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = int(latest_checkpoint(run_dir).name.split("-")[1])
    assert 2 <= killed_at < 40

    resumed = subprocess.run(command[:4] + ["--resume", str(run_dir), "--no-progress"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {killed_at}" in resumed.stdout

    train(config, tmp_path / "whole", progress=False)
    a, b = weights(tmp_path / "whole"), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "whole") == losses(run_dir)


def test_resume_needs_the_same_config(tmp_path):
    train(tiny(train={"steps": 2}), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"optim.lr \(0.01 in the run, 0.02 now\)"):
        train(tiny(train={"steps": 2}, optim={"lr": 2e-2}), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tiny(train={"steps": 2}), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        train(tiny(), tmp_path / "nothing", resume=True, progress=False)


# ------------------------------------------------------------------------------------------------ the step
def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Two micro-batches of 4 read the examples of one batch of 8 and weigh every scored token equally (the
    pattern task scores a different number of tokens per sequence)."""
    accumulated = train(tiny(optim={"grad_accum": 2}, train={"steps": 3}), tmp_path / "a", progress=False)
    single = train(tiny(train={"steps": 3, "batch_size": 8}), tmp_path / "b", progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    # float32 sums in another order; Adam magnifies that on parameters whose gradient is still ~0 (MAC's memory,
    # behind its zero output projection): ~1.5e-6 after 3 steps
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert accumulated["train_loss"] == pytest.approx(single["train_loss"], rel=1e-6)
    norms = [[r["train/grad_norm"] for r in read_metrics(tmp_path / d) if "train/grad_norm" in r] for d in "ab"]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_truncated_bptt(tmp_path, variant):
    """Segments that carry the state without a horizon give the full gradient; a horizon of 1 cuts it."""
    train(tiny(variant, train={"steps": 2}), tmp_path / "full", progress=False)
    train(tiny(variant, train={"steps": 2, "tbptt_segments": 2}), tmp_path / "segments", progress=False)
    train(tiny(variant, train={"steps": 2, "tbptt_segments": 2, "tbptt_horizon": 1}), tmp_path / "cut",
          progress=False)
    full, segments, cut = (weights(tmp_path / name) for name in ("full", "segments", "cut"))
    assert all(torch.allclose(full[k], segments[k], atol=1e-5) for k in full)
    assert max((full[k] - cut[k]).abs().max() for k in full) > 1e-4


def test_activation_checkpointing_gives_the_same_weights(tmp_path, monkeypatch):
    train(tiny(train={"steps": 2, "tbptt_segments": 2}), tmp_path / "plain", progress=False)
    chunks = []
    real = TitansLM.set_activation_checkpointing
    monkeypatch.setattr(TitansLM, "set_activation_checkpointing",
                        lambda model, n: chunks.append(n) or real(model, n))
    train(tiny(train={"steps": 2, "tbptt_segments": 2, "activation_checkpointing": True}), tmp_path / "recomputed",
          progress=False)
    assert chunks == [True]  # the memory recomputes every chunk in the backward pass
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "recomputed")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("variant, step", [("mac", _chunk_step), ("ttt", _minibatch)])
def test_compile_gives_the_same_weights(tmp_path, monkeypatch, variant, step):
    """train.compile wraps the model in torch.compile and compiles the memory op's chunk step (TTT's mini-batch step;
    the loop over chunks is not traced). Inductor's code generation is swapped for the aot_eager backend (graph capture
    and AOT autograd are what this checks; benchmarks/bench_compile.py compares inductor's results)."""
    train(tiny(variant, train={"steps": 2}), tmp_path / "eager", progress=False)
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or real(fn, backend="aot_eager", **kw))
    for cache in (_compiled_chunk_step, _compiled_minibatch):
        cache.cache_clear()
    try:
        train(tiny(variant, train={"steps": 2, "compile": True}), tmp_path / "compiled", progress=False)
    finally:
        for cache in (_compiled_chunk_step, _compiled_minibatch):
            cache.cache_clear()
    assert [type(fn).__name__ for fn in compiled] == ["TitansLM", "function"] and compiled[1] is step
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.inf


@pytest.mark.parametrize("failure, message", [("loss", "non-finite loss \\(nan\\) at step 3"),
                                              ("gradient", "non-finite gradient norm \\((inf|nan)\\) at step 3")])
def test_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, failure, message):
    calls = {"n": 0}
    real = train_module.masked_loss_sum

    def failing(logits, targets, mask, weight=None):
        calls["n"] += 1
        loss = real(logits, targets, mask, weight)
        if calls["n"] <= 2:  # one call per step: steps 1 and 2 are fine
            return loss
        return loss * torch.nan if failure == "loss" else _InfiniteGradient.apply(loss)

    monkeypatch.setattr(train_module, "masked_loss_sum", failing)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match=message + ".*ckpt-000002"):
        train(tiny(), run_dir, progress=False)
    assert latest_checkpoint(run_dir).name == "ckpt-000002"
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2]


def test_non_finite_weights_stop_before_the_save_and_name_the_last_finite_checkpoint(tmp_path, monkeypatch):
    """Step 4's loss is finite but its update makes a weight NaN: that checkpoint must not be written."""
    real = train_module.build_optimizer

    def poisoned(model, config):
        optimizer, count = real(model, config), {"n": 0}

        def after_step(*_):
            count["n"] += 1
            if count["n"] == 4:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite weights .* after step 4; .*last good checkpoint is "
                                            ".*ckpt-000002"):
        train(tiny(), run_dir, progress=False)
    assert latest_checkpoint(run_dir).name == "ckpt-000002"


# ------------------------------------------------------------------------------------------------ run dir
def test_run_directory(tmp_path):
    summary = train(tiny(train={"keep_last": 2}), tmp_path / "run", progress=False)
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "loss.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*")) == ["ckpt-000004", "ckpt-000006"]
    records = read_metrics(run_dir)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "eval/loss" in r] == [3, 6]
    assert summary["tokens"] == 6 * 4 * 16 and summary["checkpoint"].endswith("ckpt-000006")
    assert 0 <= summary["eval"]["eval/accuracy"] <= 1
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert lrs[:2] == pytest.approx([5e-3, 1e-2])  # linear warmup over 2 steps, then cosine decay
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5]


def test_training_learns_the_pattern(tmp_path, capsys):
    """A memory-only model (LMM, no attention) learns to continue repeated patterns: held-out loss falls (by 25% in
    60 steps at seed 0; in 40, by 11% with the memory's step bound max_lr 0.25)."""
    summary = train(tiny("lmm", train={"steps": 60, "eval_every": 0, "checkpoint_every": 0, "batch_size": 16},
                         optim={"lr": 3e-2}), tmp_path / "run", progress=False)
    first = read_metrics(tmp_path / "run")[0]["train/loss"]
    assert summary["eval"]["eval/loss"] < 0.85 * first
    assert summary["chance_loss"] == pytest.approx(math.log(16)) and summary["train_loss"] < summary["chance_loss"]
    assert "has not fallen" not in capsys.readouterr().out


def test_a_loss_that_does_not_move_is_reported(tmp_path, capsys):
    """A learning rate that cannot train: far too small, or 10x too large (it sits at chance)."""
    for lr in (1e-9, 1e-1):
        summary = train(tiny(optim={"lr": lr, "warmup_steps": 12}, train={"steps": 14, "eval_every": 0}),
                        tmp_path / f"run-{lr}", progress=False)
        out = capsys.readouterr().out
        assert "the training loss has not fallen from its initial value by step 12 (end of warm-up)" in out
        assert f"optim.lr={lr:g}" in out and summary["train_loss"] > 0.99 * summary["chance_loss"]


# ------------------------------------------------------------------------------------------------ torchrun
def test_two_processes_match_one(tmp_path):
    config = tiny(optim={"grad_accum": 2}, train={"steps": 3, "tbptt_segments": 2, "eval_every": 0})
    path = tmp_path / "config.yaml"
    save_yaml(config, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "titans", "train", str(path), "--run-dir", str(tmp_path / "ddp"), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained") == 1  # rank 0 alone reports
    train(config, tmp_path / "single", progress=False)

    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [r["step"] for r in single] == [r["step"] for r in ddp]
    for x, y in zip(single, ddp, strict=True):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-5) for k in x)


# ------------------------------------------------------------------------------------------------ documents
@pytest.fixture(scope="module")
def documents_corpus(tmp_path_factory) -> Path:
    """A byte-level corpus of train documents of different lengths (prepared from a fixture archive)."""
    books = {f"train_{i}": f"doc {i}. " * n for i, n in enumerate([3, 9, 5, 12, 2, 7])}
    books |= {"held_val": "the validation document. " * 6, "held_test": "the test document. " * 6}
    return prepare_books_corpus(tmp_path_factory.mktemp("documents"), books, "held_val", "held_test")


def documents_config(data_dir: Path, **train_section) -> RunConfig:
    return tiny(model={"vocab_size": 256},
                data={"task": "text", "kwargs": {}, "tokenizer": "byte", "data_dir": str(data_dir),
                      "sampling": "documents"},
                train={"steps": 14, "batch_size": 2, "seq_len": 16, "tbptt_segments": 2, "eval_every": 0,
                       **train_section})


def test_document_sampling_carries_the_state_within_documents(tmp_path, documents_corpus, monkeypatch):
    """Each step starts from the state the previous one ended with while the rows read the same documents, from a
    fresh state when they start new ones; the carried state is in the checkpoint, so resuming mid-document is
    exact."""
    from titans.batches import open_text_stream
    from titans.checkpoint import load_checkpoint
    from titans.data.loader import DocumentSegments
    from titans.state import unpack_state

    config = documents_config(documents_corpus)
    stream = open_text_stream(config, "train")
    flags = [fresh for _, _, fresh in itertools.islice(DocumentSegments(stream, 16, 2, seed=0), 14)]
    expected, position = [], 0
    for fresh in flags:
        position = 0 if fresh else position + 16
        expected.append(None if fresh else position)
    assert flags.count(True) >= 3 and flags.count(False) >= 3  # several groups of documents, several segments each

    starts = []
    forward = train_module.SegmentLoss.forward

    def spy(self, inputs, targets, loss_mask, state=None, loss_weight=None):
        starts.append(None if state is None else state.position)
        return forward(self, inputs, targets, loss_mask, state, loss_weight)

    monkeypatch.setattr(train_module.SegmentLoss, "forward", spy)
    train(config, tmp_path / "whole", progress=False)
    assert starts == expected  # one window per step (no horizon): the state it starts from

    stop = next(step for step in range(2, 13) if not flags[step])  # the step after `stop` continues documents
    train(config, tmp_path / "split", stop_at=stop, progress=False)
    carried = load_checkpoint(latest_checkpoint(tmp_path / "split"), restore_rng=False)["extra"]["carried"]
    assert len(carried) == 1 and unpack_state(carried[0]).position == expected[stop]
    train(config, tmp_path / "split", resume=True, progress=False)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")


def test_document_sampling_needs_text_and_enough_documents(documents_corpus):
    with pytest.raises(ConfigError, match="'data.sampling' must be windows unless data.task is text"):
        tiny(data={"sampling": "documents"})
    with pytest.raises(ConfigError, match=r"train.batch_size \(8\) documents side by side, but the train split has 6"):
        make_batches(documents_config(documents_corpus, batch_size=8))


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "transformer", "deltanet", "ttt"])
def test_states_put_the_batch_first(variant):
    """Every tensor of a state holds the batch elements in contiguous runs along its first dimension, so a rank's
    rows of the carried state are a slice of the global batch's (data.sampling documents under torchrun)."""
    from titans.state import map_tensors, tensors

    torch.manual_seed(0)
    model = TitansLM(tiny(variant).model).eval()
    tokens = torch.randint(0, 16, (4, 11))
    with torch.no_grad():
        _, whole = model(tokens)
        _, half = model(tokens[2:])
    assert all(t.shape[0] % 4 == 0 for t in tensors(whole.layers))
    second = map_tensors(list(whole.layers), lambda t: t.chunk(2)[1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(tensors(second), tensors(half.layers), strict=True))
