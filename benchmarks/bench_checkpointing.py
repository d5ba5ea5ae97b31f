"""Peak memory and speed of the NeuralMemory layer's forward+backward by chunk size and activation checkpointing.

    python benchmarks/bench_checkpointing.py                         # the issue-11 shape, B2 x 1K, 1 thread
    python benchmarks/bench_checkpointing.py --malloc glibc mmap128k   # without jemalloc (apt libjemalloc2)
    python benchmarks/bench_checkpointing.py --chunks 64 8 1 --groups 0 auto 16 32 --rounds 2 --json runs/ckpt.json

The layer: `NeuralMemory(dim=256, memory_heads=4, memory_depth=2, memory_expansion=4)` (4 heads x 64, memory MLP
64 -> 256 -> 64), inputs (B, T, 256) with B=2, T=1024 by default; one pass is forward + backward of y.square().mean().
For every chunk size x `checkpoint_chunks` value (0: off, `auto`: the op's rule, n: groups of n chunks) a fresh
process builds the layer and inputs, resets the peak resident set size (VmHWM, through /proc/self/clear_refs), runs
one warm-up pass and --repeats timed ones: the figures are the growth of the peak RSS over the resident size before
the first pass (the memory one training step needs on top of the model and its inputs) and tokens/s from the median
pass. --rounds repeats every configuration in alternating order (the machine is shared): the table gives the median
tokens/s and the largest peak over the rounds, and the ratio of the peak to chunk 64's with checkpointing off.
--malloc runs each configuration under each allocator setting (see MALLOC): glibc as it comes, and jemalloc with
freed pages returned at once, which gives the live tensors' peak. Findings and figures: benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import PeakMemory, median_seconds  # noqa: E402

from titans.memory import NeuralMemory  # noqa: E402
from titans.ops.memory_scan import auto_checkpoint_chunks  # noqa: E402


def parse_group(text: str) -> int | str:
    return text if text == "auto" else int(text)


def measure(settings: dict, chunk: int, group: int | str) -> dict:
    """One configuration in this (fresh) process: tokens/s and peak RSS growth (MiB) of forward+backward."""
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    b, t = settings["batch"], settings["length"]
    layer = NeuralMemory(settings["dim"], settings["heads"], memory_depth=settings["depth"],
                         memory_expansion=settings["expansion"], chunk_size=chunk, checkpoint_chunks=group)
    x = torch.randn(b, t, settings["dim"], requires_grad=True)

    def step() -> None:
        y, _ = layer(x)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y.square().mean().backward()

    peak = PeakMemory(torch.device("cpu"))
    seconds = median_seconds(step, torch.device("cpu"), settings["repeats"])
    n_chunks = -(-t // chunk)
    chosen = auto_checkpoint_chunks(chunk, n_chunks) if group == "auto" else group
    return {"chunk": chunk, "checkpoint_chunks": group, "group": chosen, "n_chunks": n_chunks,
            "tokens_per_s": b * t / seconds, "peak_mib": peak.growth_mib()}


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2
MALLOC = {"glibc": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"},
          "jemalloc": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}}
"""glibc: the C library's allocator as it comes. Before glibc 2.38, PyTorch's 64-byte-aligned posix_memalign blocks
freed into the heap are rarely reused (glibc bug 14581), so once the dynamic mmap threshold has risen (to the largest
mapped block freed so far) the heap grows by almost every weight-sized temporary: the peak RSS counts them all.
mmap128k: glibc with its mmap threshold fixed at its default 128 KiB (setting it turns the dynamic threshold off), so
every tensor of 128 KiB or more is mapped on its own and unmapped on free (smaller ones still fragment the heap).
jemalloc: jemalloc preloaded, freed pages returned at once: the closest of the three to the live tensors' peak."""


