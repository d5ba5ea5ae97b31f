"""Speed and memory of every TitansLM variant at one preset (equal parameter counts), training and streaming.

    python benchmarks/bench_models.py                                 # CPU or CUDA, whichever is available
    python benchmarks/bench_models.py --threads 1 --variants mac lmm transformer --lengths 1024 --stream-length 4096

Table 1, training: forward + cross-entropy + backward over a (batch, T) batch of random tokens; tokens/s from the median
of --repeats timed steps after one warm-up step, and peak memory measured as in bench_memory.py (CUDA allocator peak,
or the growth of the resident set size of a fresh process on CPU).

Table 2, streaming inference: one sequence of --stream-length tokens fed in pieces of --piece tokens under
torch.no_grad(), each piece continuing the state the previous one returned; tokens/s from the median of --repeats
passes after a warm-up pass, and the bytes of tensor data in the state after 1/16, 1/4 and all of the sequence. Every
variant's state is constant in size except the full-attention `transformer`'s KV cache, which grows with the sequence.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import Tensor

from bench_memory import PeakMemory, apply_device_and_threads, isolated, median_seconds
from titans.model import VARIANTS, TitansLM, TitansState, count_parameters, preset


def state_bytes(state: object) -> int:
    """Bytes of tensor data in a (nested) streaming state: dataclasses, lists, tuples and dicts are walked."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if dataclasses.is_dataclass(state):
        return sum(state_bytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(item) for item in state)
    if isinstance(state, dict):
        return sum(state_bytes(item) for item in state.values())
    return 0


def _model(args: argparse.Namespace, variant: str) -> tuple[TitansLM, torch.device]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    return TitansLM(preset(args.preset, variant)).to(device), device


def train_case(args: argparse.Namespace, variant: str, length: int) -> tuple[float, float]:
    """(tokens/s, peak MiB) of one training step (forward, next-token loss, backward) on (batch, length) tokens."""
    model, device = _model(args, variant)
    tokens = torch.randint(model.config.vocab_size, (args.batch, length + 1), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    peak = PeakMemory(device)
    seconds = median_seconds(step, device, args.repeats)
    return args.batch * length / seconds, peak.growth_mib()


def stream_case(args: argparse.Namespace, variant: str) -> tuple[float, dict[int, int]]:
    """(tokens/s, {tokens seen: state bytes}) of streaming --stream-length tokens in pieces of --piece tokens."""
    model, device = _model(args, variant)
    tokens = torch.randint(model.config.vocab_size, (args.batch, args.stream_length), device=device)
    sizes: dict[int, int] = {}
    report_at = {args.stream_length // 16, args.stream_length // 4, args.stream_length}

    @torch.no_grad()
    def stream() -> None:
        state: TitansState | None = None
        for start in range(0, args.stream_length, args.piece):
            _, state = model(tokens[:, start:start + args.piece], state)
            if state.position in report_at:
                sizes[state.position] = state_bytes(state)

    seconds = median_seconds(stream, device, args.repeats)
    return args.batch * args.stream_length / seconds, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model size (titans.model.PRESETS)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="training sequence lengths T")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--stream-length", type=int, default=16384, help="tokens streamed in table 2")
    parser.add_argument("--piece", type=int, default=256, help="tokens per streaming call")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if min(args.lengths + [args.batch, args.piece, args.repeats]) < 1:
        parser.error("--lengths, --batch, --piece and --repeats must be positive")
    if args.stream_length < 16 * args.piece or args.stream_length % (16 * args.piece):
        parser.error(f"--stream-length must be a positive multiple of 16 * --piece ({16 * args.piece}), so that the "
                     f"state is measured after 1/16 and 1/4 of it")
    apply_device_and_threads(args)

    mib = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"# Training step (fwd+bwd), preset {args.preset!r}, {args.device}, float32, batch {args.batch}, "
          f"torch={torch.__version__} threads={torch.get_num_threads()}, median of {args.repeats} after 1 warm-up\n")
    _row("variant", "parameters", *(f"T={t} {col}" for t in args.lengths for col in ("tokens/s", mib)))
    _row("---", *["---:"] * (1 + 2 * len(args.lengths)))
    for variant in args.variants:
        cells = []
        for length in args.lengths:
            speed, peak = isolated(args, train_case, variant, length)
            cells += [f"{speed:,.0f}", f"{peak:.1f}"]
        _row(variant, f"{count_parameters(preset(args.preset, variant)):,}", *cells)

    checkpoints = [args.stream_length // 16, args.stream_length // 4, args.stream_length]
    print(f"\n# Streaming inference (no grad), {args.stream_length} tokens in pieces of {args.piece}, batch "
          f"{args.batch}, state carried between pieces; median of {args.repeats} passes after 1 warm-up\n")
    _row("variant", "tokens/s", *(f"state bytes after {n}" for n in checkpoints))
    _row("---", *["---:"] * (1 + len(checkpoints)))
    for variant in args.variants:
        speed, sizes = isolated(args, stream_case, variant)
        _row(variant, f"{speed:,.0f}", *(f"{sizes[n]:,}" for n in checkpoints))


def _row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
