"""Multi-process training under ``torchrun``: process-group setup and small collective helpers.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything is a single-process no-op, so
the trainer calls the same functions either way.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_mean", "barrier", "cleanup", "init_distributed", "is_main_process"]


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


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


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
    chosen = _pick_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if _active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all processes, as a new tensor (a copy when not distributed)."""
    result = tensor.detach().clone()
    if _active():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= dist.get_world_size()
    return result


def cleanup() -> None:
    """Leave the process group (no-op when not distributed). Delete DistributedDataParallel wrappers first: a DDP
    reducer that outlives its gloo process group can abort the process at exit."""
    if _active():
        gc.collect()  # DDP reducers sit in reference cycles: free the dropped ones while their group still exists
        dist.destroy_process_group()
