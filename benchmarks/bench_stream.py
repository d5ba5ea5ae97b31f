"""Constant state over very long streams: tokens/s and peak resident memory while a model reads millions of tokens.

    python benchmarks/bench_stream.py                                 # small mac, 2,097,152 tokens, pieces of 4,096
    python benchmarks/bench_stream.py --variant lmm --tokens 262144 --marks 65536 262144
    python benchmarks/bench_stream.py --quick                         # tiny preset, 16K tokens (seconds)

The model reads random tokens in pieces of --piece tokens under torch.inference_mode, carrying its `TitansState`
(memory weights, attention caches) from piece to piece, one torch thread. At each mark it reports the tokens read,
tokens/s over the last stretch and overall, the process's peak resident set so far (getrusage) and the state's size:
a recurrent model's memory must not grow with the stream. Writes the table as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from titans.fileio import atomic_write
from titans.model import TitansLM, preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mac")
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=2_097_152)
    p.add_argument("--piece", type=int, default=4096)
    p.add_argument("--marks", type=int, nargs="+", default=[65_536, 262_144, 1_048_576, 2_097_152])
    p.add_argument("--quick", action="store_true", help="tiny preset, 16,384 tokens, marks at 4K and 16K")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.tokens, args.piece, args.marks = "tiny", 16_384, 1024, [4096, 16_384]
    marks = sorted(m for m in args.marks if m <= args.tokens)
    if not marks or any(m % args.piece for m in marks):
        print(f"bench_stream.py: error: marks must be multiples of --piece ({args.piece}) and <= --tokens",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TitansLM(preset(args.preset, args.variant)).eval()
    generator = torch.Generator().manual_seed(0)
    rows, state, read, started = [], None, 0, time.perf_counter()
    last_read, last_time = 0, started
    print(f"# {args.variant} ({args.preset}), {args.tokens:,} tokens in pieces of {args.piece:,}, 1 thread")
    print("| tokens | tok/s (stretch) | tok/s (overall) | peak RSS MiB | state MiB |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for mark in marks:
            while read < mark:
                tokens = torch.randint(0, model.config.vocab_size, (1, args.piece), generator=generator)
                _, state = model(tokens, state)
                read += args.piece
            now = time.perf_counter()
            row = {"tokens": read, "tok_s_stretch": (read - last_read) / (now - last_time),
                   "tok_s_overall": read / (now - started),
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "state_mib": state.nbytes / 2**20}
            rows.append(row)
            last_read, last_time = read, now
            print(f"| {read:,} | {row['tok_s_stretch']:,.0f} | {row['tok_s_overall']:,.0f} | "
                  f"{row['peak_rss_mib']:,.0f} | {row['state_mib']:.2f} |", flush=True)
    if args.json:
        result = {"variant": args.variant, "preset": args.preset, "piece": args.piece, "torch": torch.__version__,
                  "rows": rows}
        atomic_write(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
