"""The command line: a round trip on a tiny config, one-line errors with exit status 2, corrupt checkpoints that
leave the run directory alone, complete --help, and the demo on a shortened schedule."""

from __future__ import annotations

import argparse
import json
import re
import runpy
from pathlib import Path

import pytest
import torch

import titans.demo
from titans.batches import make_batches
from titans.cli import build_parser, load_config, main
from titans.config import RunConfig
from titans.fileio import save_yaml
from titans.model import VARIANTS, TitansLM, count_parameters
from titans.typed_yaml import from_dict

TINY = {
    "name": "tiny",
    "model": dict(variant="mac", vocab_size=16, dim=16, layers=2, heads=2, window=8, segment_len=8, chunk_size=4,
                  num_persistent=2),
    "data": {"task": "pattern", "kwargs": {"max_period": 4}},
    "optim": {"lr": 1e-2, "warmup_steps": 2},
    "train": {"steps": 4, "batch_size": 4, "seq_len": 16, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2,
              "log_every": 1},
    "eval": {"batch_size": 4, "samples": 4, "lengths": [16, 32], "depths": [0.0, 1.0], "chunk_len": 8},
}


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    save_yaml(from_dict(RunConfig, TINY), path)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_round_trip(tmp_path, capsys, config_file):
    run_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", config_file, "--run-dir", run_dir, "--stop-at", "2", "--no-progress")
    assert code == 0 and f"trained {run_dir} to step 2" in out
    assert re.search(r"final train loss \d\.\d{4}, chance 2\.7726 \(a uniform guess over 16 tokens\)", out)
    code, out, _ = run(capsys, "train", "--resume", run_dir, "--no-progress")
    assert code == 0 and "to step 4" in out and "resumed from step 2" in out

    code, out, _ = run(capsys, "eval", run_dir)
    result = json.loads((run_dir / "eval" / "pattern.json").read_text())
    assert code == 0 and sorted(result["by_length"]) == ["16", "32"] and (run_dir / "eval" / "pattern.png").is_file()
    assert f"accuracy {result['by_length']['32']['accuracy']:.3f}" in out

    code, out, _ = run(capsys, "niah", run_dir / "checkpoints" / "ckpt-000004", "--lengths", "16", "24",
                       "--depths", "0", "0.5", "1", "--samples", "2", "--out", tmp_path / "grid")
    grid = json.loads((tmp_path / "grid" / "needle_synthetic.json").read_text())
    assert code == 0 and len(grid["accuracy"]) == 2 and len(grid["accuracy"][0]) == 3

    code, out, _ = run(capsys, "generate", run_dir, "--prompt", "1 2 3 1 2 3", "--max-new-tokens", "5")
    tokens = [int(t) for t in out.split()]
    assert code == 0 and len(tokens) == 5 and all(0 <= t < 16 for t in tokens)
    code, again, _ = run(capsys, "generate", run_dir, "--prompt", "1 2 3 1 2 3", "--max-new-tokens", "5")
    assert again == out  # greedy decoding is deterministic

    code, out, _ = run(capsys, "inspect", run_dir, "--length", "40")
    report = json.loads((run_dir / "inspect" / "memory.json").read_text())
    assert code == 0 and report["piece_len"] == 8 and len(report["records"]) == 5 * 2  # 5 pieces x 2 layers
    assert (run_dir / "inspect" / "memory.png").is_file()

    code, out, _ = run(capsys, "params", config_file, "--set", "model.variant=lmm")
    total = count_parameters(from_dict(RunConfig, {**TINY, "model": {**TINY["model"], "variant": "lmm"}}).model)
    assert code == 0 and "total" in out and f"{total:,}" in out


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["--set", "train.steps=many"], "wrong type for 'train.steps': expected int, got str 'many'"),
    (["--set", "train.tbptt_segments=3"], "'train.seq_len' must be divisible by tbptt_segments=3, got 16"),
    (["--set", "model.variant=titan"], "invalid value for 'model.variant'"),
    (["--set", "data.kwargs.vocab_size=64"], "the pattern task uses 64 tokens but 'model.vocab_size' is 16"),
])
def test_config_errors_are_one_line(tmp_path, capsys, config_file, args, message):
    code, out, err = run(capsys, "train", config_file, "--run-dir", tmp_path / "run", "--no-progress", *args)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_file_errors(tmp_path, capsys, config_file):
    broken = tmp_path / "broken.yaml"
    broken.write_text(re.sub(r"\bsteps:", "stpes:", config_file.read_text()))
    code, _, err = run(capsys, "train", broken, "--run-dir", tmp_path / "run", "--no-progress")
    assert code == 2 and "unknown key 'train.stpes' (did you mean 'train.steps'?)" in err
    assert run(capsys, "train", tmp_path / "missing.yaml")[2] == f"titans: error: config file not found: " \
                                                                  f"{tmp_path / 'missing.yaml'}\n"
    code, _, err = run(capsys, "eval", tmp_path / "nowhere")
    assert code == 2 and "neither a checkpoint directory nor a run directory" in err
    code, _, err = run(capsys, "train", "--resume", tmp_path / "nowhere")
    assert code == 2 and "no run to resume" in err
    code, _, err = run(capsys, "train")
    assert code == 2 and "give a CONFIG file, or --resume RUN_DIR" in err


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]), "truncated"),
    (lambda c: (c / "checkpoint.json").write_text("{not json"), "corrupt or truncated JSON"),
    (lambda c: (c / "state.safetensors").unlink(), "missing file"),
])
def test_corrupt_checkpoint_is_reported_and_the_run_left_intact(tmp_path, capsys, config_file, damage, message):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", config_file, "--run-dir", run_dir, "--stop-at", "2", "--no-progress")[0] == 0
    damage(run_dir / "checkpoints" / "ckpt-000002")
    before = snapshot(run_dir)
    for args in (["eval", run_dir], ["generate", run_dir, "--prompt", "1 2"], ["train", "--resume", run_dir]):
        code, _, err = run(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, args
    assert snapshot(run_dir) == before


def test_every_option_is_documented(capsys):
    parser = build_parser()
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    parsers = dict(subcommands.choices)
    parsers["data prepare"] = parsers["data"]._subparsers._group_actions[0].choices["prepare"]
    for name, sub in parsers.items():
        for action in sub._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"titans {name}: {action.dest} has no help"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(option in out for option in ("--set", "--run-dir", "--resume", "--stop-at", "--no-progress"))


def test_bench_rejects_unknown_names(capsys):
    code, _, err = run(capsys, "bench", "nonexistent")
    assert code == 2 and "unknown benchmark 'nonexistent'" in err


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """The demo on a shortened schedule: both models train, are evaluated and reported."""
    short = {**titans.demo.DEMO_CONFIG, "train": {**titans.demo.DEMO_CONFIG["train"], "batch_size": 4},
             "eval": {**titans.demo.DEMO_CONFIG["eval"], "samples": 4, "lengths": [96, 192]}}
    monkeypatch.setattr(titans.demo, "DEMO_CONFIG", short)
    code, out, _ = run(capsys, "demo", "--out", tmp_path / "demo", "--steps", "3")
    assert code == 0
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(result["models"]) == {"demo-titans-lmm", "demo-baseline-swa"}
    sizes = [m["parameters"] for m in result["models"].values()]
    assert abs(sizes[0] - sizes[1]) <= 0.05 * sizes[0]  # the baseline is matched in size
    assert (tmp_path / "demo" / "accuracy.png").is_file() and "Titans LMM" in out and "SWA baseline" in out
    assert run(capsys, "demo", "--out", tmp_path / "demo", "--steps", "3", "--no-baseline")[0] == 0  # rerun
    (tmp_path / "mine" / "demo-titans-lmm").mkdir(parents=True)
    code, _, err = run(capsys, "demo", "--out", tmp_path / "mine", "--steps", "3")
    assert code == 2 and "is not a demo run" in err


# ------------------------------------------------------------------------------------------------ shipped configs
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGETS = {"small": 1_500_000, "170m": 170_000_000, "340m": 340_000_000}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("lm/*/*.yaml")), ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_language_model_configs_have_their_size(path):
    config = load_config(path)
    assert config.data.task == "text" and config.model.variant == path.stem
    assert count_parameters(config.model) == pytest.approx(TARGETS[path.parent.name], rel=0.05)  # built on meta


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("synthetic/*.yaml")), ids=lambda p: p.stem)
def test_synthetic_configs_build_for_every_variant(path):
    for variant in VARIANTS:
        config = load_config(path, [f"model.variant={variant}"])
        batch = next(make_batches(config))
        assert batch.inputs.shape == (config.train.batch_size, config.train.seq_len)
        with torch.no_grad():
            logits, _ = TitansLM(config.model)(batch.inputs[:1])
        assert logits.shape == (1, config.train.seq_len, config.model.vocab_size)


