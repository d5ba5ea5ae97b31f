"""Which architecture learns a memory task best at the same size and the same training budget?

    python benchmarks/bench_quality.py --threads 1            # MQAR, every variant: ~15 min on a 2-core CPU
    python benchmarks/bench_quality.py --task pattern --variants lmm mac swa --steps 500 --out runs/quality

Every variant in --variants is trained from the task's base config (configs/synthetic/<task>.yaml) with its SwiGLU
width matched to the parameter count of that config's model (within 5%, as in ``titans demo``), and with the same
steps, batch, sequence length, learning-rate schedule and seed (the warmup is capped at a tenth of the steps). Each
trained model is then scored on held-out sequences at every length in --lengths (default: the training length, 4x and
16x it); sequences longer than ``eval.chunk_len`` stream through the model state in pieces of that many tokens.
``recall`` is multi-query associative recall (MQAR): the accuracy is over the answers to the queries, which lie further
from their key-value pairs as the sequence grows. ``pattern`` scores the next token of a repeated random pattern once
its first period has been seen.

Printed: a markdown table of variant, parameters, training wall time, final training loss (mean of the last logged
window) and accuracy at each length. Run directories go under --out (default: a temporary directory, deleted after).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from titans.batches import make_task_from_config
from titans.config import RunConfig
from titans.evaluate import evaluate_synthetic, load_run
from titans.model import VARIANTS, count_parameters, match_parameters
from titans.train import train
from titans.typed_yaml import ConfigError, from_dict, load_yaml, to_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
TASKS = ("recall", "pattern")


def base_config(args: argparse.Namespace, device: str) -> RunConfig:
    """The task's config with this benchmark's budget: steps, batch, length, seed; one evaluation, one checkpoint."""
    data = to_dict(load_yaml(CONFIG_DIR / f"{args.task}.yaml", RunConfig))
    data["train"].update(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                         device=device, eval_every=0, checkpoint_every=0, keep_last=1)
    data["optim"]["warmup_steps"] = min(data["optim"]["warmup_steps"], args.steps // 10)
    data["eval"].update(lengths=args.lengths, samples=args.samples)
    config = from_dict(RunConfig, data)
    for length in args.lengths:  # an unusable evaluation length fails now, not after training
        make_task_from_config(config, seq_len=length)
    return config


def matched_configs(base: RunConfig, variants: list[str]) -> list[RunConfig]:
    """One config per variant, its SwiGLU width chosen to give the base model's parameter count (within 5%)."""
    target = count_parameters(base.model)
    configs = []
    for variant in variants:
        model = match_parameters(base.model.replace(variant=variant, ffn_hidden=None), target, tolerance=0.05)
        run = {**to_dict(base), "name": f"{base.name}-{variant}", "model": to_dict(model)}
        configs.append(from_dict(RunConfig, run))
    return configs


def train_and_score(config: RunConfig, run_dir: Path) -> dict:
    """Train one variant into ``run_dir`` and score its final checkpoint at every ``eval.lengths``."""
    summary = train(config, run_dir, progress=False)
    scores = evaluate_synthetic(load_run(run_dir, config.train.device), config.eval.lengths, config.eval.samples)
    return {"variant": config.model.variant, "parameters": count_parameters(config.model),
            "train_seconds": summary["elapsed_s"], "train_loss": summary["train_loss"],
            "accuracy": {n: r["accuracy"] for n, r in scores["by_length"].items()}}


def print_table(results: list[dict], lengths: list[int], train_len: int) -> None:
    """One markdown row per variant: size, training time and loss, accuracy (%) at each evaluation length."""
    columns = ["variant", "parameters", "train time (s)", "final train loss"]
    columns += [f"acc @ {n}" + (" (train length)" if n == train_len else "") for n in lengths]
    print("| " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * (len(columns) - 1))
    for r in results:
        cells = [r["variant"], f"{r['parameters']:,}", f"{r['train_seconds']:.1f}", f"{r['train_loss']:.3f}"]
        cells += [f"{100 * r['accuracy'][n]:.1f}%" for n in lengths]
        print("| " + " | ".join(cells) + " |", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="recall", help="configs/synthetic/<task>.yaml")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="training sequence length")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="evaluation lengths (default: the training length, 4x and 16x it)")
    parser.add_argument("--samples", type=int, default=128, help="held-out sequences per evaluation length")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the runs (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the evaluation")
    args = parser.parse_args()
    args.lengths = args.lengths or [args.seq_len, 4 * args.seq_len, 16 * args.seq_len]
    if min(args.steps, args.batch_size, args.seq_len, args.samples, *args.lengths) < 1:
        parser.error("--steps, --batch-size, --seq-len, --samples and --lengths must be positive")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    args.variants = list(dict.fromkeys(args.variants))  # a variant named twice is trained once
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        configs = matched_configs(base_config(args, device), args.variants)
    except (ConfigError, ValueError) as exc:  # an unusable length for the task, or a size no variant can match
        raise SystemExit(f"bench_quality.py: error: {exc}") from None
    taken = [str(args.out / c.name) for c in configs if args.out and (args.out / c.name).exists()]
    if taken:
        raise SystemExit(f"bench_quality.py: error: run directories already exist: {', '.join(taken)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as scratch:
        out = args.out or Path(scratch)
        results = []
        for i, config in enumerate(configs, 1):
            print(f"[{i}/{len(configs)}] training {config.model.variant} ({count_parameters(config.model):,} "
                  f"parameters) into {out / config.name}", flush=True)
            results.append(train_and_score(config, out / config.name))
    train_cfg = configs[0].train
    print(f"\n# {args.task}: {train_cfg.steps} steps of {train_cfg.batch_size} x {train_cfg.seq_len} tokens, seed "
          f"{train_cfg.seed}, {device}, torch={torch.__version__} threads={torch.get_num_threads()}; accuracy on "
          f"{args.samples} held-out sequences per length\n")
    print_table(results, args.lengths, train_cfg.seq_len)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
