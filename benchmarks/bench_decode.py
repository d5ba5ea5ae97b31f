"""Prefill and decode speed of every TitansLM variant: tokens/s of reading a prompt and of generating after it.

    python benchmarks/bench_decode.py                                  # small preset, 1,024-token prompt, 1 thread
    python benchmarks/bench_decode.py --ref /tmp/ref --repeats 3       # against another checkout, alternating runs
    python benchmarks/bench_decode.py --variants mac --set dim=256 layers=2 chunk_size=64 memory_heads=4 \
        memory_expansion=4.0 ffn_hidden=1160      # issue 11's workload: bench_peer.py's MAC (3.37M parameters)
    python benchmarks/bench_decode.py --compile --variants lmm mac   # also the compiled fixed-shape decoder

Prefill: one call of the model on a (1, --prompt-len) prompt of random tokens. Decode: `TitansLM.generate` of
--new-tokens greedy tokens continuing the state after the prompt (the prompt's last token is fed through generate,
so every timed call reads one token). Both under torch.inference_mode, after a warm-up, the median of --repeats; the
ratio decode / prefill is what issue 11 asks to be >= 0.25. Every measurement runs in a fresh process; with --ref, a
process on the checkout at --ref (its src/ first on PYTHONPATH) alternates with one on this checkout, and the table adds
the reference's decode tok/s, the speed-up, and whether both generated the same greedy tokens. With --compile, each
pass also decodes with `generate(compile=True)` (`titans.decoding`, compiled in the warm-up pass: "compile s" is that
pass's whole time), and the table adds its tok/s, its ratio to prefill and whether its greedy tokens equal eager
decoding's. Writes the medians and every run as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def measure(args: argparse.Namespace, variant: str) -> dict:
    """Median prefill and decode tok/s of one variant, in this process, and the greedy tokens it generated."""
    import torch

    from titans.model import TitansLM, preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TitansLM(preset(args.preset, variant, **overrides(args.set))).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    prefill, decode, compiled, compile_s, same = [], [], [], None, True
    with torch.inference_mode():
        for i in range(args.repeats + 1):  # the first pass warms up (and compiles)
            start = time.perf_counter()
            _, state = model(prompt[:, :-1])
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            tokens = model.generate(prompt[:, -1:], args.new_tokens, state=state)
            decode_s = time.perf_counter() - start
            if args.compile:
                start = time.perf_counter()
                same &= torch.equal(model.generate(prompt[:, -1:], args.new_tokens, state=state, compile=True), tokens)
                compiled_s = time.perf_counter() - start
                if i:
                    compiled.append(args.new_tokens / compiled_s)
                else:
                    compile_s = compiled_s
            if i:
                prefill.append((args.prompt_len - 1) / prefill_s)
                decode.append(args.new_tokens / decode_s)
    out = {"prefill": statistics.median(prefill), "decode": statistics.median(decode), "tokens": tokens[0, 1:].tolist()}
    if args.compile:
        out |= {"compiled": statistics.median(compiled), "compile_s": compile_s, "compiled_same_tokens": same}
    return out


def overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE ... as TitansConfig fields (values read as YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def run_worker(args: argparse.Namespace, src: Path, variant: str) -> dict:
    """`measure` in a fresh process importing titans from `src`."""
    command = [sys.executable, __file__, "--worker", "--variants", variant, "--preset", args.preset,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--set", *args.set] + \
        (["--compile"] if args.compile else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    from titans.model import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model size (titans.model.PRESETS)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TitansConfig fields over the preset")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per process (median)")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes per variant (and per checkout)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="also decode with generate(compile=True) (titans.decoding), after the eager decode")
    parser.add_argument("--ref", type=Path, help="a checkout to compare with (e.g. git worktree add /tmp/ref HEAD~1)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_decode.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args, args.variants[0])))
        return 0

    checkouts = {"this": SRC} | ({"ref": args.ref.resolve() / "src"} if args.ref else {})
    runs: dict[str, dict[str, list[dict]]] = {v: {name: [] for name in checkouts} for v in args.variants}
    for _ in range(args.runs):
        for variant in args.variants:
            for name, src in checkouts.items():  # alternating: this, ref, this, ref, ...
                runs[variant][name].append(run_worker(args, src, variant))

    def med(variant: str, name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant][name])

    header = f"{'variant':<16}{'prefill tok/s':>14}{'decode tok/s':>14}{'decode/prefill':>16}"
    header += f"{'ref decode':>12}{'speed-up':>10}{'same tokens':>13}" if args.ref else ""
    header += f"{'compiled':>10}{'compiled/prefill':>18}{'compile s':>11}{'same tokens':>13}" if args.compile else ""
    shape = args.preset + (" with " + " ".join(args.set) if args.set else "")
    print(f"preset {shape}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} thread(s), "
          f"median of {args.repeats} x {args.runs} run(s)")
    print(header)
    summary = {}
    for variant in args.variants:
        prefill, decode = med(variant, "this", "prefill"), med(variant, "this", "decode")
        summary[variant] = {"prefill_tok_s": prefill, "decode_tok_s": decode, "ratio": decode / prefill}
        line = f"{variant:<16}{prefill:>14.0f}{decode:>14.0f}{decode / prefill:>16.3f}"
        if args.ref:
            ref = med(variant, "ref", "decode")
            same = all(r["tokens"] == runs[variant]["ref"][0]["tokens"] for r in runs[variant]["this"])
            summary[variant] |= {"ref_prefill_tok_s": med(variant, "ref", "prefill"), "ref_decode_tok_s": ref,
                                 "same_tokens": same}
            line += f"{ref:>12.0f}{decode / ref:>9.1f}x{'yes' if same else 'NO':>13}"
        if args.compile:
            fast = med(variant, "this", "compiled")
            same = all(r["compiled_same_tokens"] for r in runs[variant]["this"])
            summary[variant] |= {"compiled_decode_tok_s": fast, "compiled_ratio": fast / prefill,
                                 "compile_s": med(variant, "this", "compile_s"), "compiled_same_tokens": same}
            line += f"{fast:>10.0f}{fast / prefill:>18.3f}{med(variant, 'this', 'compile_s'):>11.0f}"
            line += f"{'yes' if same else 'NO':>13}"
        print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items() if k != "worker"},
                                     "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
