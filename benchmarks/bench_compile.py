"""What `train.compile: true` buys each variant: a training step eager against compiled, side by side.

    python benchmarks/bench_compile.py                          # every variant of the small preset, CPU or CUDA
    python benchmarks/bench_compile.py --variants swa lmm mac --repeats 4 --json runs/bench_compile.json

Compiled is what the trainer does with `train.compile`: the memory layers' chunk step through torch.compile
(`TitansModel.set_compile_chunks`) and the model wrapped in torch.compile (the memory scan's chunk loop is not
traced). Each variant runs in a fresh process: one step of each kind first (the compiled one's time is reported as
the compilation), then --repeats eager and compiled steps alternating; tokens/s from the medians. The columns
`/ swa` put each variant's speed against swa's eager speed (the issue's target: memory variants >= 0.5x). The
deviation columns compare the first step's loss and gradients (largest relative difference over parameters).
Compilation starts from an empty inductor cache for each variant (a temporary TORCHINDUCTOR_CACHE_DIR) unless
--warm-cache, so `compile s` is what a first run pays; inductor's cache makes later runs of the same shapes faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_memory import apply_device_and_threads, isolated
from titans.model import VARIANTS, TitansLM, count_parameters, preset


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_case(args: argparse.Namespace, variant: str) -> dict:
    """Compilation seconds, eager and compiled step seconds (medians) and the deviation of loss and gradients."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TitansLM(preset(args.preset, variant)).to(device)
    compiled = torch.compile(model)
    tokens = torch.randint(model.config.vocab_size, (args.batch, args.length + 1), device=device)

    def step(use_compiled: bool) -> tuple[float, list[torch.Tensor]]:
        model.set_compile_chunks(use_compiled)
        model.zero_grad(set_to_none=True)
        logits, _ = (compiled if use_compiled else model)(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = step(False)
    start = time.perf_counter()
    compiled_loss, compiled_grads = step(True)
    compile_s = time.perf_counter() - start
    grad_dev = max(((a - b).norm() / b.norm().clamp(min=1e-30)).item() for a, b in zip(compiled_grads, eager_grads))
    eager, fast = [], []
    for _ in range(args.repeats):
        eager.append(_timed(lambda: step(False)))
        fast.append(_timed(lambda: step(True)))
    return {"variant": variant, "parameters": count_parameters(model.config), "compile_s": compile_s,
            "eager_s": statistics.median(eager), "compiled_s": statistics.median(fast),
            "eager_range_s": [min(eager), max(eager)], "compiled_range_s": [min(fast), max(fast)],
            "loss_deviation": abs(compiled_loss - eager_loss) / abs(eager_loss), "grad_deviation": grad_dev}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model size (titans.model.PRESETS)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--length", type=int, default=256, help="training sequence length T")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4, help="timed steps of each kind, alternating (median)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's cache (default: a fresh one each)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if min(args.length, args.batch, args.repeats) < 1:
        parser.error("--length, --batch and --repeats must be positive")
    apply_device_and_threads(args)
    tokens = args.batch * args.length
    print(f"# Training step (fwd+bwd) eager vs compiled, preset {args.preset!r}, {args.device}, batch {args.batch} x "
          f"{args.length}, torch={torch.__version__}, threads={args.threads or torch.get_num_threads()}, median of "
          f"{args.repeats} alternating\n")
    print("| variant | parameters | compile s | eager tok/s | compiled tok/s | speedup | eager / swa | compiled / swa "
          "| loss dev | grad dev |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows, swa = [], None
    for variant in sorted(args.variants, key=lambda v: v != "swa"):  # swa first: the reference speed
        with tempfile.TemporaryDirectory() as cache:
            if not args.warm_cache:  # the variant's fresh process inherits it
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            r = isolated(args, compile_case, variant)
        swa = r["eager_s"] if variant == "swa" else swa
        rel = (lambda s: f"{swa / s:.2f}x") if swa else (lambda s: "-")
        print(f"| {variant} | {r['parameters']:,} | {r['compile_s']:.0f} | {tokens / r['eager_s']:,.0f} | "
              f"{tokens / r['compiled_s']:,.0f} | {r['eager_s'] / r['compiled_s']:.2f}x | {rel(r['eager_s'])} | "
              f"{rel(r['compiled_s'])} | {r['loss_deviation']:.1e} | {r['grad_deviation']:.1e} |", flush=True)
        rows.append(r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
