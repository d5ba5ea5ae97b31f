"""Where and how a process computes: its device, autocast precision, seeding, and (under ``torchrun``) its process
group and the collectives over it.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) the process-group functions are single-process no-ops,
so the trainer calls the same functions either way.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_gather_cat", "all_reduce_sum", "autocast_for", "barrier", "choose_device", "cleanup",
           "init_distributed", "is_distributed", "seed_everything"]


def choose_device(device: str, local_rank: int | None = None) -> torch.device:
    """``device``: "auto" (CUDA when available), "cpu" or "cuda". On CUDA, ``local_rank`` picks the GPU
    (``cuda:local_rank``, modulo the number of GPUs); None: plain ``cuda``, the current GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank % torch.cuda.device_count())


def autocast_for(device: torch.device, precision: str) -> tuple[Callable[[], contextlib.AbstractContextManager],
                                                                 str]:
    """An autocast context factory for ``precision`` on ``device`` and the precision actually used: fp16 needs
    CUDA; bf16 needs a CPU or a GPU that supports it. Otherwise fp32, with a warning."""
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("fp16 autocast needs CUDA; training in fp32", stacklevel=2)
        precision = "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU does not support bf16; training in fp32", stacklevel=2)
        precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.

    ``device``: "auto" (CUDA if available), "cpu" or "cuda". Uses NCCL on CUDA and gloo on CPU;
    each process gets ``cuda:LOCAL_RANK``. A single process (no torchrun) initialises nothing.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    chosen = choose_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes, as a new tensor (``tensor`` itself when not
    distributed)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (the same shape on each) concatenated along the first dimension in rank order
    (``tensor`` itself when not distributed)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def cleanup() -> None:
    """Leave the process group (no-op when not distributed). Delete DistributedDataParallel wrappers first: a DDP
    reducer that outlives its gloo process group can abort the process at exit."""
    if is_distributed():
        gc.collect()  # DDP reducers sit in reference cycles: free the dropped ones while their group still exists
        dist.destroy_process_group()
