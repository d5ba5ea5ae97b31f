"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from titans.config import OptimConfig

__all__ = ["WarmupCosine", "build_optimizer", "build_scheduler", "param_groups"]

def _is_no_decay_module(module: nn.Module) -> bool:
    """Embeddings and normalisation layers (any class with "Norm" in its name, custom ones included)."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or "Norm" in type(module).__name__


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (matrices) and an undecayed group.

    No decay for: biases, 1-D parameters, parameters of embeddings and norm layers (a weight tied
    between an embedding and an output layer counts as an embedding), and parameters marked with
    ``param.no_weight_decay = True`` (persistent tokens, the memory's M_0, DeltaNet's decay parameters). Empty
    groups are dropped.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        module_no_decay = _is_no_decay_module(module)
        for name, p in module.named_parameters(recurse=False):
            if module_no_decay or p.ndim < 2 or name.endswith("bias") or getattr(p, "no_weight_decay", False):
                no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    devices = {"cuda", "cpu", "mps", "xpu"}
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (see :func:`param_groups`), fused when every
    parameter is a floating-point tensor on a device with a fused kernel, else PyTorch's default
    (multi-tensor on GPUs)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
        fused=_fused_supported(params),
    )


class WarmupCosine:
    """Learning-rate multiplier: linear warmup to 1 over ``warmup_steps``, then a half cosine from 1
    to ``min_lr_ratio`` at ``total_steps``, constant afterwards.

    A plain object rather than a closure so that ``LambdaLR.state_dict()`` saves its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule (call ``scheduler.step()`` after each ``optimizer.step()``):
    the lr of step ``s`` (0-based) is ``cfg.lr * WarmupCosine(...)(s)``."""
    schedule = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
