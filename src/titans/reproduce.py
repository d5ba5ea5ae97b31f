"""`titans reproduce`: the paper's comparisons at small scale, one command, resumable (issue 14).

The plan is a list of stages, each a list of jobs (a training run, an evaluation of trained runs, or one seed of the
MQAR grid of ``benchmarks/bench_mqar.py``). Every job has a *spec*: a JSON-able dict of everything that defines its
result (config overrides, lengths, seeds...). Layout of ``--out`` (default ``runs/reproduce``)::

    plan.json                       the plan's specs (an --out with another plan is refused unless --force)
    results/<stage>/<job>.json      one per finished job, written atomically: its spec, result, wall and CPU time
    <stage>/<job>-<digest>/         a training run directory (``titans train``'s layout; interrupted runs resume)
    mqar/seed<N>-<digest>/          bench_mqar's results.json / .md / .png for one seed (resumes inside the seed)
    eval/<stage>/<job>/             JSON and PNG written by titans.evaluate
    results.md, results/*.png       the report (``--quick``); the full plan writes docs/results.md and docs/results/

A job whose stored result has the job's spec is reused; nothing in --out is deleted. Run directories are named by
the digest of their spec, so a changed plan (with --force) trains new runs beside the old ones. The report is built
from the stored results only (``--report-only`` rebuilds it without running anything) and marks every stage done,
partial or pending.

Every model comes from the library's defaults: ``configs/lm/small/<variant>.yaml`` (``titans.model.preset('small',
variant)``, variants matched in parameter count) with only the budget (steps, batch, length, warmup, evaluation
cadence) and, for ablations and depth, the one switch under study overridden.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from titans.fileio import atomic_write

__all__ = ["STAGES", "Job", "build_plan", "budget_table", "run_reproduce", "write_report", "load_results"]

REPO_ROOT = Path(__file__).resolve().parents[2]
FORMAT_VERSION = 1
STAGES = ("lm", "mqar", "ablations", "depth", "seeds", "tune", "niah", "babilong")
LM_VARIANTS = ("transformer", "swa", "deltanet", "gated_deltanet", "ttt", "lmm", "mac", "mag", "mal")
HYBRIDS = ("mac", "mag", "mal")
TITANS_LM = ("lmm", *HYBRIDS)  # the seeds stage's variants
# fine-tuned and tested on S-NIAH and BABILong: the memory variants against the attention baselines (the plan's
# budget of about 3 hours on 2 cores leaves no room for the recurrent baselines there)
LONG_CONTEXT_VARIANTS = ("transformer", "swa", "lmm", "mac", "mag", "mal")
# the order jobs start in: the attention baselines, the memory alone and a hybrid first, then the cheap recurrent
# baselines, then the slowest models, so that an interrupted plan has as many comparisons as its time allowed
RUN_ORDER = ("transformer", "swa", "lmm", "mag", "deltanet", "gated_deltanet", "mac", "mal", "ttt")
# Table 5's switches: name -> (config overrides, label)
ABLATIONS = {
    "linear_memory": ({"model.memory_depth": 1}, "linear memory"),
    "no_conv": ({"model.memory_conv": False}, "w/o conv"),
    "no_momentum": ({"model.momentum": False}, "w/o momentum"),
    "no_forgetting": ({"model.forgetting": False}, "w/o weight decay (forgetting)"),
    "no_persistent": ({"model.num_persistent": 0}, "w/o persistent memory"),
}
NIAH_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3")
BABILONG_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
# CPU seconds per training step of batch 8 x 256 tokens, one thread, configs/lm/small (measured with all nine
# variants on this project's 2-core machine while other jobs shared it; used only for the budget table).
LM_STEP_CPU_S = {"transformer": 0.30, "swa": 0.30, "deltanet": 0.54, "gated_deltanet": 0.51, "ttt": 1.0,
                 "lmm": 1.05, "mac": 1.40, "mag": 1.24, "mal": 1.13}
# bench_mqar's documented cost of a default-grid step (CPU s, one thread), and its test time per run
MQAR_STEP_CPU_S = {"mac": 0.84, "mag": 0.68, "mal": 0.66, "lmm": 0.57, "ttt": 0.55, "gated_deltanet": 0.24,
                   "deltanet": 0.23, "swa": 0.13, "transformer": 0.11}
MQAR_TEST_CPU_S = 8.0


# ---------------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work. ``spec`` defines its result; ``cpu_s`` is its budget (one core); ``needs`` names the jobs
    whose results it reads."""

    stage: str
    name: str
    kind: str  # train_lm | mqar | niah | babilong
    spec: dict
    cpu_s: float
    tokens: int = 0
    needs: tuple[str, ...] = ()
    label: str = ""

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def digest(self) -> str:
        return spec_digest(self.spec)


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class Budget:
    """The knobs that differ between the full plan and --quick."""

    lm_steps: int
    lm_batch: int
    lm_seq_len: int
    lm_warmup: int
    lm_eval_every: int
    eval_tokens: int  # validation tokens scored at the training length, and at 4x the length
    lm_variants: tuple[str, ...]
    lm_seeds: tuple[int, ...]  # further seeds of the Titans variants' language models (the seeds stage)
    mqar_seeds: tuple[int, ...]
    mqar_args: tuple[str, ...]
    depths: tuple[int, ...]
    niah_variants: tuple[str, ...]
    niah_lengths: tuple[int, ...]
    niah_depths: tuple[float, ...]
    niah_samples: int
    babilong_variants: tuple[str, ...]
    babilong_lengths: tuple[int, ...]
    babilong_samples: int
    tune_steps: int  # fine-tuning of the lm stage's models with S-NIAH and BABILong examples mixed in (tune stage)
    tune_seq_len: int
    tune_fraction: float
    eval_cpu_s: float  # budget of one model's perplexity evaluation


FULL = Budget(lm_steps=500, lm_batch=8, lm_seq_len=256, lm_warmup=50, lm_eval_every=50, eval_tokens=131_072,
              lm_variants=LM_VARIANTS, lm_seeds=(1,), mqar_seeds=(0, 1, 2), mqar_args=(), depths=(1, 2, 3, 4),
              niah_variants=LONG_CONTEXT_VARIANTS, niah_lengths=(1024, 2048, 4096, 8192, 16384),
              niah_depths=(0.0, 0.5, 1.0), niah_samples=2, babilong_variants=LONG_CONTEXT_VARIANTS,
              babilong_lengths=(256, 512, 1024, 2048), babilong_samples=8, tune_steps=120, tune_seq_len=512,
              tune_fraction=0.5, eval_cpu_s=60.0)
QUICK = Budget(lm_steps=4, lm_batch=2, lm_seq_len=64, lm_warmup=1, lm_eval_every=2, eval_tokens=512,
               lm_variants=("transformer", "lmm", "mac", "mag"), lm_seeds=(1,), mqar_seeds=(0, 1),
               mqar_args=("--quick",), depths=(1, 2, 3), niah_variants=("transformer", "lmm"),
               niah_lengths=(640,), niah_depths=(0.0, 1.0), niah_samples=1,
               babilong_variants=("transformer", "lmm"), babilong_lengths=(128,), babilong_samples=2,
               tune_steps=2, tune_seq_len=512, tune_fraction=0.5, eval_cpu_s=2.0)


