"""``titans demo``: train a small Titans model on the CPU in a few minutes and show what its memory learned.

The task is embedded (no download): continue a random pattern of 2 to 16 tokens repeated over the sequence
(:class:`~titans.data.synthetic.PatternTask`). Nothing about a pattern can be learned in advance, so predicting it
means memorising it while reading, at test time. The Titans model is LMM, the neural long-term memory alone (paper
Section 4.3): no attention at all, so every look further back than its 4-token convolution goes through the memory.
The baseline is sliding-window attention with a window of 8 tokens and the same number of parameters, trained the
same way: it can copy only the patterns that fit in its window. Both are scored on held-out sequences at the
training length and at 4x and 16x that length, before and after training, and the memory's inner loss is shown
dropping as it stores each piece.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from titans.batches import EVAL_SEED_OFFSET, make_task_from_config
from titans.config import RunConfig
from titans.data.synthetic import example_rng
from titans.evaluate import LoadedRun, evaluate_synthetic, load_run, write_json
from titans.inspection import inspect_memory, records_as_dicts
from titans.model import TitansLM, count_parameters, match_parameters
from titans.plots import plot_accuracy_vs_length
from titans.runtime import seed_everything
from titans.train import train
from titans.typed_yaml import from_dict, to_dict

__all__ = ["DEMO_CONFIG", "BASELINE", "run_demo"]

DEMO_CONFIG = {
    "name": "demo-titans-lmm",
    "model": {"variant": "lmm", "vocab_size": 16, "dim": 32, "layers": 2, "heads": 2, "chunk_size": 8,
              "num_persistent": 2, "window": 8, "segment_len": 16},
    "data": {"task": "pattern", "kwargs": {"min_period": 2, "max_period": 16}},
    "optim": {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 20},
    "train": {"steps": 600, "batch_size": 32, "seq_len": 96, "eval_every": 200, "eval_batches": 4,
              "checkpoint_every": 200, "keep_last": 1, "log_every": 10, "device": "cpu"},
    "eval": {"batch_size": 32, "samples": 128, "lengths": [96, 384, 1536], "chunk_len": 96},
}
BASELINE = {"name": "demo-baseline-swa", "variant": "swa", "window": 8}
LABELS = {"lmm": "Titans LMM (neural memory, no attention)", "swa": "baseline: sliding-window attention (8)"}


def _configs(steps: int | None, baseline: bool) -> list[RunConfig]:
    titans = from_dict(RunConfig, DEMO_CONFIG)
    if steps is not None:
        titans = from_dict(RunConfig, {**DEMO_CONFIG, "train": {**DEMO_CONFIG["train"], "steps": steps}})
    configs = [titans]
    if baseline:  # the same size: the baseline's feed-forward width is matched to the Titans parameter count
        shape = titans.model.replace(variant=BASELINE["variant"], window=BASELINE["window"], ffn_hidden=None)
        model = match_parameters(shape, count_parameters(titans.model), tolerance=0.05)
        configs.append(from_dict(RunConfig, {**to_dict(titans), "name": BASELINE["name"], "model": to_dict(model)}))
    return configs


def _fresh_run_dir(path: Path) -> None:
    """The demo owns its run directories: a previous demo run is replaced, anything else is left alone."""
    if not path.exists():
        return
    saved = path / "config.yaml"
    if not saved.is_file() or "name: demo-" not in saved.read_text(encoding="utf-8"):
        raise FileExistsError(f"{path} exists and is not a demo run; choose another --out")
    shutil.rmtree(path)


def _untrained(config: RunConfig, run_dir: Path) -> LoadedRun:
    """The model as training starts (the trainer seeds torch the same way before building it)."""
    seed_everything(config.train.seed)
    return LoadedRun(TitansLM(config.model).eval(), config, 0, run_dir, run_dir, torch.device("cpu"))


def _percent(x: float) -> str:
    return f"{100 * x:5.1f}%"


def run_demo(out: Path, steps: int | None = None, baseline: bool = True, threads: int | None = None) -> dict:
    """Train, evaluate and compare; writes ``out/<run>/`` run directories, ``out/demo.json`` and
    ``out/accuracy.png``, prints the results and returns them."""
    started = time.perf_counter()
    torch.set_num_threads(threads or 1)  # tiny matrices: more threads only add synchronisation on a small CPU
    configs = _configs(steps, baseline)
    titans = configs[0]
    lengths = list(titans.eval.lengths)
    print("Titans demo: a neural memory that learns to memorise at test time (Behrouz et al. 2024)")
    print(f"task: continue a random pattern of 2-16 tokens repeated over {titans.train.seq_len} tokens "
          f"({titans.model.vocab_size}-token vocabulary; chance {_percent(1 / titans.model.vocab_size).strip()}); "
          "a token is scored once its pattern has been seen")
    results = {"lengths": lengths, "models": {}}
    for i, config in enumerate(configs, 1):
        label = LABELS[config.model.variant]
        run_dir = out / config.name
        _fresh_run_dir(run_dir)
        print(f"\n[{i}/{len(configs)}] {label}: {count_parameters(config.model):,} parameters, "
              f"{config.train.steps} steps of {config.train.batch_size} x {config.train.seq_len} tokens")
        before = evaluate_synthetic(_untrained(config, run_dir), lengths, config.eval.samples)
        summary = train(config, run_dir)
        after = evaluate_synthetic(load_run(run_dir), lengths, config.eval.samples)
        results["models"][config.name] = {
            "label": label, "variant": config.model.variant, "parameters": count_parameters(config.model),
            "train_seconds": summary["elapsed_s"], "run_dir": str(run_dir),
            "before": before["by_length"], "after": after["by_length"]}

    trained = load_run(out / titans.name)
    tokens = make_task_from_config(titans).generate(example_rng(titans.train.seed + EVAL_SEED_OFFSET, 0))["inputs"]
    records = inspect_memory(trained.model, tokens, titans.model.segment_len)
    results["memory"] = records_as_dicts(records)
    results["seconds"] = time.perf_counter() - started
    write_json(out / "demo.json", results)
    plot_accuracy_vs_length({m["label"]: {n: r["accuracy"] for n, r in m["after"].items()}
                             for m in results["models"].values()}, out / "accuracy.png",
                            "pattern task: next-token accuracy after training")
    _report(results, titans)
    return results


def _report(results: dict, titans: RunConfig) -> None:
    lengths, models = results["lengths"], list(results["models"].values())
    names = {"lmm": "Titans LMM", "swa": "SWA baseline"}
    print(f"\nnext-token accuracy on held-out sequences (trained at {titans.train.seq_len} tokens; "
          "longer ones stream through the model state):")
    print(f"  {'tokens':>31}" + "".join(f"{n:>8}" for n in lengths))
    for model in models:
        for when in ("before", "after"):
            name = names[model["variant"]] if when == "before" else ""
            row = "".join(f"{_percent(model[when][n]['accuracy']):>8}" for n in lengths)
            print(f"  {name:<14} {when + ' training':<16}{row}")
    final = {m["variant"]: m["after"][lengths[0]]["accuracy"] for m in models}
    verdict = f"the memory-only Titans model predicts {_percent(final['lmm']).strip()} of the pattern tokens"
    if "swa" in final:
        verdict += (f"; attention over the last {BASELINE['window']} tokens, at the same size, "
                    f"{_percent(final['swa']).strip()}: it can copy only the patterns that fit in its window")
    print(f"  -> {verdict}")
    print("\nthe memory at test time (Titans LMM, one held-out sequence): inner loss ||M(k) - v||^2 of each "
          f"{titans.model.segment_len}-token piece, before -> after the memory stored it:")
    for layer in sorted({r["layer"] for r in results["memory"]}):
        steps = [f"{r['inner_loss_before']:.2f}->{r['inner_loss_after']:.2f}" for r in results["memory"]
                 if r["layer"] == layer]
        print(f"  layer {layer}: " + "  ".join(steps))
    minutes, seconds = divmod(round(results["seconds"]), 60)
    out = Path(models[0]["run_dir"]).parent
    print(f"\nwrote {out}/: one run directory per model (config, metrics, checkpoints, loss.png), demo.json and "
          f"accuracy.png; took {minutes}m{seconds:02d}s")
    print(f"try: titans inspect {out / titans.name}    titans eval {out / titans.name} --lengths 96 6144")
