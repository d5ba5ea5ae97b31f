"""titans against the most used public implementation, titans-pytorch (lucidrains), on the workloads of issue 11.

    pip install -c <(echo torch==2.13.0) -e '.[bench]'        # titans-pytorch 0.5.5 (never a runtime dependency)
    python benchmarks/bench_peer.py                            # every workload, 3 alternating pairs, 1 thread each
    python benchmarks/bench_peer.py --quick                    # smoke run: small shapes, 1 pair (< 1 minute)
    python benchmarks/bench_peer.py --workloads layer_b4x1k model_step --repeats 5 --out runs/bench_peer

Every measurement runs in a fresh process (`--worker`) with one torch thread; for each workload the two
implementations alternate (ours, peer, ours, peer, ...) so that drift in the machine's load hits both, and the table
gives the median of our tokens/s over the peer's per pair, with the range over pairs. Within a process: one warm-up
call, then the median of --iters timed calls.

Workloads (the issue's shapes: dim 256, 4 heads x 64, memory MLP 64 -> 256 -> 64):
- layer_*: the memory layer alone, `NeuralMemory` vs `titans_pytorch.NeuralMemory`, forward + backward of sum(output)
  (forward only for layer_fwd_*), at the chunk size in the name (64 unless said). The peer takes every gradient of a
  chunk at the weights of the previous chunk boundary as we do (Eq. 16), but its momentum / decay run over chunks
  (one surprise per chunk), ours token by token inside the chunk: same cost class, not the same numbers.
- model_step: one AdamW step (forward, backward, update) of a MAC language model on 4 x 1,024 tokens, vocabulary 256,
  dim 256, 2 layers, segment 64, memory in every layer for both (the peer's default), 4 persistent tokens, plain
  residuals for the peer (num_residual_streams=1); our SwiGLU width is matched to the peer's parameter count. The
  peer's per-head initial memory weights are expanded views of one tensor, which AdamW's in-place update refuses
  (0.5.5), so they are made contiguous first (one copy per head: what per_head_learned_parameters means).
- decode: a 1,024-token prompt, then --new-tokens greedy tokens (ours: `TitansLM.generate`; peer: `sample` with its
  cache, min-p filtering as shipped). Prefill tok/s from one forward of the prompt; decode tok/s = new tokens / (time
  of the whole generation - that prefill time). decode_compiled: the same, ours with `generate(compile=True)`
  (`titans.decoding`; the warm-up call compiles), the peer as in decode.

Writes results.json (every run) and results.md (the table) to --out atomically; writes nothing else and deletes
nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIM, HEADS, HEAD_DIM, EXPANSION = 256, 4, 64, 4.0
WORKLOADS = {  # name: (kind, batch, length, chunk)
    "layer_b1x1k": ("layer", 1, 1024, 64),
    "layer_b4x1k": ("layer", 4, 1024, 64),
    "layer_b4x4k": ("layer", 4, 4096, 64),
    "layer_fwd_b1x16k": ("layer_fwd", 1, 16384, 64),
    "layer_b2x1k_chunk16": ("layer", 2, 1024, 16),
    "layer_b2x1k_chunk8": ("layer", 2, 1024, 8),
    "model_step": ("model_step", 4, 1024, 64),
    "decode": ("decode", 1, 1024, 64),
    "decode_compiled": ("decode", 1, 1024, 64),
}
QUICK = {"layer_b1x1k": ("layer", 1, 256, 64), "layer_b2x1k_chunk8": ("layer", 1, 256, 8),
         "model_step": ("model_step", 1, 256, 64), "decode": ("decode", 1, 128, 64)}


# ------------------------------------------------------------------------------------------------- one process
def _layer(impl: str, chunk: int):
    if impl == "ours":
        from titans.memory import NeuralMemory
        layer = NeuralMemory(DIM, memory_heads=HEADS, memory_depth=2, memory_expansion=EXPANSION, chunk_size=chunk)
        return layer, lambda x: layer(x)[0]
    from titans_pytorch import NeuralMemory
    layer = NeuralMemory(DIM, chunk_size=chunk, heads=HEADS, dim_head=HEAD_DIM,
                         default_model_kwargs=dict(depth=2, expansion_factor=EXPANSION))
    return layer, lambda x: layer(x)[0]


def _peer_mac(vocab: int, layers: int, segment: int):
    from titans_pytorch import MemoryAsContextTransformer
    model = MemoryAsContextTransformer(
        num_tokens=vocab, dim=DIM, depth=layers, segment_len=segment, num_persist_mem_tokens=4,
        num_longterm_mem_tokens=4, heads=HEADS, dim_head=HEAD_DIM, num_residual_streams=1,
        neural_memory_kwargs=dict(heads=HEADS, dim_head=HEAD_DIM,
                                  default_model_kwargs=dict(depth=2, expansion_factor=EXPANSION)))
    for parameter in model.parameters():  # its per-head memory weights are expanded views, which AdamW cannot update
        if 0 in parameter.stride() and parameter.numel() > 1:
            parameter.data = parameter.data.contiguous()
    return model


def _our_mac(vocab: int, layers: int, segment: int, params: int):
    from titans.model import TitansConfig, TitansLM, match_parameters
    config = TitansConfig(variant="mac", vocab_size=vocab, dim=DIM, layers=layers, heads=HEADS, segment_len=segment,
                          chunk_size=segment, memory_heads=HEADS, memory_expansion=EXPANSION, num_persistent=4)
    return TitansLM(match_parameters(config, params, tolerance=0.05))


def _timed(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(impl: str, workload: str, spec: tuple, iters: int, new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    kind, batch, length, chunk = spec
    result = {"impl": impl, "workload": workload}
    if kind in ("layer", "layer_fwd"):
        layer, run = _layer(impl, chunk)
        x = torch.randn(batch, length, DIM)
        if kind == "layer":
            def step():
                layer.zero_grad(set_to_none=True)
                run(x).sum().backward()
        else:
            def step():
                with torch.no_grad():
                    run(x)
        seconds = _timed(step, iters)
        result.update(tok_s=batch * length / seconds, seconds=seconds)
    elif kind == "model_step":
        vocab, layers = 256, 2
        peer = _peer_mac(vocab, layers, chunk)
        peer_params = sum(p.numel() for p in peer.parameters())
        model = peer if impl == "peer" else _our_mac(vocab, layers, chunk, peer_params)
        del peer
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, vocab, (batch, length + 1))

        def step():
            optimizer.zero_grad(set_to_none=True)
            if impl == "peer":
                loss = model(tokens, return_loss=True)
            else:
                logits, _ = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
        seconds = _timed(step, iters)
        result.update(tok_s=batch * length / seconds, seconds=seconds,
                      params=sum(p.numel() for p in model.parameters()))
    else:  # decode
        vocab, layers = 256, 2
        peer = _peer_mac(vocab, layers, chunk)
        model = (peer if impl == "peer" else
                 _our_mac(vocab, layers, chunk, sum(p.numel() for p in peer.parameters()))).eval()
        prompt = torch.randint(0, vocab, (1, length))
        with torch.inference_mode():
            prefill = _timed(lambda: model(prompt), iters)
            if impl == "ours":
                generate = lambda: model.generate(prompt, max_new_tokens=new_tokens,  # noqa: E731
                                                  compile=workload == "decode_compiled")
            else:
                generate = lambda: model.sample(prompt, length + new_tokens, use_cache=True,  # noqa: E731
                                                show_progress=False)
            total = _timed(generate, max(1, iters // 2))
        result.update(prefill_tok_s=length / prefill, tok_s=new_tokens / max(total - prefill, 1e-9),
                      seconds=total)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ------------------------------------------------------------------------------------------------- driver
def run_worker(impl: str, workload: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", impl, workload, "--iters", str(args.iters),
               "--new-tokens", str(args.new_tokens)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"impl": impl, "workload": workload, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(runs: list[dict], workloads: list[str]) -> str:
    lines = ["| workload | ours tok/s | peer tok/s | ours / peer (median, range) | ours / peer peak RSS MiB | pairs |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in workloads:
        ours = [r for r in runs if r["workload"] == name and r["impl"] == "ours" and "error" not in r]
        peer = [r for r in runs if r["workload"] == name and r["impl"] == "peer" and "error" not in r]
        if not ours or not peer:
            errors = [r["error"] for r in runs if r["workload"] == name and "error" in r]
            lines.append(f"| {name} | - | - | failed: {errors[:1]} | - | 0 |")
            continue
        ratios = [o["tok_s"] / p["tok_s"] for o, p in zip(ours, peer)]
        rss = f"{statistics.median(r['peak_rss_mib'] for r in ours):,.0f} / " \
              f"{statistics.median(r['peak_rss_mib'] for r in peer):,.0f}"
        lines.append(f"| {name} | {statistics.median(r['tok_s'] for r in ours):,.1f} | "
                     f"{statistics.median(r['tok_s'] for r in peer):,.1f} | {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | {rss} | {len(ratios)} |")
        if name == "decode":
            lines.append(f"| decode: prefill | {statistics.median(r['prefill_tok_s'] for r in ours):,.1f} | "
                         f"{statistics.median(r['prefill_tok_s'] for r in peer):,.1f} | | | |")
        if name == "model_step":
            lines.append(f"| model_step: parameters | {ours[0]['params']:,} | {peer[0]['params']:,} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=None, help=f"default: all of {list(WORKLOADS)}")
    p.add_argument("--repeats", type=int, default=3, help="alternating (ours, peer) pairs per workload")
    p.add_argument("--iters", type=int, default=5, help="timed calls per process (median)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="small shapes, 1 pair, 2 iterations")
    p.add_argument("--out", type=Path, default=Path("runs/bench_peer"))
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    table = QUICK if args.quick else WORKLOADS
    if args.worker:
        impl, workload = args.worker
        print(json.dumps(measure(impl, workload, table[workload], args.iters, args.new_tokens)))
        return 0
    try:
        import titans_pytorch  # noqa: F401
    except ImportError:
        print("bench_peer.py: error: titans-pytorch is not installed; run pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if args.quick:
        args.repeats, args.iters, args.new_tokens = 1, 2, 4
    workloads = args.workloads or list(table)
    unknown = [w for w in workloads if w not in table]
    if unknown:
        print(f"bench_peer.py: error: unknown workload {unknown[0]!r}; choose from {list(table)}", file=sys.stderr)
        return 2
    from titans.fileio import atomic_write

    runs, started = [], time.perf_counter()
    for name in workloads:
        for _ in range(args.repeats):
            for impl in ("ours", "peer"):
                run = run_worker(impl, name, args)
                runs.append(run)
                print(json.dumps(run), flush=True)
    table_md = markdown(runs, workloads)
    args.out.mkdir(parents=True, exist_ok=True)
    import titans_pytorch
    import torch
    header = {"benchmark": "bench_peer", "peer": f"titans-pytorch {titans_pytorch.__version__}"
              if hasattr(titans_pytorch, "__version__") else "titans-pytorch",
              "torch": torch.__version__, "machine": platform.platform(), "processor": platform.processor(),
              "repeats": args.repeats, "iters": args.iters, "quick": args.quick,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    atomic_write(args.out / "results.json", (json.dumps({**header, "runs": runs}, indent=1) + "\n").encode())
    atomic_write(args.out / "results.md", table_md.encode())
    print("\n" + table_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
