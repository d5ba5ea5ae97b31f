"""Multi-query associative recall (MQAR) after Zoology's recipe: every variant at one size, a learning-rate sweep,
accuracy by test length and by key-query distance (within / beyond the attention window).

    titans bench mqar                                   # the default grid: 9 variants x 1 lr x 1 seed (see Budget)
    python benchmarks/bench_mqar.py --quick             # smoke run: 2 variants, 4 steps, short sets (< 30 s)
    python benchmarks/bench_mqar.py --variants transformer lmm mac --lrs 1e-3 3e-3 1e-2 --seeds 0 1 2 --jobs 2
    python benchmarks/bench_mqar.py --resume            # finish an interrupted grid in --out (same configuration)
    titans bench mqar --args --variants transformer deltanet --steps 800 --out runs/mqar_long

Task (Zoology's ``multiquery_ar``, :class:`titans.data.synthetic.RecallTask`): keys from the lower half of the
vocabulary and values from the upper half open the sequence as ``k1 v1 ... kn vn``; each key is queried once more at an
even offset with power-law gaps (a = 0.01), random filler elsewhere. Only the answers are scored: the loss is the
cross-entropy over the answers alone, the accuracy the arg-max accuracy over the answers.

Training: every step takes a fresh, seeded batch of BATCH sequences from each set ``LEN:PAIRS:BATCH`` of --train
(default 48 x (64, 8) and 4 x (256, 32): 4,096 tokens, 640 answers per step), averages the cross-entropy over all
their answers, clips the gradient norm at 1.0 and takes one AdamW step (titans.optim: weight decay 0.1 on matrices as
in Zoology, none on embeddings, norms, biases; betas 0.9, 0.95). Every (variant, lr, seed) is an independent run;
--jobs of them run at once in separate processes (spawned) with --threads torch threads each.

Why these defaults (measured on this benchmark's 2-layer, width-64 models): MQAR is learned after a plateau at chance,
and at this budget the escape from it decides everything. (1) Vocabulary 80: the smallest round size whose 39 keys
allow the 32 pairs of the 256-token set; at vocabulary 256 the transformer was still on the plateau after 400 steps.
(2) Many short sequences per step: the escape is driven by the number of (64, 8) examples per step (transformer, lr
3e-3: 16 per step, no escape in 400 steps; 32, ~330 steps; 48, ~250; 64, ~220), while the long ones cost most of the
compute, so the mix is weighted toward short sequences, as Zoology's (100K of its 180K training examples are
64 tokens long). (3) The learning rate stays constant after a 5% warmup (``--min-lr-ratio 1``: titans.optim's
cosine floored at the peak): with a cosine to 0.1 x lr the transformer did not escape within 400 steps. (4) One
learning rate, 3e-3, and twice the steps rather than a sweep: in a grid of lrs 1e-3 and 3e-3 at 350 steps (Zoology's
grid starts at 1e-3, 10^-2.5) 3e-3 was the better one for every variant but mal (at chance with both), and among 1e-3,
3e-3, 5e-3, 1e-2 the fastest learner for the transformer and DeltaNet; 1e-2 stays at chance. ``--lrs 1e-3 3e-3``
runs the sweep.

Models: ``TitansConfig(variant, vocab_size, dim, layers, heads, window=segment_len=--window, chunk_size)`` with the
SwiGLU width chosen by ``match_parameters`` so every variant has --params parameters (within 5%).

Testing: each set of --test is a fixed, held-out sample (seed independent of the training seeds) of --test-samples
sequences; 512:32 is longer than any training sequence (length extrapolation, and the longest key-query distances).
For every answer the key-query distance ``d`` (query position minus key position) is known: with a sliding window of
W the value (at the key's position + 1) is visible to the query exactly when ``d <= W``. Reported per run and test set:
accuracy overall, ``within`` (d <= W) and ``beyond`` (d > W: answers that only a memory, or attention over the whole
sequence, can give), the answer loss and the accuracy in distance bins. The best learning rate of a variant is the one
with the highest mean accuracy over the test sets (Zoology reports the best of its sweep the same way; a diverged run
counts -1); every run is kept in the JSON. With several seeds a cell is the mean over seeds and its min-max spread.

Budget: a training step of the default mix costs (CPU seconds on one thread, measured in the default grid) mac 0.84,
mag 0.68, mal 0.66, lmm 0.57, ttt 0.55, gated_deltanet 0.24, deltanet 0.23, swa 0.13, transformer 0.11: 4.0 s per
step for all nine variants. The default 700 steps took 2,813 CPU seconds of training and ~70 s of tests: ~25 minutes
with --jobs 2 on two otherwise idle cores. On a busy machine it is longer (37 minutes while other work shared the
cores); the wall and CPU seconds of every run are in the JSON.

Outputs in --out (default runs/bench_mqar): results.json (configuration, machine, every run, the summary), results.md
(the tables) and mqar.png (accuracy versus test length per variant, overall and beyond the window), each written
atomically; results.json is rewritten after every run, so an interrupted grid can be finished with --resume. The
script writes nothing else there and deletes nothing. An --out that already holds results is refused unless --resume
(same configuration: reuse its finished runs) or --force (start over).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from titans.config import OptimConfig
from titans.data.synthetic import RecallTask
from titans.fileio import atomic_write
from titans.model import VARIANTS, TitansConfig, TitansLM, count_parameters, match_parameters
from titans.optim import build_optimizer, build_scheduler

BENCHMARK = "mqar"
FORMAT_VERSION = 1
OUTPUTS = ("results.json", "results.md", "mqar.png")
TEST_SEED = 10_000  # test sets are drawn from seeds no training run uses (training: 0 .. 9_999)
EVAL_BATCH_TOKENS = 16_384  # tokens per evaluation forward pass
DEFAULT_TRAIN = ["64:8:48", "256:32:4"]
DEFAULT_TEST = ["64:8", "128:16", "256:32", "512:32"]
DEFAULT_LRS = [3e-3]
DEFAULT_STEPS = 700


# ---------------------------------------------------------------------------------------------------- data
def parse_sets(texts: list[str], batch_tokens: int | None = None) -> list[list[int]]:
    """Test sets ``["64:8", ...]`` -> ``[[64, 8], ...]``; training sets (``batch_tokens`` given) ``LEN:PAIRS[:BATCH]``
    -> ``[[LEN, PAIRS, BATCH], ...]``, BATCH defaulting to ``batch_tokens / LEN`` sequences."""
    sets = []
    for text in texts:
        try:
            numbers = [int(x) for x in text.split(":")]
        except ValueError:
            numbers = []
        if len(numbers) != 2 and not (batch_tokens and len(numbers) == 3):
            raise ValueError(f"a {'training' if batch_tokens else 'test'} set is LEN:PAIRS"
                             f"{'[:BATCH]' if batch_tokens else ''}, e.g. 64:8; got {text!r}")
        if batch_tokens and len(numbers) == 2:
            numbers.append(max(1, round(batch_tokens / numbers[0])))
        if min(numbers) < 1:
            raise ValueError(f"set {text!r}: every number must be positive")
        sets.append(numbers)
    return sets


def recall_task(vocab: int, length: int, pairs: int) -> RecallTask:
    return RecallTask(vocab_size=vocab, seq_len=length, num_kv_pairs=pairs)


def recall_batch(task: RecallTask, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
    """``size`` examples of ``task`` drawn in turn from ``rng``, stacked: inputs, targets, loss_mask, distance."""
    examples = [task.generate(rng) for _ in range(size)]
    return {k: torch.stack([e[k] for e in examples]) for k in ("inputs", "targets", "loss_mask", "distance")}


# ---------------------------------------------------------------------------------------------------- models
def model_config(variant: str, cfg: dict) -> TitansConfig:
    """The benchmark's shape for ``variant``, its SwiGLU width matched to ``cfg['params']`` parameters."""
    base = TitansConfig(variant=variant, vocab_size=cfg["vocab"], dim=cfg["dim"], layers=cfg["layers"],
                        heads=cfg["heads"], window=cfg["window"], segment_len=cfg["window"],
                        chunk_size=cfg["chunk_size"])
    return match_parameters(base, cfg["params"], tolerance=0.05)


