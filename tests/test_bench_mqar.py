"""benchmarks/bench_mqar.py: the --quick smoke run, its outputs, the --out safety rules and the window bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mqar.py"


def load_bench():
    sys.path.insert(0, str(BENCH.parent))  # spawned workers find the module by name
    spec = importlib.util.spec_from_file_location("bench_mqar", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_mqar"] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_quick_run_writes_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "mqar"
    assert bench.main(["--quick", "--jobs", "1", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == "mqar" and data["complete"] is True
    cfg = data["config"]
    assert cfg["variants"] == ["transformer", "lmm"] and cfg["test"] == [[32, 4], [64, 8]]
    assert {"platform", "torch", "cpu_count"} <= set(data["machine"])
    assert len(data["runs"]) == len(cfg["variants"]) * len(cfg["lrs"]) * len(cfg["seeds"])
    for run in data["runs"]:
        assert {"variant", "params", "lr", "seed", "train_seconds", "status", "test"} <= set(run)
        assert run["status"] == "ok" and set(run["test"]) == {"32:4", "64:8"}
        for result in run["test"].values():
            assert 0 <= result["accuracy"] <= 1
            assert result["answers_within"] + result["answers_beyond"] == result["answers"]
            assert {"within", "beyond", "by_distance", "loss"} <= set(result)
    params = {run["params"] for run in data["runs"]}
    assert max(params) <= 1.05 * cfg["params"] and min(params) >= 0.95 * cfg["params"]  # matched sizes
    assert [row["variant"] for row in data["summary"]] == ["transformer", "lmm"]
    table = (out / "results.md").read_text()
    assert "| transformer |" in table and "| lmm |" in table and "beyond" in table
    assert (out / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| transformer |" in capsys.readouterr().out  # the table is printed
    assert sorted(p.name for p in out.iterdir()) == ["mqar.png", "results.json", "results.md"]


def test_out_of_another_configuration_is_refused_and_resume_reuses_runs(tmp_path, capsys):
    out = tmp_path / "mqar"
    args = ["--quick", "--jobs", "1", "--variants", "transformer", "--lrs", "1e-3", "--out", str(out)]
    assert bench.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert bench.main([*args, "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "steps" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "results.json").read_text()) == first  # untouched
    assert bench.main(args) == 2  # the same configuration again: --resume or --force, never a silent overwrite
    assert "--resume" in capsys.readouterr().err
    assert bench.main([*args, "--resume"]) == 0
    assert "0 runs to train (1 reused)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == first["runs"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"something": "else"}')
    assert bench.main(["--quick", "--jobs", "1", "--out", str(foreign)]) == 2
    assert "not written by this benchmark" in capsys.readouterr().err
    assert (foreign / "results.json").read_text() == '{"something": "else"}'


def test_parallel_jobs_run_in_spawned_workers(tmp_path):
    out = tmp_path / "mqar"
    assert bench.main(["--quick", "--variants", "transformer", "--lrs", "1e-3", "3e-3", "--steps", "2", "--jobs", "2",
                       "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(run["lr"] for run in runs) == [1e-3, 3e-3]
    assert all(run["status"] == "ok" for run in runs)


class WindowOracle(nn.Module):
    """Answers a query right exactly when its key (the token's first occurrence: the pairs open the sequence) lies
    at distance <= window, i.e. when the value would be inside a sliding window of that size; otherwise predicts 0."""

    def __init__(self, vocab: int, window: int):
        super().__init__()
        self.vocab, self.window = vocab, window

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            first = {}
            for t, token in enumerate(row):
                j = first.setdefault(token, t)
                answer = row[j + 1] if j < t and t - j <= self.window else 0
                logits[b, t, answer] = 1.0
        return logits, None


def test_within_and_beyond_follow_the_window():
    cfg = {"vocab": 64, "window": 16, "test": [[64, 8], [128, 16]], "test_samples": 8}
    results = bench.evaluate(WindowOracle(64, 16), cfg, torch.device("cpu"))
    for result in results.values():
        assert result["within"] == 1.0 and result["beyond"] == 0.0
        assert result["answers_beyond"] > 0
        assert result["accuracy"] == result["answers_within"] / result["answers"]
    assert bench.distance_bins(100, 16) == [(1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128)]