def lm_overrides(b: Budget, variant: str, seed: int = 0) -> dict:
    """The budget's overrides of configs/lm/small/<variant>.yaml (everything else: the library's defaults)."""
    return {"train.steps": b.lm_steps, "train.batch_size": b.lm_batch, "train.seq_len": b.lm_seq_len,
            "train.seed": seed, "optim.warmup_steps": b.lm_warmup, "train.eval_every": b.lm_eval_every,
            "train.eval_batches": 4, "train.checkpoint_every": b.lm_eval_every, "train.keep_last": 1,
            "train.log_every": max(1, min(10, b.lm_steps // 2)), "eval.batch_size": 8, "eval.chunk_len": b.lm_seq_len}


def _train_job(stage: str, name: str, b: Budget, variant: str, extra: dict | None = None, label: str = "",
               seed: int = 0) -> Job:
    overrides = {**lm_overrides(b, variant, seed), **(extra or {})}
    spec = {"config": f"configs/lm/small/{variant}.yaml", "variant": variant, "set": overrides,
            "eval": {"seq_len": b.lm_seq_len, "long_seq_len": 4 * b.lm_seq_len, "max_tokens": b.eval_tokens,
                     "split": "validation"}}
    step = LM_STEP_CPU_S.get(variant, 1.0) * b.lm_batch * b.lm_seq_len / 2048
    if (extra or {}).get("model.memory_depth"):
        step *= 0.6 + 0.2 * extra["model.memory_depth"]  # the memory's share grows with its depth
    return Job(stage, name, "train_lm", spec, round(b.lm_steps * step + b.eval_cpu_s), b.lm_steps * b.lm_batch
               * b.lm_seq_len, label=label or variant)


def defaults_digest() -> str:
    """What every job's numbers come from besides its spec: the library's config defaults and the LM configs
    (configs/lm/small). It is part of every job's spec, so that a changed default makes every stored result stale:
    every number of the report comes from the defaults of the code that writes it."""
    from titans.config import RunConfig
    from titans.model import TitansConfig

    texts = [json.dumps(dataclasses.asdict(RunConfig(model=TitansConfig())), sort_keys=True, default=str)]
    texts += [p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "configs" / "lm" / "small").glob("*.yaml"))]
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]


def build_plan(quick: bool = False) -> list[Job]:
    """Every job of the plan, stage by stage (in STAGES order), each spec naming the defaults it runs on."""
    defaults = defaults_digest()
    return [dataclasses.replace(job, spec={**job.spec, "defaults": defaults}) for job in _jobs(quick)]


def _jobs(quick: bool) -> list[Job]:
    b = QUICK if quick else FULL
    jobs = [_train_job("lm", v, b, v) for v in b.lm_variants]
    for seed in b.mqar_seeds:
        variants = ("transformer", "lmm") if quick else LM_VARIANTS
        steps = 4 if quick else 700
        cpu = sum(steps * MQAR_STEP_CPU_S[v] * (0.05 if quick else 1) + MQAR_TEST_CPU_S * (0.1 if quick else 1)
                  for v in variants)
        tokens = steps * (8 * 32 + 4 * 64 if quick else 48 * 64 + 4 * 256) * len(variants)
        jobs.append(Job("mqar", f"seed{seed}", "mqar", {"args": [*b.mqar_args, "--seeds", str(seed)],
                                                          "variants": list(variants)}, round(cpu), tokens,
                        label=f"{len(variants)} variants, seed {seed}"))
    hybrids = [v for v in HYBRIDS if v in b.lm_variants]
    for base in ("lmm", "hybrid"):
        for name, (extra, label) in ABLATIONS.items():
            needs = tuple(f"lm/{v}" for v in hybrids) if base == "hybrid" else ()
            job = _train_job("ablations", f"{base}-{name}", b, "mag" if base == "hybrid" else "lmm", extra,
                             f"{base} {label}")
            spec = {**job.spec, "variant": "best_hybrid"} if base == "hybrid" else job.spec
            jobs.append(dataclasses.replace(job, spec=spec, needs=needs))
    for depth in b.depths:
        if depth not in (1, 2):  # 2 is the default (the lm stage's lmm), 1 the linear-memory ablation
            jobs.append(_train_job("depth", f"lmm-depth{depth}", b, "lmm", {"model.memory_depth": depth},
                                   f"lmm, memory depth {depth}"))
    for seed in b.lm_seeds:  # MAC's plateau escape hangs on the seed (docs/memory.md): one seed decides nothing
        jobs += [_train_job("seeds", f"{v}-seed{seed}", b, v, label=f"{v}, seed {seed}", seed=seed)
                 for v in TITANS_LM if v in b.lm_variants]
    for v in [v for v in LM_VARIANTS if v in b.niah_variants or v in b.babilong_variants]:
        jobs.append(_tune_job(b, v))
    for v in b.niah_variants:
        spec = {"run": f"tune/{v}", "tasks": list(NIAH_TASKS), "lengths": list(b.niah_lengths),
                "depths": list(b.niah_depths), "samples": b.niah_samples, "generate_tokens": 0}
        cells = len(NIAH_TASKS) * len(b.niah_depths) * b.niah_samples * sum(b.niah_lengths)
        jobs.append(Job("niah", v, "niah", spec, round(cells * LM_STEP_CPU_S[v] / 2048 / 3), needs=(f"tune/{v}",),
                        label=v))
    for v in b.babilong_variants:
        spec = {"run": f"tune/{v}", "tasks": list(BABILONG_TASKS), "lengths": list(b.babilong_lengths),
                "samples": b.babilong_samples, "split": "validation", "generate_tokens": 0}
        cells = len(BABILONG_TASKS) * b.babilong_samples * sum(b.babilong_lengths)
        jobs.append(Job("babilong", v, "babilong", spec, round(cells * LM_STEP_CPU_S[v] / 2048 / 3 + 5),
                        needs=(f"tune/{v}",), label=v))
    return jobs


def _tune_job(b: Budget, variant: str) -> Job:
    """The lm stage's model of ``variant`` fine-tuned on text with S-NIAH and BABILong examples mixed in
    (``data.mix_tasks``), at a training length the prompts fit and shorter than every S-NIAH test length;
    `train.init_from` is the lm job's run directory, filled in when it has run."""
    tune = {"train.init_from": None, "train.steps": b.tune_steps, "train.seq_len": b.tune_seq_len,
            "optim.warmup_steps": max(1, b.tune_steps // 10), "train.eval_every": b.tune_steps,
            "train.checkpoint_every": b.tune_steps, "eval.chunk_len": b.tune_seq_len,
            "data.mix_tasks": [*NIAH_TASKS, *BABILONG_TASKS], "data.mix_fraction": b.tune_fraction,
            "data.mix_weighting": "row"}
    tuning = dataclasses.replace(b, lm_steps=b.tune_steps, lm_seq_len=b.tune_seq_len, eval_tokens=b.eval_tokens // 8,
                                 eval_cpu_s=b.eval_cpu_s / 8)  # perplexity after tuning: a check, on fewer tokens
    job = _train_job("tune", variant, tuning, variant, tune, f"{variant}, fine-tuned with S-NIAH and BABILong")
    return dataclasses.replace(job, spec={**job.spec, "init_from": f"lm/{variant}"}, needs=(f"lm/{variant}",))


def budget_table(jobs: Sequence[Job], cores: int = 2) -> str:
    """Markdown: every job's budget (CPU seconds on one core, tokens), per stage and in all (wall at ``cores``)."""
    lines = ["| stage | job | model | tokens | budget (CPU s) |", "| --- | --- | --- | ---: | ---: |"]
    totals: dict[str, float] = {}
    for job in jobs:
        totals[job.stage] = totals.get(job.stage, 0) + job.cpu_s
        lines.append(f"| {job.stage} | {job.name} | {job.label} | {job.tokens:,} | {job.cpu_s:,.0f} |")
    lines += ["", "| stage | jobs | CPU s | wall on %d cores |" % cores, "| --- | ---: | ---: | ---: |"]
    for stage in STAGES:
        if stage in totals:
            n = sum(j.stage == stage for j in jobs)
            lines.append(f"| {stage} | {n} | {totals[stage]:,.0f} | {_duration(totals[stage] / cores)} |")
    total = sum(totals.values())
    lines.append(f"| all | {len(jobs)} | {total:,.0f} | {_duration(total / cores)} |")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------------- storage
def result_path(out: Path, job: Job) -> Path:
    return out / "results" / job.stage / f"{job.name}.json"


def run_dir_of(out: Path, job: Job, spec: dict | None = None) -> Path:
    return out / job.stage / f"{job.name}-{spec_digest(spec or job.spec)}"


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=1, default=str) + "\n").encode())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_results(out: Path, jobs: Sequence[Job]) -> dict[str, dict]:
    """The stored results of the plan's jobs whose spec is the job's (job key -> stored record)."""
    stored = {}
    for job in jobs:
        record = read_json(result_path(out, job))
        if record and record.get("spec") == job.spec and record.get("status") == "ok":
            stored[job.key] = record
    return stored


