"""Throughput and peak memory of full vs sliding-window causal attention (titans.attention).

    python benchmarks/bench_attention.py                      # CPU or CUDA, whichever is available
    python benchmarks/bench_attention.py --backward --persistent 4 --lengths 1024 4096

Peak memory is torch.cuda.max_memory_allocated on CUDA. On CPU each measurement runs in a fresh process and the
figure is the growth of its peak resident set size (resource.getrusage) during the timed runs (Linux: KiB units).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch

from titans.attention import CausalSelfAttention


def measure(args: argparse.Namespace, window: int | None, length: int) -> tuple[float, float]:
    """(tokens per second, peak memory in MiB) of one forward (and backward) pass over `length` tokens."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    module = CausalSelfAttention(args.dim, args.heads, window=window, num_persistent=args.persistent)
    module = module.to(device, dtype)
    x = torch.randn(args.batch, length, args.dim, device=device, dtype=dtype, requires_grad=args.backward)

    def step() -> None:
        with torch.set_grad_enabled(args.backward):
            y, _ = module(x)
            if args.backward:
                y.float().square().mean().backward()

    step()  # warm-up (kernel selection, rotary cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeats
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return args.batch * length / seconds, peak / 2**20


def _measure_in_child(queue: multiprocessing.Queue, args: argparse.Namespace, window: int | None, length: int) -> None:
    queue.put(measure(args, window, length))


def measure_isolated(args: argparse.Namespace, window: int | None, length: int) -> tuple[float, float]:
    """On CPU, measure in a fresh process so that one configuration's peak memory does not hide the next's."""
    if args.device != "cpu":
        return measure(args, window, length)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure_in_child, args=(queue, args, window, length))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--window", type=int, default=512, help="sliding-window size")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--persistent", type=int, default=0, help="number of persistent-memory tokens")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)

    pass_name = "forward+backward" if args.backward else "forward"
    print(
        f"# {pass_name} on {args.device} ({args.dtype}): dim={args.dim} heads={args.heads} batch={args.batch} "
        f"persistent={args.persistent} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(f"| {'attention':<16} | {'T':>6} | {'tokens/s':>11} | {'peak MiB':>9} |")
    print(f"|{'-' * 18}|{'-' * 8}|{'-' * 13}|{'-' * 11}|")
    for length in args.lengths:
        for name, window in (("full", None), (f"sliding W={args.window}", args.window)):
            tokens_per_second, peak_mib = measure_isolated(args, window, length)
            print(f"| {name:<16} | {length:>6} | {tokens_per_second:>11,.0f} | {peak_mib:>9.1f} |", flush=True)


if __name__ == "__main__":
    main()