def isolated(settings: dict, chunk: int, group: int | str, malloc: str) -> dict:
    saved = dict(os.environ)
    os.environ.update(MALLOC[malloc])  # read by the C library when the fresh process starts
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return {**pool.submit(measure, settings, chunk, group).result(), "malloc": malloc}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 16, 8, 1])
    parser.add_argument("--groups", type=parse_group, nargs="+", default=[0, "auto"],
                        help="checkpoint_chunks values: 0 (off), auto, or a group size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--expansion", type=float, default=4.0, help="memory_expansion (hidden = head_dim x this)")
    parser.add_argument("--malloc", nargs="+", choices=list(MALLOC), default=["glibc", "jemalloc"],
                        help="allocator settings, each configuration in a fresh process per setting (see MALLOC)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per configuration, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("runs/bench_checkpointing.json"))
    args = parser.parse_args()
    if "jemalloc" in args.malloc and not Path(JEMALLOC).exists():
        parser.error(f"--malloc jemalloc needs {JEMALLOC} (apt-get install libjemalloc2)")
    settings = {k: v for k, v in vars(args).items() if k not in ("chunks", "groups", "rounds", "json", "malloc")}
    configs = []
    for chunk in args.chunks:
        for group in args.groups:
            n_chunks = -(-args.length // chunk)
            if isinstance(group, int) and group >= n_chunks and group > 1:
                continue  # one group holding every chunk: recomputation with nothing saved
            configs.append((chunk, group))
    runs = []
    for round_ in range(args.rounds):
        for chunk, group in (configs if round_ % 2 == 0 else configs[::-1]):
            for malloc in args.malloc:
                run = isolated(settings, chunk, group, malloc)
                runs.append(run)
                print(f"# round {round_}: chunk {chunk} checkpoint_chunks {group} {malloc}: "
                      f"{run['tokens_per_s']:,.0f} tok/s, peak {run['peak_mib']:,.0f} MiB", file=sys.stderr, flush=True)

    rows = []
    for chunk, group in configs:
        row = {"chunk": chunk, "checkpoint_chunks": group}
        for malloc in args.malloc:
            mine = [r for r in runs if (r["chunk"], r["checkpoint_chunks"], r["malloc"]) == (chunk, group, malloc)]
            row.update(group=mine[0]["group"], n_chunks=mine[0]["n_chunks"])
            row[malloc] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                           "tokens_per_s_range": [min(r["tokens_per_s"] for r in mine),
                                                  max(r["tokens_per_s"] for r in mine)],
                           "peak_mib": max(r["peak_mib"] for r in mine)}
        rows.append(row)
    base = {m: next((r[m]["peak_mib"] for r in rows if r["chunk"] == 64 and r["checkpoint_chunks"] == 0), None)
            for m in args.malloc}
    print(f"# NeuralMemory fwd+bwd, B{args.batch} x T{args.length}, dim {args.dim}, {args.heads} heads, memory MLP "
          f"depth {args.depth} x{args.expansion:g}, float32, CPU, {args.threads} thread(s), torch {torch.__version__}; "
          f"median of {args.repeats} pass(es) after 1 warm-up, {args.rounds} round(s) of fresh processes; peak: RSS "
          f"growth in MiB (x: ratio to chunk 64 with checkpointing off)\n")
    head = ["chunk", "checkpoint_chunks", "group"]
    for m in args.malloc:
        head += [f"tokens/s {m}", f"peak {m}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for r in rows:
        cells = [r["chunk"], r["checkpoint_chunks"], r["group"]]
        for m in args.malloc:
            ratio = f" ({r[m]['peak_mib'] / base[m]:.2f}x)" if base[m] else ""
            lo, hi = r[m]["tokens_per_s_range"]
            spread = f" ({lo:,.0f}-{hi:,.0f})" if args.rounds > 1 else ""
            cells += [f"{r[m]['tokens_per_s']:,.0f}{spread}", f"{r[m]['peak_mib']:,.0f}{ratio}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": {**settings, "rounds": args.rounds, "malloc": args.malloc,
                                                  "torch": torch.__version__},
                                     "rows": rows, "runs": runs}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