def check_out(out: Path, jobs: Sequence[Job], quick: bool, force: bool) -> None:
    """Refuse an --out that holds another plan (or files not ours) unless ``force``; then record this plan. A plan
    that only adds jobs to the stored one (a new stage) extends it."""
    plan = {"format_version": FORMAT_VERSION, "quick": quick, "jobs": {j.key: j.spec for j in jobs}}
    path = out / "plan.json"
    old = read_json(path) if path.exists() else None
    if old is None and out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} is not empty and holds no plan.json of titans reproduce; choose another --out or "
                         f"pass --force (nothing is deleted)")
    extends = old is not None and old.get("quick") == quick and old.get("format_version") == FORMAT_VERSION and all(
        plan["jobs"].get(k) == spec for k, spec in old.get("jobs", {}).items())  # jobs added, none changed
    if old is not None and old != plan and not extends and not force:
        changed = sorted(k for k in set(plan["jobs"]) | set(old.get("jobs", {}))
                         if plan["jobs"].get(k) != old.get("jobs", {}).get(k))
        what = "--quick differs" if old.get("quick") != quick else f"jobs differ: {', '.join(changed[:6])}"
        raise ValueError(f"{out} holds results of another plan ({what}); pass --force to run this plan there "
                         f"(its runs go to new directories, nothing is deleted) or choose another --out")
    write_json(path, plan)


# ---------------------------------------------------------------------------------------------------- jobs
def _bench_mqar():
    import importlib.util

    path = REPO_ROOT / "benchmarks" / "bench_mqar.py"
    if "bench_mqar" in sys.modules:
        return sys.modules["bench_mqar"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the MQAR stage runs from a source checkout")
    sys.path.insert(0, str(path.parent))  # its spawned workers find the module by name
    spec = importlib.util.spec_from_file_location("bench_mqar", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_mqar"] = module
    spec.loader.exec_module(module)
    return module


def resolve_spec(job: Job, out: Path, stored: dict[str, dict]) -> dict | None:
    """The spec a job runs with, filled in from the results of the jobs it needs (None while one has none): the hybrid
    ablations take the best hybrid of the lm stage (lowest validation loss), the S-NIAH and BABILong jobs the tune
    run's directory (``run_dir``), a tune job the lm run's directory (``train.init_from``)."""
    if any(n not in stored for n in job.needs):
        return None
    spec = json.loads(json.dumps(job.spec))
    if spec.get("variant") == "best_hybrid":
        losses = {stored[n]["result"]["variant"]: stored[n]["result"]["eval"]["loss"] for n in job.needs}
        best = min(losses, key=losses.get)
        spec["variant"], spec["config"] = best, f"configs/lm/small/{best}.yaml"
    if job.kind in ("niah", "babilong"):
        spec["run_dir"] = stored[spec["run"]]["result"]["run_dir"]
    if "init_from" in spec:  # a tune job starts from the lm job's weights
        spec["set"]["train.init_from"] = stored[spec["init_from"]]["result"]["run_dir"]
    return spec


def run_job(kind: str, spec: dict, out: str, run_dir: str, threads: int) -> dict:
    """One job in a worker process: its result (JSON-able), with wall and CPU seconds."""
    import torch

    torch.set_num_threads(threads)
    started, cpu = time.perf_counter(), time.process_time()
    result = {"train_lm": _train_lm, "niah": _niah, "babilong": _babilong}[kind](spec, Path(out), Path(run_dir))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["cpu_s"] = round(time.process_time() - cpu, 1)
    return result


def _train_lm(spec: dict, out: Path, run_dir: Path) -> dict:
    from titans.cli import load_config
    from titans.evaluate import evaluate_text, load_run
    from titans.metrics import read_metrics
    from titans.model import count_parameters
    from titans.train import train

    config = load_config(REPO_ROOT / spec["config"], [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                                      for k, v in spec["set"].items()]
                         + [f"name=reproduce-{run_dir.name}"])
    resume = (run_dir / "config.yaml").is_file()
    train_start = time.process_time()
    summary = train(config, run_dir, resume=resume, progress=False)
    train_cpu = time.process_time() - train_start
    run = load_run(run_dir)
    e = spec["eval"]
    short = evaluate_text(run, split=e["split"], seq_len=e["seq_len"], max_tokens=e["max_tokens"])
    long = evaluate_text(run, split=e["split"], seq_len=e["long_seq_len"], max_tokens=e["max_tokens"])
    metrics = read_metrics(run_dir)
    speeds = [r["train/tokens_per_s"] for r in metrics if "train/tokens_per_s" in r]
    return {"variant": config.model.variant, "run_dir": str(run_dir), "params": count_parameters(config.model),
            "tokens": summary["tokens"], "steps": summary["step"], "resumed_from": summary["resumed_from"],
            "train_wall_s": round(summary["elapsed_s"], 1), "train_cpu_s_this_session": round(train_cpu, 1),
            "tokens_per_s": statistics.median(speeds) if speeds else None, "train_s": train_seconds(metrics),
            "eval": {k: short[k] for k in ("loss", "perplexity", "bits_per_byte", "bits_per_token", "tokens")},
            "long": {k: long[k] for k in ("seq_len", "loss", "perplexity", "bits_per_byte", "tokens")},
            "long_loss_by_position": long["loss_by_position"],
            "curve": [{k: r[k] for k in ("step", "train/loss", "eval/loss", "train/tokens") if k in r}
                      for r in metrics],
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=str))}


def _niah(spec: dict, out: Path, run_dir: Path) -> dict:
    from titans.evaluate import eval_needle, load_run

    run = load_run(Path(spec["run_dir"]))
    grids = {}
    for task in spec["tasks"]:
        r = eval_needle(run, run_dir, spec["lengths"], spec["depths"], spec["samples"], task=task,
                        new_tokens=spec["generate_tokens"])
        grids[task] = {"accuracy": r["accuracy"], "mean_accuracy": r["mean_accuracy"],
                       "token_accuracy": r["token_accuracy"], "png": str(run_dir / f"needle_{task}.png")}
    return {"variant": run.config.model.variant, "lengths": spec["lengths"], "depths": spec["depths"],
            "train_seq_len": run.config.train.seq_len, "grids": grids}


def _babilong(spec: dict, out: Path, run_dir: Path) -> dict:
    from titans.evaluate import eval_babilong, load_run

    run = load_run(Path(spec["run_dir"]))
    by_task = {}
    for task in spec["tasks"]:
        r = eval_babilong(run, run_dir, spec["lengths"], spec["samples"], task=task, split=spec["split"],
                          new_tokens=spec["generate_tokens"])
        by_task[task] = {str(k): v for k, v in r["by_length"].items()}
    return {"variant": run.config.model.variant, "train_seq_len": run.config.train.seq_len, "by_task": by_task}