# ---------------------------------------------------------------------------------------------------- one run
def distance_bins(max_distance: int, window: int) -> list[tuple[int, int]]:
    """Inclusive distance ranges: (1, W/4], ..., (W/2, W], (W, 2W], (2W, 4W], ... up to ``max_distance``."""
    edges = [0]
    edge = max(1, window // 4)
    while edge < window:
        edges.append(edge)
        edge *= 2
    edge = window
    while edges[-1] < max_distance:
        edges.append(edge)
        edge *= 2
    return [(lo + 1, hi) for lo, hi in zip(edges, edges[1:])]


@torch.no_grad()
def evaluate(model: TitansLM, cfg: dict, device: torch.device) -> dict:
    """Accuracy (overall, within and beyond the window, by distance bin) and answer loss on every test set."""
    model.eval()
    window, results = cfg["window"], {}
    for length, pairs in cfg["test"]:
        task = recall_task(cfg["vocab"], length, pairs)
        rng = np.random.default_rng([TEST_SEED, length, pairs])
        batch_size = max(1, EVAL_BATCH_TOKENS // length)
        correct, distance, loss_sum = [], [], 0.0
        remaining = cfg["test_samples"]
        while remaining:
            b = recall_batch(task, rng, min(batch_size, remaining))
            remaining -= b["inputs"].shape[0]
            logits = model(b["inputs"].to(device))[0].float()
            mask = b["loss_mask"].to(device)
            targets = b["targets"].to(device)
            loss_sum += F.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
            correct.append((logits.argmax(-1) == targets)[mask].cpu())
            distance.append(b["distance"][b["loss_mask"]])
        correct, distance = torch.cat(correct), torch.cat(distance)
        within, beyond = distance <= window, distance > window
        bins = {}
        for lo, hi in distance_bins(int(distance.max()), window):
            in_bin = (distance >= lo) & (distance <= hi)
            if in_bin.any():
                bins[f"{lo}-{hi}"] = {"answers": int(in_bin.sum()), "accuracy": correct[in_bin].float().mean().item()}
        results[f"{length}:{pairs}"] = {
            "length": length, "pairs": pairs, "sequences": cfg["test_samples"], "answers": int(correct.numel()),
            "loss": loss_sum / correct.numel(),
            "accuracy": correct.float().mean().item(),
            "within": correct[within].float().mean().item() if within.any() else None,
            "beyond": correct[beyond].float().mean().item() if beyond.any() else None,
            "answers_within": int(within.sum()), "answers_beyond": int(beyond.sum()),
            "by_distance": bins,
        }
    model.train()
    return results


def train_run(job: dict) -> dict:
    """Train one (variant, lr, seed) and score it; runs in a worker process (or in the main one with --jobs 1)."""
    cfg, variant, lr, seed = job["cfg"], job["variant"], job["lr"], job["seed"]
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    model_cfg = model_config(variant, cfg)
    torch.manual_seed(seed)
    model = TitansLM(model_cfg).to(device)
    steps = cfg["steps"]
    optim_cfg = OptimConfig(lr=lr, weight_decay=cfg["weight_decay"], warmup_steps=round(cfg["warmup"] * steps),
                            min_lr_ratio=cfg["min_lr_ratio"], grad_clip=1.0)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, steps)
    tasks = [recall_task(cfg["vocab"], length, pairs) for length, pairs, _ in cfg["train"]]
    sizes = [batch for _, _, batch in cfg["train"]]
    started, cpu_started = time.perf_counter(), time.process_time()
    log, window_losses, status = [], [], "ok"
    log_every = max(1, steps // 20)
    for step in range(steps):
        batches = [recall_batch(task, np.random.default_rng([seed, i, step]), size)
                   for i, (task, size) in enumerate(zip(tasks, sizes))]
        answers = sum(int(b["loss_mask"].sum()) for b in batches)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:  # one backward per set: the step's loss is the mean over all its answers
            mask = b["loss_mask"].to(device)
            logits = model(b["inputs"].to(device))[0]
            loss = F.cross_entropy(logits[mask].float(), b["targets"].to(device)[mask], reduction="sum") / answers
            loss.backward()
            total += loss.item()
        if not math.isfinite(total):
            status = f"diverged at step {step}"
            break
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        window_losses.append(total)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": statistics.fmean(window_losses)})
            window_losses = []
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    test = evaluate(model, cfg, device) if status == "ok" else {}
    return {"variant": variant, "lr": lr, "seed": seed, "params": count_parameters(model),
            "ffn_hidden": model_cfg.ffn_width, "status": status, "train_seconds": round(train_seconds, 2),
            "train_cpu_seconds": round(train_cpu_seconds, 2),
            "eval_seconds": round(time.perf_counter() - started - train_seconds, 2),
            "final_loss": log[-1]["loss"] if log else None, "loss_curve": log, "test": test}


def failed_run(job: dict, exc: BaseException) -> dict:
    return {"variant": job["variant"], "lr": job["lr"], "seed": job["seed"], "params": None, "ffn_hidden": None,
            "status": f"error: {type(exc).__name__}: {exc}", "train_seconds": 0.0, "train_cpu_seconds": 0.0,
            "eval_seconds": 0.0, "final_loss": None, "loss_curve": [], "test": {}}


def safe_train_run(job: dict) -> dict:
    """:func:`train_run`, an exception recorded as the run's status (one broken variant does not stop the grid)."""
    try:
        return train_run(job)
    except Exception as exc:
        traceback.print_exc()
        return failed_run(job, exc)


# ---------------------------------------------------------------------------------------------------- summary
def test_keys(cfg: dict) -> list[str]:
    return [f"{length}:{pairs}" for length, pairs in cfg["test"]]


def mean_accuracy(run: dict, cfg: dict) -> float:
    """A run's mean accuracy over the test sets; a diverged or failed run scores -1."""
    if run["status"] != "ok":
        return -1.0
    return statistics.fmean(run["test"][k]["accuracy"] for k in test_keys(cfg))


def pooled(run: dict, cfg: dict, part: str) -> float | None:
    """Accuracy over every answer of every test set in ``part`` ("within" or "beyond" the window)."""
    correct = answers = 0.0
    for key in test_keys(cfg):
        r = run["test"][key]
        if r[part] is not None:
            correct += r[part] * r[f"answers_{part}"]
            answers += r[f"answers_{part}"]
    return correct / answers if answers else None


def summarize(runs: list[dict], cfg: dict) -> list[dict]:
    """Per variant (in --variants order): every lr's mean test accuracy, and the best lr's numbers per seed. The best
    lr has the highest mean over seeds of the mean accuracy over the test sets (a diverged run counting -1)."""
    rows = []
    for variant in cfg["variants"]:
        by_lr: dict[float, list[dict]] = {}
        for run in runs:
            if run["variant"] == variant:
                by_lr.setdefault(run["lr"], []).append(run)
        if not by_lr:
            continue
        score = {lr: statistics.fmean(mean_accuracy(r, cfg) for r in rs) for lr, rs in by_lr.items()}
        best = max(sorted(by_lr), key=lambda lr: score[lr])
        chosen = sorted(by_lr[best], key=lambda r: r["seed"])
        ok = [r for r in chosen if r["status"] == "ok"]
        row = {"variant": variant, "params": next((r["params"] for r in runs if r["variant"] == variant
                                                   and r["params"]), None),
               "best_lr": best, "seeds": [r["seed"] for r in ok],
               "failed": {str(r["seed"]): r["status"] for r in chosen if r["status"] != "ok"},
               "by_lr": {str(lr): {"mean_accuracy": [mean_accuracy(r, cfg) for r in rs if r["status"] == "ok"],
                                   "failed": [r["status"] for r in rs if r["status"] != "ok"]}
                         for lr, rs in sorted(by_lr.items())},
               "train_seconds": statistics.fmean(r["train_seconds"] for r in chosen),
               "train_cpu_seconds": statistics.fmean(r["train_cpu_seconds"] for r in chosen)}
        row["accuracy"] = {k: [r["test"][k]["accuracy"] for r in ok] for k in test_keys(cfg)}
        row["beyond_by_set"] = {k: [r["test"][k]["beyond"] for r in ok if r["test"][k]["beyond"] is not None]
                                for k in test_keys(cfg)}
        row["within"] = [v for r in ok if (v := pooled(r, cfg, "within")) is not None]
        row["beyond"] = [v for r in ok if (v := pooled(r, cfg, "beyond")) is not None]
        rows.append(row)
    return rows


def cell(values: list[float]) -> str:
    """Percent; with several seeds the mean and the min-max spread."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ({100 * min(values):.0f}-{100 * max(values):.0f})"


def failures(statuses: list[str]) -> str:
    """``["diverged at step 9", "error: ..."]`` -> ``"1 diverged, 1 error"``."""
    kinds = [s.split()[0].rstrip(":") for s in statuses]
    return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))


def markdown(rows: list[dict], cfg: dict, wall_seconds: float | None = None, jobs: int = 1,
             runs: list[dict] | None = None) -> str:
    w = cfg["window"]
    keys = test_keys(cfg)
    train = ", ".join(f"{b} x ({n}, {p})" for n, p, b in cfg["train"])
    schedule = ("constant after the warmup" if cfg["min_lr_ratio"] == 1
                else f"then a cosine to {cfg['min_lr_ratio']:g} x lr")
    lines = [
        "# MQAR (Zoology recipe): accuracy (%) on the answers",
        "",
        f"Vocabulary {cfg['vocab']}, dim {cfg['dim']}, {cfg['layers']} layers, {cfg['heads']} heads, window = segment "
        f"= {w}, memory chunk {cfg['chunk_size']}, ~{cfg['params']:,} parameters. {cfg['steps']} steps, each of "
        f"{train} (sequences x (length, pairs)); AdamW, weight decay {cfg['weight_decay']:g}, warmup "
        f"{cfg['warmup']:g} of the steps, {schedule}; lrs {', '.join(f'{lr:g}' for lr in cfg['lrs'])}; seeds "
        f"{', '.join(map(str, cfg['seeds']))}. Test: {cfg['test_samples']} held-out sequences per set "
        f"(length:pairs). \"within\" / \"beyond\": answers whose key lies at distance <= {w} / > {w} from the query "
        f"(pooled over the test sets); beyond the window only a memory or full attention can answer.",
        "",
        "Best learning rate per variant:",
        "",
    ]
    header = ["variant", "params", "best lr"] + [f"acc {k}" for k in keys]
    header += [f"beyond {keys[-1]}", "within", "beyond", "train s", "train CPU s"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| --- | ---: | ---: |" + " ---: |" * (len(header) - 3))
    for row in rows:
        cells = [row["variant"], f"{row['params']:,}" if row["params"] else "-", f"{row['best_lr']:g}"]
        cells += [cell(row["accuracy"][k]) for k in keys]
        cells += [cell(row["beyond_by_set"][keys[-1]]), cell(row["within"]), cell(row["beyond"]),
                  f"{row['train_seconds']:.0f}", f"{row['train_cpu_seconds']:.0f}"]
        if row["failed"]:
            cells[0] += f" ({failures(list(row['failed'].values()))})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean accuracy over the test sets, every learning rate:", ""]
    lrs = [f"{lr:g}" for lr in cfg["lrs"]]
    lines.append("| variant | " + " | ".join(f"lr {lr}" for lr in lrs) + " |")
    lines.append("| --- |" + " ---: |" * len(lrs))
    for row in rows:
        cells = []
        for lr in cfg["lrs"]:
            entry = row["by_lr"].get(str(lr))
            if entry is None:
                cells.append("-")
                continue
            text = cell(entry["mean_accuracy"]) if entry["mean_accuracy"] else ""
            if entry["failed"]:
                text = f"{text} ({failures(entry['failed'])})" if text else failures(entry["failed"])
            cells.append(text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    if wall_seconds is not None:
        lines += ["", f"Wall time of this invocation {wall_seconds:.0f} s ({jobs} jobs x {cfg['threads']} threads, "
                  f"{cfg['device']}, torch {torch.__version__})."]
    if runs:
        lines[-1] += (f" The {len(runs)} runs took {sum(r['train_seconds'] for r in runs):.0f} s of training "
                      f"({sum(r['train_cpu_seconds'] for r in runs):.0f} CPU s) and "
                      f"{sum(r['eval_seconds'] for r in runs):.0f} s of testing, wall time summed over runs.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], cfg: dict, path: Path) -> None:
    """Accuracy versus test length, one line per variant (its best lr): overall, and beyond the window."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = test_keys(cfg)
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    markers = "osD^v<>ph*"
    for i, row in enumerate(rows):
        for ax, source in zip(axes, (row["accuracy"], row["beyond_by_set"])):
            points = [(x, source[k]) for x, k in enumerate(keys) if source[k]]  # the test sets, evenly spaced
            if not points:
                continue
            xs = [x for x, _ in points]
            means = np.array([statistics.fmean(v) for _, v in points])
            spread = [means - np.array([min(v) for _, v in points]), np.array([max(v) for _, v in points]) - means]
            ax.errorbar(xs, means, yerr=spread if len(row["seeds"]) > 1 else None, marker=markers[i % len(markers)],
                        capsize=3, label=f"{row['variant']} (lr {row['best_lr']:g})")
    titles = ("all answers", f"answers beyond the window (key-query distance > {cfg['window']})")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("test set (length:pairs)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # beside the panels, where it hides no line
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"MQAR, vocabulary {cfg['vocab']}, ~{cfg['params']:,} parameters, {cfg['steps']} steps")
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


# ---------------------------------------------------------------------------------------------------- output dir
def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())


def previous_runs(out: Path, cfg: dict, force: bool, resume: bool) -> list[dict]:
    """The finished runs to reuse (with --resume), after checking that --out may be written."""
    path = out / "results.json"
    if not path.exists():
        present = [name for name in OUTPUTS if (out / name).exists()]
        if present and not force:
            raise ValueError(f"{out} holds {', '.join(present)} but no results.json of this benchmark; "
                             f"pass --force to overwrite them or choose another --out")
        return []
    try:
        data = json.loads(path.read_text())
        ours = data.get("benchmark") == BENCHMARK
    except (OSError, ValueError, AttributeError):
        data, ours = None, False
    if not ours:
        if force:
            return []
        raise ValueError(f"{path} was not written by this benchmark; pass --force to overwrite it or choose another "
                         f"--out")
    if data.get("config") != cfg and not force:
        changed = sorted(k for k in set(cfg) | set(data.get("config", {}))
                         if cfg.get(k) != data.get("config", {}).get(k))
        raise ValueError(f"{path} holds results of another configuration (differs in: {', '.join(changed)}); pass "
                         f"--force to overwrite them or choose another --out")
    if force:
        return []
    if not resume:
        raise ValueError(f"{path} already holds results of this configuration; pass --resume to reuse its finished "
                         f"runs, --force to start over, or choose another --out")
    return data.get("runs", [])


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="default: every variant")
    p.add_argument("--lrs", type=float, nargs="+", default=DEFAULT_LRS, help="peak learning rates swept")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (weights and data order)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--window", type=int, default=32, help="attention window of swa/mag/mal and segment of mac")
    p.add_argument("--chunk-size", type=int, default=16, help="tokens per neural-memory step")
    p.add_argument("--params", type=int, default=150_000, help="parameter count every variant is matched to")
    p.add_argument("--vocab", type=int, default=80, help="vocabulary: keys from the lower half, values the upper")
    p.add_argument("--train", nargs="+", default=None, metavar="LEN:PAIRS[:BATCH]",
                   help=f"training sets, BATCH sequences of each per step (default {' '.join(DEFAULT_TRAIN)})")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="BATCH of a training set given without one: this many tokens")
    p.add_argument("--test", nargs="+", default=None, metavar="LEN:PAIRS",
                   help=f"test sets (default {' '.join(DEFAULT_TEST)})")
    p.add_argument("--test-samples", type=int, default=None, help="sequences per test set (default 256)")
    p.add_argument("--warmup", type=float, default=0.05, help="linear warmup, as a fraction of --steps")
    p.add_argument("--min-lr-ratio", type=float, default=1.0,
                   help="the cosine ends at this fraction of the lr (default 1: constant after the warmup)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (Zoology: 0.1)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/bench_mqar"))
    p.add_argument("--force", action="store_true",
                   help="start over: overwrite the three outputs in --out, whatever wrote them")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs of results.json in --out (same configuration)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: transformer and lmm (unless --variants), 4 steps, short sets, 16 test samples")
    args = p.parse_args(argv)
    if args.quick:  # only what is not given explicitly
        args.variants = args.variants or ["transformer", "lmm"]
        args.steps = args.steps or 4
        args.train = args.train or ["32:4:8", "64:8:4"]
        args.test = args.test or ["32:4", "64:8"]
        args.test_samples = args.test_samples or 16
        args.window = min(args.window, 16)
    args.variants = list(dict.fromkeys(args.variants or VARIANTS))
    args.steps = args.steps or DEFAULT_STEPS
    args.test_samples = args.test_samples or 256
    if min(args.steps, args.dim, args.layers, args.heads, args.window, args.chunk_size, args.params, args.batch_tokens,
           args.test_samples, args.jobs, args.threads) < 1:
        p.error("--steps, --dim, --layers, --heads, --window, --chunk-size, --params, --batch-tokens, "
                "--test-samples, --jobs and --threads must be positive")
    if min(args.lrs) <= 0 or min(args.seeds) < 0 or max(args.seeds) >= TEST_SEED:
        p.error(f"--lrs must be positive and --seeds in [0, {TEST_SEED})")
    if not (0 <= args.warmup < 1 and 0 <= args.min_lr_ratio <= 1 and args.weight_decay >= 0):
        p.error("need 0 <= --warmup < 1, 0 <= --min-lr-ratio <= 1 and --weight-decay >= 0")
    try:
        args.train = parse_sets(args.train or DEFAULT_TRAIN, args.batch_tokens)
        args.test = parse_sets(args.test or DEFAULT_TEST)
        for length, pairs, *_ in args.train + args.test:
            recall_task(args.vocab, length, pairs)  # an impossible set fails now, not in a worker
    except ValueError as exc:
        p.error(str(exc))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.lrs = list(dict.fromkeys(args.lrs))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def config_of(args: argparse.Namespace) -> dict:
    """Everything that defines the results (not --jobs, --out, --force, --resume); stored in results.json."""
    cfg = {k: getattr(args, k) for k in ("variants", "lrs", "seeds", "steps", "dim", "layers", "heads", "window",
                                          "chunk_size", "params", "vocab", "batch_tokens", "test_samples",
                                          "weight_decay", "warmup", "min_lr_ratio", "device")}
    cfg["train"], cfg["test"], cfg["threads"] = args.train, args.test, args.threads
    cfg["optimizer"] = ("AdamW (titans.optim: no decay on embeddings, norms, biases), betas (0.9, 0.95), linear "
                        "warmup, cosine to min_lr_ratio * lr, grad-norm clip 1.0")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_of(args)
    started = time.perf_counter()
    try:
        model_cfgs = {v: model_config(v, cfg) for v in args.variants}
        previous = previous_runs(args.out, cfg, args.force, args.resume)
    except ValueError as exc:
        print(f"bench_mqar.py: error: {exc}", file=sys.stderr)
        return 2
    # finished runs (trained or diverged) are reused; runs that failed with an error are tried again
    done = {(r["variant"], r["lr"], r["seed"]): r for r in previous if not r["status"].startswith("error")}
    # Attention-only variants are the cheapest: start the slow ones first so the pool drains evenly.
    order = sorted(args.variants, key=lambda v: v in ("transformer", "swa"))
    jobs = [{"cfg": cfg, "variant": v, "lr": lr, "seed": s} for v in order for lr in args.lrs for s in args.seeds
            if (v, lr, s) not in done]
    runs = list(done.values())
    header = {"benchmark": BENCHMARK, "format_version": FORMAT_VERSION, "config": cfg, "machine": machine(),
              "model_configs": {v: asdict(c) for v, c in model_cfgs.items()}}
    print(f"# MQAR: {len(jobs)} runs to train ({len(done)} reused) of {args.steps} steps, {args.jobs} at a time, "
          f"{args.threads} thread(s) each; parameters: "
          + ", ".join(f"{v} {count_parameters(c):,}" for v, c in model_cfgs.items()), flush=True)

    def finished(run: dict) -> None:
        runs.append(run)
        best = max(run["test"].values(), key=lambda r: r["length"]) if run["test"] else None
        loss = run["final_loss"] if run["final_loss"] is not None else float("nan")
        print(f"[{len(runs)}/{len(jobs) + len(done)}] {run['variant']:<12} lr {run['lr']:<7g} seed {run['seed']} "
              f"{run['status']}: {run['train_seconds']:.0f}s ({run['train_cpu_seconds']:.0f} CPU s), loss {loss:.3f}, "
              + ", ".join(f"{k} {100 * r['accuracy']:.1f}%" for k, r in run["test"].items())
              + (f" (beyond W at {best['length']}: {100 * (best['beyond'] or 0):.1f}%)" if best else ""), flush=True)
        write_json(args.out / "results.json", {**header, "complete": False, "runs": runs})

    torch.set_num_threads(args.threads)
    if args.jobs == 1 or len(jobs) <= 1:
        for job in jobs:
            finished(safe_train_run(job))
    else:
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=context) as pool:
            futures = {pool.submit(safe_train_run, job): job for job in jobs}
            for future in cf.as_completed(futures):
                try:
                    run = future.result()
                except Exception as exc:  # the worker process died (e.g. killed for memory)
                    run = failed_run(futures[future], exc)
                finished(run)
    wall = time.perf_counter() - started
    key = {v: i for i, v in enumerate(args.variants)}
    runs.sort(key=lambda r: (key[r["variant"]], r["lr"], r["seed"]))
    rows = summarize(runs, cfg)
    table = markdown(rows, cfg, wall, args.jobs, runs)
    write_json(args.out / "results.json", {**header, "complete": True, "wall_seconds": round(wall, 1),
                                           "summary": rows, "runs": runs})
    atomic_write(args.out / "results.md", table.encode())
    plot(rows, cfg, args.out / "mqar.png")
    print("\n" + table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'mqar.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
