"""Throughput and peak memory of the NeuralMemory layer, and the speed-up of the chunked memory op over its naive loop.

    python benchmarks/bench_memory.py                                    # CPU or CUDA, whichever is available
    python benchmarks/bench_memory.py --threads 1 --lengths 1024 4096 --naive-lengths 256

Table 1: `titans.NeuralMemory` forward (no grad) and forward+backward over one sequence of T tokens; tokens/s from the
median of --repeats timed passes after one warm-up pass. Table 2: `memory_scan` (chunked dual form, Eqs. 16-18) vs
`memory_scan_reference` (Python loop over tokens, autograd per token) on identical inputs, forward only, timed side by
side, with the largest difference of their outputs as a check that both computed the same thing.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the first pass. On CPU, each
configuration runs in a fresh process, and the figure is the growth of its peak resident set size (Linux VmHWM, reset
through /proc/self/clear_refs once the model and inputs exist) over the resident size at that moment.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch

from titans.memory import NeuralMemory
from titans.ops import MLPMemory, memory_scan, memory_scan_reference

MiB = 2**20


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


class PeakMemory:
    """Peak memory above the level at construction: CUDA allocator statistics, or the process's resident set size."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            self.baseline = _rss_kib("VmRSS") * 1024

    def growth_mib(self) -> float:
        peak = torch.cuda.max_memory_allocated() if self.cuda else _rss_kib("VmHWM") * 1024
        return (peak - self.baseline) / MiB


def median_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `repeats` calls of step, after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_case(args: argparse.Namespace, length: int, backward: bool) -> tuple[float, float]:
    """(tokens/s, peak MiB) of NeuralMemory over (1, length, dim) inputs."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    layer = NeuralMemory(args.dim, args.heads, memory_depth=args.depth, chunk_size=args.chunk_size,
                         checkpoint_chunks=args.checkpoint_chunks).to(device)
    x = torch.randn(1, length, args.dim, device=device, requires_grad=backward)

    def step() -> None:
        with torch.set_grad_enabled(backward):
            y, _ = layer(x)
            if backward:
                layer.zero_grad(set_to_none=True)
                y.square().mean().backward()

    peak = PeakMemory(device)
    seconds = median_seconds(step, device, args.repeats)
    return length / seconds, peak.growth_mib()


def op_case(args: argparse.Namespace, length: int) -> tuple[float, float, float]:
    """(fast seconds, naive seconds, max |fast - naive|) of the memory op on one set of inputs (layer-like gates)."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    head_dim, bh = args.dim // args.heads, args.heads
    memory = MLPMemory(dim=head_dim, depth=args.depth, hidden=2 * head_dim)  # the layer's memory_expansion=2
    params = {k: v.to(device) for k, v in memory.init_params(bh, generator=generator).items()}
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(device)  # noqa: E731
    keys, queries = (torch.nn.functional.normalize(rand(bh, length, head_dim) - 0.5, dim=-1) for _ in range(2))
    values = rand(bh, length, head_dim) - 0.5
    lr, momentum, decay = 0.1 * rand(bh, length), 0.9 * rand(bh, length), 0.01 * rand(bh, length)
    inputs = (memory, params, keys, values, queries, lr, momentum, decay, args.chunk_size)
    outputs = {}

    def run(name: str, op: Callable) -> None:
        outputs[name] = op(*inputs, max_grad_norm=1.0)[0]

    fast = median_seconds(lambda: run("fast", memory_scan), device, args.repeats)
    naive = median_seconds(lambda: run("naive", memory_scan_reference), device, args.naive_repeats)
    return fast, naive, (outputs["fast"] - outputs["naive"]).abs().max().item()


def _call_with_threads(threads: int, fn: Callable, *fn_args):
    if threads:
        torch.set_num_threads(threads)
    return fn(*fn_args)


def isolated(args: argparse.Namespace, fn: Callable, *fn_args):
    """fn(args, *fn_args); on CPU in a fresh process, so one configuration's memory does not hide the next's."""
    if args.device == "cuda":
        return fn(args, *fn_args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call_with_threads, args.threads, fn, args, *fn_args).result()


def apply_device_and_threads(args: argparse.Namespace) -> None:
    """Resolve --device auto and apply --threads (0: torch's default)."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="T for table 1")
    parser.add_argument("--naive-lengths", type=int, nargs="+", default=[256, 1024], help="T for table 2")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2, help="memory_depth L_M")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--checkpoint-chunks", type=lambda s: s if s == "auto" else int(s), default="auto",
                        help="activation checkpointing in groups of this many memory chunks (0: off; auto, the "
                             "layer's default: chosen from the chunk size, see benchmarks/bench_checkpointing.py)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of the layer and of the fast op")
    parser.add_argument("--naive-repeats", type=int, default=2, help="timed passes of the naive op")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.dim % args.heads or min(args.dim, args.heads, args.depth, args.chunk_size, args.repeats) < 1:
        parser.error("need positive --dim, --heads, --depth, --chunk-size, --repeats with --dim divisible by --heads")
    apply_device_and_threads(args)

    mib = "peak CUDA MiB above baseline" if args.device == "cuda" else "peak RSS growth MiB (fresh process)"
    print(f"# NeuralMemory on {args.device}, float32, batch 1: dim={args.dim} heads={args.heads} depth={args.depth} "
          f"checkpoint_chunks={args.checkpoint_chunks} "
          f"chunk_size={args.chunk_size} torch={torch.__version__} threads={torch.get_num_threads()}, "
          f"median of {args.repeats} after 1 warm-up\n")
    _row("T", "fwd tokens/s", f"fwd {mib}", "fwd+bwd tokens/s", f"fwd+bwd {mib}")
    _row(*["---:"] * 5)
    for length in args.lengths:
        fwd, fwd_mib = isolated(args, layer_case, length, False)
        bwd, bwd_mib = isolated(args, layer_case, length, True)
        _row(length, f"{fwd:,.0f}", f"{fwd_mib:.1f}", f"{bwd:,.0f}", f"{bwd_mib:.1f}")

    print(f"\n# memory_scan (fast) vs memory_scan_reference (naive), forward, BH={args.heads}, "
          f"head_dim={args.dim // args.heads}; fast median of {args.repeats}, naive median of {args.naive_repeats}\n")
    _row("T", "fast ms", "naive ms", "speed-up naive/fast", "max abs diff")
    _row(*["---:"] * 5)
    for length in args.naive_lengths:
        fast, naive, diff = isolated(args, op_case, length)
        _row(length, f"{fast * 1e3:.2f}", f"{naive * 1e3:.1f}", f"{naive / fast:.0f}x", f"{diff:.1e}")


def _row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