def test_every_size_has_every_variant():
    assert {p.stem for p in CONFIGS.glob("synthetic/*.yaml")} == {"copy", "pattern", "needle", "recall"}
    for size in TARGETS:
        assert {p.stem for p in (CONFIGS / "lm" / size).glob("*.yaml")} == set(VARIANTS)


@pytest.mark.parametrize("size", TARGETS)
def test_lm_configs_are_current(size):
    """configs/lm/<size>/*.yaml are what configs/lm/generate.py writes: rerun it after changing a preset."""
    render = runpy.run_path(str(CONFIGS / "lm" / "generate.py"))["render"]
    for variant in VARIANTS:
        path = CONFIGS / "lm" / size / f"{variant}.yaml"
        assert path.read_text(encoding="utf-8") == render(size, variant), f"{path} is stale"


# ---------------------------------------------------------------------------- run names and one writer per run
@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE", "''", "a/b", "..", ".", "' '", "a\\\\b"])
def test_run_names_are_plain_directory_names(tmp_path, capsys, config_file, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    name = name.replace("ABSOLUTE", str(tmp_path / "escaped"))
    code, _, err = run(capsys, "train", config_file, "--set", f"name={name}", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "'name' must be a plain directory name" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("flag", ["--run-dir", "--resume"])
def test_empty_run_directory_flags_are_refused(tmp_path, capsys, config_file, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", config_file, flag, "", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and f"{flag}: give a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_a_second_writer_is_refused(tmp_path, capsys, config_file):
    from titans.fileio import exclusive_lock
    from titans.train import LOCK_FILE

    run_dir = tmp_path / "run"
    assert run(capsys, "train", config_file, "--run-dir", run_dir, "--stop-at", "2", "--no-progress")[0] == 0
    before = snapshot(run_dir)
    with exclusive_lock(run_dir / LOCK_FILE, "held by the test"):  # as a first `train --resume` still running
        for args in (["train", "--resume", run_dir, "--no-progress"],
                     ["train", config_file, "--run-dir", run_dir, "--no-progress"]):
            code, _, err = run(capsys, *args)
            assert code == 2 and err.count("\n") == 1 and "in use by another titans process" in err, err
    assert snapshot(run_dir) == before
    assert run(capsys, "train", "--resume", run_dir, "--no-progress")[0] == 0  # released when the holder ends


# --------------------------------------------------------------------------------------- numeric flags
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    save_yaml(from_dict(RunConfig, TINY), root / "tiny.yaml")
    assert main(["train", str(root / "tiny.yaml"), "--run-dir", str(root / "run"), "--stop-at", "2",
                 "--no-progress"]) == 0
    return root / "run"


@pytest.mark.parametrize("args, message", [
    (["generate", "RUN", "--prompt", "1 2", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["generate", "RUN", "--prompt", "1 2", "--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
    (["generate", "RUN", "--prompt", "1 2", "--temperature", "nan"], "--temperature must be >= 0, got nan"),
    (["generate", "RUN", "--prompt", "1 2", "--temperature", "inf"], "--temperature must be finite, got inf"),
    (["generate", "RUN", "--prompt", "1 2", "--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["eval", "RUN", "--samples", "0"], "--samples must be >= 1, got 0"),
    (["eval", "RUN", "--lengths", "16", "0"], "--lengths must be >= 1, got 0"),
    (["eval", "RUN", "--task", "needle", "--depths", "1.5"], "--depths must lie in [0, 1], got 1.5"),
    (["eval", "RUN", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["niah", "RUN", "--samples", "0"], "--samples must be >= 1, got 0"),
    (["inspect", "RUN", "--piece-len", "0"], "--piece-len must be >= 1, got 0"),
    (["inspect", "RUN", "--length", "-4"], "--length must be >= 1, got -4"),
    (["train", "RUN", "--stop-at", "-1"], "--stop-at must be >= 0, got -1"),
    (["demo", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["demo", "--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_numeric_flags_are_checked_before_anything_runs(tmp_path, capsys, trained_run, args, message):
    before = snapshot(trained_run)
    code, out, err = run(capsys, *[str(trained_run) if a == "RUN" else a for a in args])
    assert code == 2 and err == f"titans: error: {message}\n" and not out
    assert snapshot(trained_run) == before


# ---------------------------------------------------------------------------- failures that are one line
def test_unwritable_output_is_refused_before_evaluating(tmp_path, capsys, trained_run, monkeypatch):
    import titans.evaluate

    def never(*args, **kwargs):
        raise AssertionError("computed before checking the output directory")

    for name in ("eval_synthetic", "eval_needle"):
        monkeypatch.setattr(titans.evaluate, name, never)
    monkeypatch.setattr("titans.inspection.inspect_memory", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for command in ("eval", "niah", "inspect"):
        code, _, err = run(capsys, command, trained_run, "--out", blocker / "out")
        assert code == 2 and err.count("\n") == 1 and f"cannot write to {blocker / 'out'}" in err, err


def test_full_disk_during_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, config_file, monkeypatch):
    import errno

    import titans.checkpoint

    run_dir = tmp_path / "run"
    assert run(capsys, "train", config_file, "--run-dir", run_dir, "--stop-at", "2", "--no-progress")[0] == 0

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(titans.checkpoint.safetensors.torch, "save_file", full)
    code, _, err = run(capsys, "train", "--resume", run_dir, "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert (run_dir / "checkpoints" / "latest").read_text() == "ckpt-000002\n"
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_foreign_metrics_file_is_one_line(tmp_path, capsys, config_file):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", config_file, "--run-dir", run_dir, "--stop-at", "2", "--no-progress")[0] == 0
    for foreign in ('[1, 2]\n{"step": 1}\n', '{"loss": 1}\n{"step": 1}\n', '"text"\n{"step": 1}\n'):
        (run_dir / "metrics.jsonl").write_text(foreign)
        before = snapshot(run_dir)
        code, _, err = run(capsys, "train", "--resume", run_dir, "--no-progress")
        assert code == 2 and err.count("\n") == 1 and "metrics.jsonl:1: not a metrics record" in err, err
        assert snapshot(run_dir) == before


def test_hostile_vocab_size_in_a_checkpoint_is_refused_before_allocating(tmp_path, capsys, config_file):
    from titans.checkpoint import _meta_digest

    run_dir = tmp_path / "run"
    assert run(capsys, "train", config_file, "--run-dir", run_dir, "--stop-at", "2", "--no-progress")[0] == 0
    meta_path = run_dir / "checkpoints" / "ckpt-000002" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["extra"]["config"]["model"]["vocab_size"] = 10**13  # 640 TB of embeddings
    meta["meta_sha256"] = _meta_digest(meta)  # a forger who knows the format
    meta_path.write_text(json.dumps(meta))
    for args in (["eval", run_dir], ["generate", run_dir, "--prompt", "1 2"]):
        code, _, err = run(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and "weights do not fit the saved model config" in err, err


def test_legacy_checkpoint_loads_with_a_one_line_warning(tmp_path, capsys, config_file):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", config_file, "--run-dir", run_dir, "--stop-at", "2", "--no-progress")[0] == 0
    meta_path = run_dir / "checkpoints" / "ckpt-000002" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1  # as saved before checkpoint.json carried its own sha256
    del meta["meta_sha256"]
    meta_path.write_text(json.dumps(meta))
    code, out, err = run(capsys, "generate", run_dir, "--prompt", "1 2", "--max-new-tokens", "2")
    assert code == 0 and out
    assert err.count("\n") == 1 and err.startswith("titans: warning: ") and "unprotected" in err, err


def test_text_benchmarks_report_the_generation_score(tmp_path, capsys, trained_run, monkeypatch):
    """The RULER grid and BABILong print their generation scores beside the teacher-forced accuracy; --generate-tokens
    sets the budget (0: no generation)."""
    import titans.evaluate

    calls = []

    def needle(run, out, lengths, depths, samples, task=None, new_tokens=None):
        calls.append(new_tokens)
        result = {"task": "niah_single_1", "lengths": lengths, "depths": depths, "accuracy": [[0.5, 1.0]],
                  "mean_accuracy": 0.75, "token_accuracy": [[0.75, 1.0]], "mean_token_accuracy": 0.875}
        return result if new_tokens == 0 else {**result, "generation": [[0.25, 0.0]], "mean_generation": 0.125}

    def babilong(run, out, lengths, samples, task, split, new_tokens=None):
        calls.append(new_tokens)
        result = {"task": task, "split": split, "by_length": {64: 0.5}}
        return result if new_tokens == 0 else {**result, "generation_by_length": {64: 0.25}}

    monkeypatch.setattr(titans.evaluate, "eval_needle", needle)
    monkeypatch.setattr(titans.evaluate, "eval_babilong", babilong)
    code, out, _ = run(capsys, "niah", trained_run, "--lengths", "64", "--depths", "0", "1", "--out", tmp_path)
    assert code == 0 and "mean accuracy 0.750, mean answer token accuracy 0.875, mean generation score 0.125" in out
    lines = out.splitlines()
    at = lines.index("  answer tokens right (teacher-forced):")
    assert lines[at - 1].split() == ["64", "0.50", "1.00"] and lines[at + 2].split() == ["64", "0.75", "1.00"]
    at = lines.index("  generation score (RULER string match of greedy output):")
    assert lines[at + 2].split() == ["64", "0.25", "0.00"]
    code, out, _ = run(capsys, "eval", trained_run, "--task", "babilong", "--lengths", "64", "--out", tmp_path)
    assert code == 0 and "length      64: accuracy 0.500  generation 0.250" in out
    code, out, _ = run(capsys, "eval", trained_run, "--task", "needle", "--lengths", "64", "--depths", "0", "1",
                       "--generate-tokens", "0", "--out", tmp_path)
    assert code == 0 and "mean answer token accuracy 0.875\n" in out and "generation" not in out
    code, out, _ = run(capsys, "eval", trained_run, "--task", "babilong", "--lengths", "64", "--generate-tokens", "7",
                       "--out", tmp_path)
    assert code == 0 and "length      64: accuracy 0.500  generation 0.250" in out
    assert calls == [None, None, 0, 7]
    code, _, err = run(capsys, "niah", trained_run, "--generate-tokens", "-1")
    assert code == 2 and err == "titans: error: --generate-tokens must be >= 0, got -1\n"