# ---------------------------------------------------------------------------------------------------- driver
def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_reproduce(out: Path, *, quick: bool = False, stages: Sequence[str] | None = None, force: bool = False,
                  jobs_at_once: int = 2, threads: int = 1, report: Path | None = None,
                  report_only: bool = False, say: Callable[[str], None] = print,
                  runner: Callable[..., dict] | None = None) -> Path:
    """Run the plan's selected stages into ``out`` (resuming), then write the report; returns its path.
    ``runner`` replaces :func:`run_job` (tests)."""
    plan = build_plan(quick)
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    report = report or (out / "results.md" if quick else REPO_ROOT / "docs" / "results.md")
    if not report_only:
        check_out(out, plan, quick, force)
        started = time.perf_counter()
        log = read_json(out / "sessions.json") or {"sessions": []}
        session = {"stages": stages, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "finished": None, "wall_s": None, "machine": machine(), "jobs_at_once": jobs_at_once,
                   "threads": threads}
        log["sessions"].append(session)  # recorded now: an interrupted session stays listed, unfinished
        write_json(out / "sessions.json", log)
        for stage in STAGES:
            if stage in stages:
                _run_stage(out, plan, stage, jobs_at_once, threads, say, runner or run_job)
        session.update(wall_s=round(time.perf_counter() - started, 1),
                       finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        write_json(out / "sessions.json", log)
    elif not (out / "plan.json").is_file():
        raise FileNotFoundError(f"{out / 'plan.json'}: nothing stored in {out} to report on")
    write_report(out, plan, report, quick=quick)
    say(f"wrote {report}")
    return report


def failed_jobs(out: Path, quick: bool = False, stages: Sequence[str] | None = None) -> list[str]:
    """The jobs of ``stages`` whose stored result is an error (a failed run; the next invocation tries it again)."""
    failed = []
    for job in build_plan(quick):
        if job.stage in (stages or STAGES):
            record = read_json(result_path(out, job))
            if record and record.get("spec") == job.spec and record.get("status") != "ok":
                failed.append(job.key)
    return failed


def _run_stage(out: Path, plan: list[Job], stage: str, jobs_at_once: int, threads: int, say, runner) -> None:
    jobs = [j for j in plan if j.stage == stage]
    stored = load_results(out, plan)
    todo = [j for j in jobs if j.key not in stored or stored[j.key].get("spec") != j.spec
            or _resolved_changed(j, out, stored)]
    say(f"== {stage}: {len(jobs) - len(todo)} of {len(jobs)} jobs stored, {len(todo)} to run "
        f"(budget {sum(j.cpu_s for j in todo):,.0f} CPU s)")
    if stage == "mqar":
        for job in todo:
            _run_mqar(out, job, jobs_at_once, threads, say)
        return
    pending = []
    for job in todo:
        spec = resolve_spec(job, out, stored)
        if spec is None:
            say(f"   {job.key}: pending (needs {', '.join(job.needs)})")
            continue
        pending.append((job, spec))
    rank = {v: i for i, v in enumerate(RUN_ORDER)}
    pending.sort(key=lambda p: rank.get(p[1].get("variant", p[0].name), len(rank)))

    def finished(job: Job, spec: dict, result: dict | None, error: str | None) -> None:
        record = {"stage": job.stage, "name": job.name, "spec": job.spec, "resolved_spec": spec,
                  "status": "ok" if error is None else "error", "result": result, "error": error,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        write_json(result_path(out, job), record)
        if error:
            say(f"   {job.key}: ERROR {error.strip().splitlines()[-1]}")
        else:
            say(f"   {job.key}: done in {result['wall_s']:.0f} s ({result['cpu_s']:.0f} CPU s)"
                + (f", validation ppl {result['eval']['perplexity']:.2f}, bpb {result['eval']['bits_per_byte']:.3f}"
                   if "eval" in result else ""))

    def call(job: Job, spec: dict):
        args = (job.kind, spec, str(out), str(run_dir_of(out, job, spec)), threads)
        return runner(*args)

    if jobs_at_once <= 1 or len(pending) <= 1 or runner is not run_job:
        for job, spec in pending:
            try:
                finished(job, spec, call(job, spec), None)
            except Exception:
                finished(job, spec, None, traceback.format_exc())
        return
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(jobs_at_once, len(pending)), mp_context=context) as pool:
        futures = {pool.submit(run_job, job.kind, spec, str(out), str(run_dir_of(out, job, spec)), threads):
                   (job, spec) for job, spec in pending}
        for future in cf.as_completed(futures):
            job, spec = futures[future]
            try:
                finished(job, spec, future.result(), None)
            except Exception:
                finished(job, spec, None, traceback.format_exc())


def _resolved_changed(job: Job, out: Path, stored: dict[str, dict]) -> bool:
    """A job whose inputs changed since it ran: the best hybrid, or the run directory of the job it read (a tune run
    trained again gives its S-NIAH and BABILong jobs another run to evaluate)."""
    if job.key not in stored or not job.needs:
        return False
    spec = resolve_spec(job, out, stored)
    return spec is not None and stored[job.key].get("resolved_spec") != spec


def mqar_dir(out: Path, job: Job) -> Path:
    """An MQAR job's grid directory, named by its spec's digest like the run directories (a changed spec starts a new
    grid beside the old one)."""
    return out / "mqar" / f"{job.name}-{job.digest}"


def _run_mqar(out: Path, job: Job, jobs_at_once: int, threads: int, say) -> None:
    bench = _bench_mqar()
    seed_dir = mqar_dir(out, job)
    args = [*job.spec["args"], "--variants", *job.spec["variants"], "--out", str(seed_dir), "--resume",
            "--jobs", str(jobs_at_once), "--threads", str(threads)]
    say(f"   {job.key}: benchmarks/bench_mqar.py {' '.join(args)}")
    started, cpu = time.perf_counter(), time.process_time()
    code = bench.main(args)
    data = read_json(seed_dir / "results.json")
    ok = code == 0 and data is not None and data.get("complete")
    record = {"stage": job.stage, "name": job.name, "spec": job.spec, "status": "ok" if ok else "error",
              "result": {"results_json": str(seed_dir / "results.json"), "wall_s": round(time.perf_counter()
                                                                                         - started, 1),
                         "cpu_s": round(time.process_time() - cpu, 1)} if ok else None,
              "error": None if ok else f"bench_mqar exited with {code}",
              "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_json(result_path(out, job), record)


# ---------------------------------------------------------------------------------------------------- report
# The paper's numbers, quoted beside ours (arXiv 2501.00663 v1): Table 1, 340M, Wikitext perplexity; Table 5, LM ppl.
PAPER_TABLE1_340M_WIKI_PPL = {"transformer": 31.52, "ttt": 27.44, "gated_deltanet": 27.01, "lmm": 26.18,
                              "mac": 25.43, "mag": 25.07, "mal": 24.69}
PAPER_TABLE5_PPL = {"lmm": 27.01, "mac": 26.67, "mag": 25.70, "mal": 25.91, "linear_memory": 28.49, "no_conv": 28.73,
                    "no_momentum": 28.98, "no_forgetting": 29.04, "no_persistent": 27.63}


def _figures(plot: Callable, *args, **kwargs) -> None:
    """Draw one of the report's figures (tests replace this to skip drawing)."""
    plot(*args, **kwargs)


def _fmt(value, digits: int = 2, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return f"{value:,.{digits}f}"


def _quarters(losses: Sequence[float]) -> list[float]:
    """Perplexity over each quarter of the positions of a window."""
    n = len(losses) // 4
    return [math.exp(statistics.fmean(losses[q * n:(q + 1) * n])) for q in range(4)] if n else []


def _session(s: dict) -> str:
    stages = ", ".join(s["stages"])
    if s.get("finished") is None:
        return f"{stages} (started {s.get('started', '?')}, interrupted)"
    return f"{stages} ({s['wall_s']:,.0f} s wall, ended {s['finished']})"


def _stage_status(plan: Sequence[Job], stored: dict[str, dict], stage: str, extra_done: int = 0) -> tuple[int, int]:
    jobs = [j for j in plan if j.stage == stage]
    return sum(j.key in stored for j in jobs) + extra_done, len(jobs)


def write_report(out: Path, plan: Sequence[Job], report: Path, quick: bool = False) -> str:
    """The Markdown report of the stored results (figures in ``<report dir>/<report stem>/``); returns its text."""
    stored = load_results(out, plan)
    fig_dir = report.parent / report.stem
    rel = lambda p: os.path.relpath(p, report.parent)  # noqa: E731
    sessions = (read_json(out / "sessions.json") or {}).get("sessions", [])
    lm = _stage_results(stored, plan, "lm")
    mqar_runs, mqar_cfg, mqar_partial = _mqar_runs(out, plan)
    status = {}
    for stage in STAGES:
        done, total = _stage_status(plan, stored, stage)
        if stage == "mqar" and mqar_partial:
            state = f"partial ({len(mqar_runs)} runs stored)"
        else:
            state = "done" if done == total else "pending" if done == 0 else "partial"
        status[stage] = (done, total, state)
    b = QUICK if quick else FULL
    lines = [
        "# Results: the paper's comparisons at small scale" + (" (--quick: a pipeline check, not results)" if quick
                                                               else ""),
        "",
        f"Written by `titans reproduce{' --quick' if quick else ''}` from the results stored in `{out}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Every number below is read from those stored "
        "results; a stage marked pending has not run yet: `titans reproduce` (or `make results`) resumes the plan "
        "where it stopped, reusing every finished job, and rewrites this file.",
        "",
        "| stage | what | jobs stored | status |",
        "| --- | --- | ---: | --- |",
    ]
    what = {"lm": "language modelling, every variant, equal parameters and tokens (Table 1)",
            "mqar": "associative recall (MQAR), every variant, 3 seeds",
            "ablations": "lmm and the best hybrid without each component (Table 5)",
            "depth": "memory depth 1-4: perplexity and throughput (Figs. 7-8)",
            "seeds": "language modelling of lmm, mac, mag, mal with a further seed: the seed spread",
            "tune": "the lm stage's models fine-tuned with S-NIAH and BABILong examples mixed in",
            "niah": "S-NIAH-1/2/3 by length and depth (Table 2)",
            "babilong": "BABILong qa1-qa5 by length (Fig. 6)"}
    for stage in STAGES:
        done, total, state = status[stage]
        lines.append(f"| {stage} | {what[stage]} | {done} / {total} | **{state}** |")
    if sessions:
        m = sessions[-1]["machine"]
        lines += ["", f"Machine: {m['processor']}, {m['cpu_count']} CPU cores, {m['platform']}, Python {m['python']}, "
                      f"torch {m['torch']}" + (f", {m['cuda']}" if m.get("cuda") else ", no GPU")
                  + f"; {sessions[-1]['jobs_at_once']} jobs at once, {sessions[-1]['threads']} torch thread(s) each. "
                  "Recorded sessions: " + "; ".join(_session(s) for s in sessions) + "."]
    lines += _lm_section(lm, plan, b, fig_dir, rel, out)
    lines += _mqar_section(mqar_runs, mqar_cfg, mqar_partial, fig_dir, rel)
    lines += _ablation_section(stored, plan, lm)
    lines += _depth_section(stored, plan, lm, fig_dir, rel)
    lines += _seeds_section(stored, plan, lm)
    lines += _tune_section(stored, plan, lm, b)
    lines += _niah_section(stored, plan, fig_dir, rel)
    lines += _babilong_section(stored, plan, fig_dir, rel)
    lines += _discussion(lm, stored, plan, mqar_runs, mqar_cfg)
    lines += ["", "## The plan and its budget", "",
              f"Budgets are CPU seconds on one core, estimated from the measured cost of a training step of each "
              f"variant (`titans.reproduce.LM_STEP_CPU_S`, `MQAR_STEP_CPU_S`); the wall and CPU time each job took "
              f"is stored with its result. Language-model jobs: `configs/lm/small/<variant>.yaml` (the library's "
              f"defaults, `titans.model.preset('small', variant)`) with these overrides: `"
              + " ".join(f"{k}={v}" for k, v in lm_overrides(b, 'VARIANT').items()) + "`; each is evaluated on "
              f"the first {b.eval_tokens:,} validation tokens in windows of the training length "
              f"({b.lm_seq_len}) and of 4x it ({4 * b.lm_seq_len}, streamed through the model state in pieces of "
              f"{b.lm_seq_len}).", "", budget_table(plan)]
    lines += _configs_section(lm)
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write(report, text.encode())
    return text


def train_seconds(metrics: Sequence[dict]) -> float | None:
    """Training wall time over every session of a run (a resumed run's summary counts its last session only): the
    sum over the logged windows of their tokens over their tokens/s (evaluations and checkpoints excluded)."""
    total, before, seen = 0.0, 0, False
    for r in metrics:
        if "train/tokens_per_s" in r and r["train/tokens_per_s"] > 0:
            total += (r["train/tokens"] - before) / r["train/tokens_per_s"]
            before, seen = r["train/tokens"], True
    return total if seen else None


def _train_wall(r: dict) -> float | None:
    if r.get("train_s") is not None:
        return r["train_s"]
    path = Path(r["run_dir"]) / "metrics.jsonl"
    if path.is_file():
        from titans.metrics import read_metrics

        return train_seconds(read_metrics(path.parent))
    return None


def _progress(out: Path, job: Job) -> str:
    """", trained to step N of M" for a training job interrupted after a checkpoint (it resumes there)."""
    from titans.checkpoint import resolve_checkpoint

    try:
        step = int(resolve_checkpoint(run_dir_of(out, job)).name.rsplit("-", 1)[1])
    except Exception:  # no run directory or checkpoint yet
        return ""
    return f" (checkpoint at step {step} of {job.spec['set']['train.steps']})"


def _lm_section(lm: dict, plan, b: Budget, fig_dir: Path, rel, out: Path) -> list[str]:
    lines = ["", "## Language modelling (Table 1, small)", ""]
    if not lm:
        return lines + ["Pending: no language-model run stored yet."]
    from titans.plots import plot_lines

    any_run = next(iter(lm.values()))
    lines += [f"Every variant at the `small` preset (~{any_run['params'] / 1e6:.1f}M parameters, matched by the "
              f"SwiGLU width), byte tokens of the offline corpus (`titans data prepare`), "
              f"{any_run['tokens']:,} training tokens each ({b.lm_steps} steps of {b.lm_batch} x {b.lm_seq_len}), "
              f"seed 0. Validation perplexity and bits per byte on {any_run['eval']['tokens']:,} tokens at the "
              f"training length; \"4x\" is the same text in windows of {any_run['long']['seq_len']} tokens, streamed; "
              "\"4x by quarter\": perplexity over each quarter of those windows' positions (the first quarter is "
              "the training length; falling or flat beyond it: the model keeps using a longer past, rising: it "
              "does not extrapolate). \"train s\": training wall seconds (sum over the logged windows, every "
              "session; the machine was shared, so read throughput as relative).", "",
              "| variant | params | tokens | val ppl | bits/byte | ppl at 4x | 4x by quarter | train s "
              "| train tok/s | paper 340M Wiki ppl |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in LM_VARIANTS:
        if name not in lm:
            job = next((j for j in plan if j.key == f"lm/{name}"), None)
            if job is not None:
                lines.append(f"| {name} | pending{_progress(out, job)} | | | | | | | | "
                             f"{_fmt(PAPER_TABLE1_340M_WIKI_PPL.get(name))} |")
            continue
        r = lm[name]
        q = _quarters(r["long_loss_by_position"])
        lines.append(f"| {name} | {r['params']:,} | {r['tokens']:,} | {_fmt(r['eval']['perplexity'])} | "
                     f"{_fmt(r['eval']['bits_per_byte'], 3)} | {_fmt(r['long']['perplexity'])} | "
                     f"{' / '.join(f'{v:.2f}' for v in q) or '-'} | {_fmt(_train_wall(r), 0)} | "
                     f"{_fmt(r['tokens_per_s'], 0)} | {_fmt(PAPER_TABLE1_340M_WIKI_PPL.get(name))} |")
    curves = {"training loss (mean over each logging window)": {}, "validation loss (4 batches)": {}}
    for name, r in lm.items():
        for key, panel in (("train/loss", "training loss (mean over each logging window)"),
                           ("eval/loss", "validation loss (4 batches)")):
            pts = [(p["step"] * r["tokens"] / max(1, r["steps"]), p[key]) for p in r["curve"] if key in p]
            if pts:
                curves[panel][name] = ([x for x, _ in pts], [y for _, y in pts])
    by_pos = {}
    for name, r in lm.items():
        losses = r["long_loss_by_position"]
        width = max(1, len(losses) // 32)
        xs = [(i + 0.5) * width for i in range(len(losses) // width)]
        by_pos[name] = (xs, [math.exp(statistics.fmean(losses[i * width:(i + 1) * width])) for i in range(len(xs))])
    _figures(plot_lines, curves, fig_dir / "lm_loss_curves.png", "Loss curves, equal token budget", "training tokens",
               "loss (nats per byte token)")
    _figures(plot_lines, {f"windows of {any_run['long']['seq_len']} tokens (trained at {b.lm_seq_len})": by_pos},
               fig_dir / "lm_ppl_by_position.png", "Perplexity by position at 4x the training length (streamed)",
               "position in the window", "perplexity")
    lines += ["", f"![loss curves]({rel(fig_dir / 'lm_loss_curves.png')})", "",
              f"![perplexity by position]({rel(fig_dir / 'lm_ppl_by_position.png')})"]
    return lines


def _mqar_runs(out: Path, plan) -> tuple[list[dict], dict | None, bool]:
    """Every stored MQAR run of the plan's seeds (finished grids and interrupted ones), their shared config with
    every seed, and whether any grid is unfinished."""
    runs, cfg, partial = [], None, False
    for job in (j for j in plan if j.stage == "mqar"):
        data = read_json(mqar_dir(out, job) / "results.json")
        if not data:
            partial = partial or False
            continue
        partial = partial or not data.get("complete")
        runs += data.get("runs", [])
        if cfg is None:
            cfg = dict(data["config"])
    if cfg is not None:
        cfg["seeds"] = sorted({r["seed"] for r in runs})
    return runs, cfg, partial


def _mqar_section(runs: list[dict], cfg: dict | None, partial: bool, fig_dir: Path, rel) -> list[str]:
    lines = ["", "## Associative recall: MQAR (the memory issue's benchmark)", ""]
    if not runs:
        return lines + ["Pending: no MQAR run stored yet (`benchmarks/bench_mqar.py`'s default grid, seeds 0, 1, 2; "
                        "each seed's grid in `mqar/seed<N>-<digest>/`). `docs/memory.md` has the seed-0 grid measured "
                        "while "
                        "the memory's defaults were chosen."]
    bench = _bench_mqar()
    seen = {r["variant"] for r in runs}
    cfg = {**cfg, "variants": [v for v in cfg["variants"] if v in seen]}
    rows = bench.summarize(runs, cfg)
    table = bench.markdown(rows, cfg)
    _figures(bench.plot, rows, cfg, fig_dir / "mqar.png")
    body = table.split("\n", 2)[2]  # without its title
    body = body.split("\nMean accuracy over the test sets")[0]
    per_variant = {v: sorted(r["seed"] for r in runs if r["variant"] == v) for v in cfg["variants"]}
    lines += [("Partial: " if partial else "") + "runs stored per variant (seeds): "
              + ", ".join(f"{v} {s}" for v, s in per_variant.items()) + ". With several seeds a cell is the mean "
              "and the (min-max) spread.", "", body.strip(), "", f"![MQAR]({rel(fig_dir / 'mqar.png')})"]
    return lines


def _seeds_section(stored, plan, lm) -> list[str]:
    lines = ["", "## Seed spread of the Titans variants' language models", ""]
    jobs = [j for j in plan if j.stage == "seeds"]
    if not any(j.key in stored for j in jobs):
        return lines + ["Pending: " + ", ".join(j.label for j in jobs) + " (the lm stage's runs are seed 0)."]
    seeds = sorted({j.spec["set"]["train.seed"] for j in jobs})
    lines += ["The lm stage's budget and configs with other seeds (seed 0: the lm stage's run). Validation perplexity:",
              "", "| variant | seed 0 | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread (max / min) |",
              "| --- | ---: | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |"]
    for v in (v for v in TITANS_LM if any(j.spec["variant"] == v for j in jobs)):
        runs = {0: lm.get(v)} | {j.spec["set"]["train.seed"]: stored[j.key]["result"] for j in jobs
                                 if j.spec["variant"] == v and j.key in stored}
        ppl = {s: r["eval"]["perplexity"] for s, r in runs.items() if r is not None}
        cells = [f"{ppl[s]:.2f}" if s in ppl else "pending" for s in (0, *seeds)]
        summary = (f"{sum(ppl.values()) / len(ppl):.2f} | {max(ppl.values()) / min(ppl.values()):.2f}x"
                   if len(ppl) > 1 else "| ")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {summary} |")
    return lines


def _ablation_section(stored, plan, lm) -> list[str]:
    lines = ["", "## Ablations (Table 5)", ""]
    jobs = [j for j in plan if j.stage == "ablations"]
    if not any(j.key in stored for j in jobs):
        return lines + ["Pending: " + ", ".join(j.label for j in jobs) + " (the hybrid: the lm stage's hybrid with "
                        "the lowest validation perplexity)."]
    lines += ["Each row switches one component off in the library's defaults, same budget as the lm stage; the full "
              "models are the lm stage's runs. Paper: Table 5's LM perplexity (ablations of LMM only)."]
    for base in ("lmm", "hybrid"):
        lines += ["", "| model | val ppl | change vs full | paper ppl | paper change |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        results = {j.name.split("-", 1)[1]: stored[j.key] for j in jobs if j.name.startswith(base)
                   and j.key in stored}
        variant = "lmm" if base == "lmm" else next((r["resolved_spec"]["variant"] for r in results.values()), None)
        full = lm.get(variant) if variant else None
        if variant is None:
            lines.append("| hybrid ablations | pending | | | |")
            continue
        paper_full = PAPER_TABLE5_PPL.get(variant)
        lines.append(f"| {variant} (full) | {_fmt(full['eval']['perplexity']) if full else 'pending'} | | "
                     f"{_fmt(paper_full)} | |")
        for name, (_, label) in ABLATIONS.items():
            r = results.get(name)
            ppl = r["result"]["eval"]["perplexity"] if r else None
            paper = PAPER_TABLE5_PPL.get(name) if base == "lmm" else None
            lines.append(f"| {variant} {label} | {_fmt(ppl) if r else 'pending'} | "
                         f"{_fmt(ppl - full['eval']['perplexity'], 2) if (r and full) else ''} | {_fmt(paper)} | "
                         f"{_fmt(paper - paper_full, 2) if (paper and paper_full) else ''} |")
        ours = [ABLATIONS[n][1] for n in sorted(results, key=lambda n: -results[n]["result"]["eval"]["perplexity"])]
        if base == "lmm" and len(ours) > 1:
            paper_order = [ABLATIONS[n][1] for n in sorted(ABLATIONS, key=lambda n: -PAPER_TABLE5_PPL[n])]
            lines += ["", f"Ordering by the perplexity without the component (most harmful removal first): ours "
                          f"{' > '.join(ours)}; the paper's {' > '.join(paper_order)}."]
    return lines


def _depth_section(stored, plan, lm, fig_dir: Path, rel) -> list[str]:
    lines = ["", "## Memory depth (Figures 7-8)", ""]
    rows = {2: lm.get("lmm")} if "lmm" in lm else {}
    if "ablations/lmm-linear_memory" in stored:
        rows[1] = stored["ablations/lmm-linear_memory"]["result"]
    for j in plan:
        if j.stage == "depth" and j.key in stored:
            rows[j.spec["set"]["model.memory_depth"]] = stored[j.key]["result"]
    if len(rows) < 2:
        return lines + ["Pending: lmm with memory depth 1, 3, 4 (depth 2 is the lm stage's lmm, depth 1 the ablations' "
                        "linear memory)."]
    from titans.plots import plot_lines

    lines += ["lmm at the lm stage's budget, the memory MLP's depth L_M changed (its other sizes as the defaults; "
              "depth 2 is the lm stage's lmm, depth 1 the ablations' linear memory). "
              "Throughput: median training tokens/s of the logged windows (one thread, on a shared machine).", "",
              "| L_M | params | val ppl | bits/byte | ppl at 4x | train tok/s |", "| ---: | ---: | ---: | ---: | ---: "
              "| ---: |"]
    for d in sorted(rows):
        r = rows[d]
        lines.append(f"| {d} | {r['params']:,} | {_fmt(r['eval']['perplexity'])} | "
                     f"{_fmt(r['eval']['bits_per_byte'], 3)}"
                     f" | {_fmt(r['long']['perplexity'])} | {_fmt(r['tokens_per_s'], 0)} |")
    ds = sorted(rows)
    _figures(plot_lines, {"validation perplexity": {"lmm": (ds, [rows[d]["eval"]["perplexity"] for d in ds])},
                "training throughput": {"lmm": (ds, [rows[d]["tokens_per_s"] or float("nan") for d in ds])}},
               fig_dir / "depth.png", "Memory depth", "memory depth L_M", ["perplexity", "tokens / s"])
    return lines + ["", f"![memory depth]({rel(fig_dir / 'depth.png')})"]


def _stage_results(stored, plan, stage: str) -> dict[str, dict]:
    """The stored results of a stage's jobs, by job name, in plan order."""
    return {j.name: stored[j.key]["result"] for j in plan if j.stage == stage and j.key in stored}


def _tune_section(stored, plan, lm: dict, b: Budget) -> list[str]:
    lines = ["", "## Fine-tuning for S-NIAH and BABILong (the tune stage)", ""]
    res = _stage_results(stored, plan, "tune")
    if not res:
        return lines + ["Pending: the lm stage's models fine-tuned with S-NIAH and BABILong examples mixed in."]
    lines += [f"Each lm stage model, {b.tune_steps} more steps of {b.lm_batch} x {b.tune_seq_len} tokens "
              f"(`train.init_from`), {b.tune_fraction:.0%} of every batch's rows S-NIAH-1/2/3 and qa1-qa5 examples "
              "in turn (`data.mix_tasks`: the prompt read, only the answer scored, each answer weighing in the loss "
              "as much as a text row: `data.mix_weighting` row), the rest plain text. Validation "
              "perplexity at the lm stage's length before and at the tuning length after:", "",
              "| model | before | after | tune CPU s |", "| --- | ---: | ---: | ---: |"]
    for name, r in res.items():
        before = lm.get(name, {}).get("eval", {}).get("perplexity")
        lines.append(f"| {name} | {_fmt(before, 2) if before else '-'} | {r['eval']['perplexity']:.2f} | "
                     f"{r['cpu_s']:,.0f} |")
    return lines


def _niah_section(stored, plan, fig_dir: Path, rel) -> list[str]:
    lines = ["", "## Needle in a haystack: S-NIAH-1/2/3 (Table 2)", ""]
    res = _stage_results(stored, plan, "niah")
    if not res:
        return lines + ["Pending: the S-NIAH grids of the tune stage's models."]
    from titans.plots import plot_heatmap_panels

    first = next(iter(res.values()))
    lengths, depths = first["lengths"], first["depths"]
    header = ["| model | " + " | ".join(f"{t.replace('niah_single_', 'S-NIAH-')} @ {n}" for t in NIAH_TASKS
                                       for n in lengths) + " |",
              "| --- |" + " ---: |" * (len(NIAH_TASKS) * len(lengths))]

    def table(metric: str) -> list[str]:  # mean over depths, per task and length
        return [f"| {name} | " + " | ".join(f"{100 * statistics.fmean(row):.0f}" for t in NIAH_TASKS
                                            for row in r["grids"][t][metric]) + " |"
                for name, r in res.items() if all(metric in r["grids"][t] for t in NIAH_TASKS)]

    lines += [f"The tune stage's models (fine-tuned at {first['train_seq_len']} tokens, shorter than every test "
              f"length), RULER's single-needle tasks (haystack and keys as in evaluation, the needles drawn from "
              f"other seeds) at lengths {', '.join(map(str, lengths))} and depths "
              f"{', '.join(f'{d:g}' for d in depths)}: "
              f"teacher-forced exact match of the whole answer (RULER's generation score is off for budget). Mean "
              f"over depths, per length:", "", *header, *table("accuracy")]
    partial = table("token_accuracy")
    if partial:
        lines += ["", "The share of the answer's tokens predicted right, teacher-forced (partial recall, where exact "
                  "match is 0). With a byte-level tokenizer the answer's leading space is easy, and a guessed digit "
                  "is right one time in ten:", "", *header, *partial]
    _figures(plot_heatmap_panels, {n: {t: r["grids"][t]["accuracy"] for t in NIAH_TASKS} for n, r in res.items()},
                        lengths, depths, fig_dir / "niah.png", "S-NIAH accuracy by length (rows) and depth (columns)")
    return lines + ["", f"![S-NIAH heatmaps]({rel(fig_dir / 'niah.png')})"]


def _babilong_section(stored, plan, fig_dir: Path, rel) -> list[str]:
    lines = ["", "## BABILong qa1-qa5 by length (Figure 6)", ""]
    res = _stage_results(stored, plan, "babilong")
    if not res:
        return lines + ["Pending: BABILong qa1-qa5 of the tune stage's memory variants against swa and transformer."]
    from titans.plots import plot_lines

    lengths = sorted({int(n) for r in res.values() for t in r["by_task"].values() for n in t})
    lines += ["The tune stage's models (fine-tuned with qa1-qa5 examples over the corpus's train books among their "
              "mixed rows), teacher-forced exact match of the answer, background from the validation books:", "",
              "| model | task | " + " | ".join(str(n) for n in lengths) + " |",
              "| --- | --- |" + " ---: |" * len(lengths)]
    mean = {}
    for name, r in res.items():
        for task, by in r["by_task"].items():
            lines.append(f"| {name} | {task} | " + " | ".join(_fmt(100 * by[str(n)], 0) if str(n) in by else "-"
                                                             for n in lengths) + " |")
        mean[name] = (lengths, [statistics.fmean(t[str(n)] for t in r["by_task"].values()) for n in lengths])
    _figures(plot_lines, {"mean over qa1-qa5": mean}, fig_dir / "babilong.png", "BABILong accuracy by context length",
               "context length (tokens)", "accuracy", logx=True, ylim=(-0.02, 1.02))
    samples = {stored[j.key]["spec"]["samples"] for j in plan if j.stage == "babilong" and j.key in stored}
    return lines + ["", f"A uniform guess among a task's answer labels scores {_babilong_chance()}. With "
                    f"{'/'.join(map(str, sorted(samples)))} samples a cell, one sample is "
                    f"{100 / min(samples):.0f} points.", "", f"![BABILong]({rel(fig_dir / 'babilong.png')})"]


def _babilong_chance() -> str:
    from titans.data.babilong import TASK_LABELS

    return ", ".join(f"{t} {100 / len(TASK_LABELS[t]):.0f}%" for t in BABILONG_TASKS)


def _discussion(lm, stored, plan, mqar_runs, mqar_cfg) -> list[str]:
    lines = ["", "## What happened, against the paper", ""]
    seq_len = next(iter(lm.values()))["long"]["seq_len"] // 4 if lm else "?"
    if lm:
        order = sorted(lm, key=lambda n: lm[n]["eval"]["perplexity"])
        lines.append(f"- Language modelling, best to worst validation perplexity: "
                     + " < ".join(f"{n} ({lm[n]['eval']['perplexity']:.2f})" for n in order) + ". The paper's 340M "
                     "order (Table 1, Wiki): " + " < ".join(sorted(PAPER_TABLE1_340M_WIKI_PPL,
                                                                    key=PAPER_TABLE1_340M_WIKI_PPL.get)) + ".")
        if "lmm" in lm:
            non_hybrid = [n for n in lm if n not in HYBRIDS]
            best = min(non_hybrid, key=lambda n: lm[n]["eval"]["perplexity"])
            missing = [n for n in LM_VARIANTS if n not in HYBRIDS and n not in lm]
            lines.append(f"- The paper: LMM is the best non-hybrid model. Here the best non-hybrid is {best}"
                         + (f" among those run so far ({', '.join(non_hybrid)}; {', '.join(missing)} pending)"
                            if missing else "")
                         + (" (agrees)." if best == "lmm" else f" (lmm {lm['lmm']['eval']['perplexity']:.2f} "
                            f"against {lm[best]['eval']['perplexity']:.2f}: differs)."))
        rising, flat = [], []
        for n in lm:
            q = _quarters(lm[n]["long_loss_by_position"])
            if q:
                (rising if q[-1] > 1.1 * q[0] else flat).append(f"{n} ({q[0]:.2f} -> {q[-1]:.2f})")
        lines.append("- Perplexity by position at 4x the training length, first quarter -> last quarter: "
                     + (f"rises by more than 10% for {', '.join(rising)}" if rising else "no model rises by 10%")
                     + (f"; within 10% for {', '.join(flat)}" if flat else "") + ".")
        hybrids = [n for n in HYBRIDS if n in lm]
        if hybrids and "lmm" in lm:
            base = lm["lmm"]["eval"]["perplexity"]
            lines.append("- The paper: every hybrid beats LMM (Table 1 at 340M). Here: " + ", ".join(
                f"{n} {lm[n]['eval']['perplexity']:.2f} vs lmm {base:.2f} "
                f"({'agrees' if lm[n]['eval']['perplexity'] < base else 'differs'}, "
                f"{100 * (lm[n]['eval']['perplexity'] / base - 1):+.1f}%)" for n in hybrids) + ".")
        if hybrids:
            lines.append("- The paper: MAC ~ MAG > MAL at 340M-760M. Here: " + ", ".join(
                f"{n} {lm[n]['eval']['perplexity']:.2f}" for n in sorted(hybrids, key=lambda n:
                                                                          lm[n]["eval"]["perplexity"])) + ".")
        lines.append("- One seed per language model (the plan's budget): the seed spread of these runs is not "
                     "measured, so read differences of a few percent in perplexity as undecided; `--set "
                     "train.seed=N` through `titans train` with the same overrides adds seeds.")
    if mqar_runs:
        seeds = sorted({r["seed"] for r in mqar_runs})
        lines.append(f"- MQAR ({len(seeds)} seed(s): {', '.join(map(str, seeds))}): 'beyond' is the accuracy on answers "
                     "whose key is outside the attention window, which only a memory (or full attention) can give; "
                     "with several seeds the spread (min-max) says which differences are real.")
    lines += ["- Scale: ~1.5M parameters and ~1M byte tokens per model on CPU against the paper's 170M-760M models "
              "on 15-30B BPE tokens of FineWeb-Edu at 4K context; at this budget models are far from converged and "
              "the ranking measures how fast each variant learns as much as what it can reach. Tokens are bytes "
              "(`configs/lm/small`'s default; bits per byte compare across tokenizers), so perplexities are per "
              "byte and not comparable in size with the paper's per-BPE-token ones: compare orderings.",
              f"- Length: trained at {seq_len} tokens; the paper trains at 4K. At 4x, full attention with RoPE "
              "(transformer) reads positions further apart than it was trained on; the sliding-window variants see "
              "at most their window at every position, and the memory variants carry their state through the "
              "whole window.",
              "- S-NIAH and BABILong read models fine-tuned briefly on both tasks (the tune stage), where the paper "
              "trains and fine-tunes at far larger scale: accuracy near zero or near chance says the budget did not "
              "teach the task, not that the architecture cannot."]
    return lines + _long_context_findings(stored, plan)


def _long_context_findings(stored, plan) -> list[str]:
    """What the S-NIAH and BABILong results say, computed from them."""
    lines = []
    niah = _stage_results(stored, plan, "niah")
    if niah:
        best = max(statistics.fmean(row) for r in niah.values() for g in r["grids"].values() for row in g["accuracy"])
        tokens = {n: statistics.fmean(statistics.fmean(g["token_accuracy"][0]) for g in r["grids"].values())
                  for n, r in niah.items() if all("token_accuracy" in g for g in r["grids"].values())}
        lines.append(f"  - S-NIAH: the best exact match of any model, task and length (mean over depths) is "
                     f"{100 * best:.0f}%." + (f" Answer tokens right at the shortest length, mean over the three "
                     "tasks: " + ", ".join(f"{n} {100 * a:.0f}%" for n, a in sorted(tokens.items(), key=lambda x:
                                                                                    -x[1])) + "." if tokens else ""))
    babilong = _stage_results(stored, plan, "babilong")
    if babilong:
        means = {n: statistics.fmean(v for t in r["by_task"].values() for v in t.values()) for n, r in babilong.items()}
        lines.append("  - BABILong, mean over tasks and lengths: " + ", ".join(
            f"{n} {100 * a:.0f}%" for n, a in sorted(means.items(), key=lambda x: -x[1]))
            + f"; a uniform guess among the labels scores {_babilong_chance()}.")
    return lines


def _configs_section(lm) -> list[str]:
    if not lm:
        return []
    lines = ["", "## Exact configs", "", "The resolved config of every stored language-model run (the run "
             "directory's `config.yaml` holds the same):", ""]
    for name, r in lm.items():
        c = r["config"]
        lines += [f"<details><summary>{name}: {r['params']:,} parameters, {r['run_dir']}</summary>", "", "```json",
                  json.dumps({k: c[k] for k in ("name", "model", "data", "optim", "train", "eval")}, indent=1),
                  "```", "", "</details>", ""]
    return lines
