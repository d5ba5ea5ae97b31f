"""titans reproduce (issue 14): the plan's budget, resuming from stored results, the --out rules and the report
built from a fake stored result set (no training: a fake runner stands in for the jobs)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from titans import reproduce
from titans.cli import main


def fake_runner(calls: list, fail: set | None = None):
    def run(kind, spec, out, run_dir, threads):
        calls.append((kind, spec.get("variant") or spec.get("run"), run_dir))
        if fail and (spec.get("variant") in fail):
            raise RuntimeError("interrupted")
        if kind == "train_lm":
            depth = spec["set"].get("model.memory_depth", 2)
            off = sum(bool(v is False) for v in spec["set"].values()) + (depth == 1)
            loss = (1.0 + 0.1 * off + 0.01 * len(spec["variant"]) + 0.02 * depth
                    + 0.001 * (ord(spec["variant"][-1]) - ord("a")) + 0.01 * spec["set"]["train.seed"])
            losses = [loss + 0.2 * math.exp(-i / 50) for i in range(4 * spec["eval"]["seq_len"])]
            return {"variant": spec["variant"], "run_dir": run_dir, "params": 1_500_000 + depth, "tokens": 512,
                    "steps": 4, "tokens_per_s": 1000.0 / depth, "train_s": 2.0,
                    "eval": {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2),
                             "bits_per_token": loss / math.log(2), "tokens": 512},
                    "long": {"seq_len": 4 * spec["eval"]["seq_len"], "loss": loss, "perplexity": math.exp(loss),
                             "bits_per_byte": 1.0, "tokens": 512},
                    "long_loss_by_position": losses,
                    "curve": [{"step": s, "train/loss": 3 - s / 4, "eval/loss": 3.1 - s / 4} for s in (2, 4)],
                    "config": {k: {"x": 1} for k in ("model", "data", "optim", "train", "eval")} | {"name": "n"},
                    "wall_s": 1.0, "cpu_s": 1.0}
        if kind == "niah":
            grid = [[0.5] * len(spec["depths"]) for _ in spec["lengths"]]
            return {"variant": spec["run"], "lengths": spec["lengths"], "depths": spec["depths"], "train_seq_len": 64,
                    "grids": {t: {"accuracy": grid, "mean_accuracy": 0.5, "token_accuracy": grid} for t in spec["tasks"]},
                    "wall_s": 1.0, "cpu_s": 1.0}
        return {"variant": spec["run"], "train_seq_len": 64, "wall_s": 1.0, "cpu_s": 1.0,
                "by_task": {t: {str(n): 0.25 for n in spec["lengths"]} for t in spec["tasks"]}}
    return run


def test_full_plan_is_budgeted_for_about_three_hours_on_two_cores():
    plan = reproduce.build_plan()
    assert {j.stage for j in plan} == set(reproduce.STAGES)
    assert 2.5 * 3600 <= sum(j.cpu_s for j in plan) / 2 <= 3.5 * 3600
    lm = [j for j in plan if j.stage == "lm"]
    assert sorted(j.name for j in lm) == sorted(reproduce.LM_VARIANTS)
    assert len({j.tokens for j in lm}) == 1  # an equal token budget
    assert len({j.key for j in plan}) == len({json.dumps(j.spec, sort_keys=True) for j in plan}) == len(plan)
    assert [j.name for j in plan if j.stage == "mqar"] == ["seed0", "seed1", "seed2"]
    seeds = [j for j in plan if j.stage == "seeds"]
    assert [j.name for j in seeds] == ["lmm-seed1", "mac-seed1", "mag-seed1", "mal-seed1"]
    assert all(j.spec["set"]["train.seed"] == 1 and j.tokens == lm[0].tokens for j in seeds)
    table = reproduce.budget_table(plan)
    assert "| all | %d |" % len(plan) in table and "| lm | mac | mac | 1,024,000 |" in table
    quick = reproduce.build_plan(quick=True)
    assert {j.stage for j in quick} == set(reproduce.STAGES) and sum(j.cpu_s for j in quick) < 120


def test_every_spec_names_the_defaults_it_runs_on(tmp_path, monkeypatch):
    """A changed library default or LM config changes every job's spec: no stored result outlives the defaults its
    numbers came from."""
    import shutil

    import titans.model

    digest = reproduce.defaults_digest()
    assert all(j.spec["defaults"] == digest for j in reproduce.build_plan() + reproduce.build_plan(quick=True))
    shutil.copytree(reproduce.REPO_ROOT / "configs" / "lm" / "small", tmp_path / "configs" / "lm" / "small")
    monkeypatch.setattr(reproduce, "REPO_ROOT", tmp_path)
    assert reproduce.defaults_digest() == digest
    mac = tmp_path / "configs" / "lm" / "small" / "mac.yaml"
    mac.write_text(mac.read_text().replace("max_lr: ", "max_lr: 0.1 #"))
    edited = reproduce.defaults_digest()
    assert edited != digest and {j.spec["defaults"] for j in reproduce.build_plan()} == {edited}

    @dataclasses.dataclass
    class OtherDefaults(titans.model.TitansConfig):
        init_decay: float = 0.5

    monkeypatch.setattr(titans.model, "TitansConfig", OtherDefaults)
    assert reproduce.defaults_digest() not in (digest, edited)


def test_resume_reuses_stored_jobs_and_report_marks_pending(tmp_path, monkeypatch):
    out, report, calls = tmp_path / "out", tmp_path / "report.md", []
    write_report = reproduce.write_report
    monkeypatch.setattr(reproduce, "_figures", lambda *a, **k: None)  # the first reports without their plots
    stages = ["lm", "ablations", "depth", "seeds", "tune", "niah", "babilong"]
    reproduce.run_reproduce(out, quick=True, stages=stages, report=report, say=lambda s: None,
                            runner=fake_runner(calls, fail={"mag"}))
    first = len(calls)
    failed = json.loads((out / "results/lm/mag.json").read_text())
    assert failed["status"] == "error" and "interrupted" in failed["error"]
    text = report.read_text()
    assert "| mqar |" in text and "**pending**" in text and "**partial**" in text  # mag failed: lm partial
    # hybrid ablations wait for every hybrid of the lm stage
    assert not (out / "results/ablations/hybrid-no_conv.json").exists()
    calls.clear()
    reproduce.run_reproduce(out, quick=True, stages=stages, report=report, say=lambda s: None,
                            runner=fake_runner(calls))
    ran = {(kind, name) for kind, name, _ in calls}
    assert ("train_lm", "mag") in ran and ("train_lm", "transformer") not in ran  # finished jobs are reused
    assert ("train_lm", "mac") in ran  # the hybrid ablations, with the best hybrid (lowest loss: mac)
    assert len(calls) < first + 6
    calls.clear()
    monkeypatch.undo()
    reproduce.run_reproduce(out, quick=True, stages=stages, report=report, say=lambda s: None,
                            runner=fake_runner(calls))
    assert calls == [] and reproduce.write_report is write_report
    # the tune stage fine-tunes the lm stage's own runs: init_from is the lm job's stored run directory
    tuned = json.loads((out / "results/tune/lmm.json").read_text())
    lm_run = json.loads((out / "results/lm/lmm.json").read_text())["result"]["run_dir"]
    assert tuned["resolved_spec"]["set"]["train.init_from"] == lm_run
    assert tuned["spec"]["set"]["train.init_from"] is None  # the plan's spec (its digest) names no directory
    assert tuned["resolved_spec"]["set"]["data.mix_tasks"] == [*reproduce.NIAH_TASKS, *reproduce.BABILONG_TASKS]
    niah = json.loads((out / "results/niah/lmm.json").read_text())
    assert niah["resolved_spec"]["run_dir"] == tuned["result"]["run_dir"]
    # a tune run trained again (another run directory): its S-NIAH and BABILong jobs run again, nothing else does
    tuned["result"]["run_dir"] += "-again"
    (out / "results/tune/lmm.json").write_text(json.dumps(tuned))
    reproduce.run_reproduce(out, quick=True, stages=stages, report=report, say=lambda s: None,
                            runner=fake_runner(calls))
    assert sorted((kind, name) for kind, name, _ in calls) == [("babilong", "tune/lmm"), ("niah", "tune/lmm")]
    assert json.loads((out / "results/niah/lmm.json").read_text())["resolved_spec"]["run_dir"].endswith("-again")
    text = report.read_text()
    assert "## Fine-tuning for S-NIAH and BABILong" in text and "| lmm | " in text.split("## Fine-tuning")[1]
    for heading in ("## Language modelling", "## Ablations", "## Memory depth", "S-NIAH-1/2/3", "## BABILong",
                    "## The plan and its budget", "## Exact configs"):
        assert any(line.startswith(heading) or heading in line for line in text.splitlines()), heading
    assert "| mac (full) |" in text and "| lmm w/o conv |" in text and "Ordering by the perplexity" in text
    assert text.count("| lmm | 50 | 50 | 50 |") == 2  # S-NIAH: exact match, then answer token accuracy
    assert "S-NIAH: the best exact match of any model, task and length (mean over depths) is 50%" in text
    assert "BABILong, mean over tasks and lengths: transformer 25%, lmm 25%; a uniform guess among the labels " \
           "scores qa1 17%, qa2 17%, qa3 17%, qa4 17%, qa5 14%." in text
    assert "## Seed spread" in text and "| mac | 2.92 | 2.95 | 2.94 | 1.01x |" in text
    for png in ("lm_loss_curves", "lm_ppl_by_position", "depth", "niah", "babilong"):
        assert (tmp_path / "report" / f"{png}.png").stat().st_size > 1000
    assert "results.md" not in [p.name for p in tmp_path.glob("docs/*")]


def test_out_with_another_plan_is_refused_unless_force(tmp_path):
    out = tmp_path / "out"
    quick, full = reproduce.build_plan(quick=True), reproduce.build_plan()
    reproduce.check_out(out, quick, quick=True, force=False)
    reproduce.check_out(out, quick, quick=True, force=False)  # the same plan: resume
    with pytest.raises(ValueError, match="another plan"):
        reproduce.check_out(out, full, quick=False, force=False)
    fewer = [j for j in quick if j.stage != "seeds"]
    extended = tmp_path / "extended"
    reproduce.check_out(extended, fewer, quick=True, force=False)
    reproduce.check_out(extended, quick, quick=True, force=False)  # a new stage's jobs extend the stored plan
    changed = [reproduce.dataclasses.replace(j, spec={**j.spec, "x": 1}) if j.key == "lm/mac" else j for j in quick]
    with pytest.raises(ValueError, match="jobs differ: lm/mac"):
        reproduce.check_out(extended, changed, quick=True, force=False)
    reproduce.check_out(out, full, quick=False, force=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        reproduce.check_out(mine, quick, quick=True, force=False)
    assert (mine / "notes.txt").read_text() == "keep"


def test_cli_report_only_needs_stored_results(tmp_path, capsys):
    assert main(["reproduce", "--quick", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert "nothing stored" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--stages", "lmx", "--out", str(tmp_path / "x")]) == 2
