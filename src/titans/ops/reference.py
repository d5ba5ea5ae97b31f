"""Naive reference of the memory op: a Python loop over tokens with autograd, written straight from the paper's
equations (Section 3.1, Eqs. 10-16). Slow; it exists to check the fast path (tests) and the speed-up (benchmarks)."""

from __future__ import annotations

import torch
from torch import Tensor

from .memory_scan import MemoryFn, Params
from .mlp_memory import MLPMemory


def _layer_inputs(memory_fn: MemoryFn, weights: Params, key: Tensor) -> list[Tensor]:
    """The inputs of each layer of an MLPMemory at `weights` for a key (BH, d): the key, then the hidden activations.
    Just the key for any other memory function."""
    if not isinstance(memory_fn, MLPMemory):
        return [key]
    inputs = [key]
    for name in memory_fn.names[:-1]:
        inputs.append(memory_fn.act.fn(torch.einsum("boi,bi->bo", weights[name], inputs[-1])))
    return inputs


def memory_scan_reference(memory_fn: MemoryFn, params: Params, keys: Tensor, values: Tensor, queries: Tensor,
                          lr: Tensor, momentum: Tensor | None, decay: Tensor | None,
                          chunk_size: int, max_grad_norm: float | None = None,
                          normalize_chunk_lr: bool = False) -> tuple[Tensor, Params, Params]:
    """Token-by-token memory_scan from the initial weights. Returns (retrieved, final weights, final momentum).
    Differentiable: the inner gradients come from torch.func.grad, which composes with the outer autograd."""
    def inner_loss(weights: Params, k: Tensor, v: Tensor) -> Tensor:  # Eq. 12, summed over the independent BH rows
        return ((memory_fn(weights, k) - v) ** 2).sum()

    W = dict(params)
    S = {k: torch.zeros_like(v) for k, v in params.items()}
    outputs = []
    for t in range(keys.shape[1]):
        if t % chunk_size == 0:
            W_chunk = dict(W)  # Eq. 16: every token of the chunk takes its gradient at the chunk-start weights
        grads = torch.func.grad(inner_loss)(W_chunk, keys[:, t:t + 1], values[:, t:t + 1])
        theta = lr[:, t]
        if normalize_chunk_lr:  # theta_t / max over layers of sum_{i <= t in the chunk} |cos(z_i, z_t)|, at least 1
            start = t - t % chunk_size
            layer_inputs = [_layer_inputs(memory_fn, W_chunk, keys[:, i]) for i in range(start, t + 1)]
            overlap = torch.stack([
                sum(torch.nn.functional.cosine_similarity(z_i[layer], layer_inputs[-1][layer], dim=-1, eps=1e-12).abs()
                    for z_i in layer_inputs)
                for layer in range(len(layer_inputs[-1]))]).amax(0)
            theta = theta / overlap.clamp(min=1)
        if max_grad_norm is not None:  # per-token clipping of the whole surprise gradient
            norm = sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt()
            grads = {n: g * (max_grad_norm / norm).clamp(max=1).reshape(-1, *(1,) * (g.dim() - 1))
                     for n, g in grads.items()}
        for name in W:
            shape = (-1,) + (1,) * (W[name].dim() - 1)
            eta = 0.0 if momentum is None else momentum[:, t].reshape(shape)
            keep = 1.0 if decay is None else (1 - decay[:, t]).reshape(shape)
            S[name] = eta * S[name] - theta.reshape(shape) * grads[name]  # Eq. 14
            W[name] = keep * W[name] + S[name]  # Eq. 13
        outputs.append(memory_fn(W, queries[:, t:t + 1]))  # Eq. 15: token t reads W_t
    return torch.cat(outputs, dim=1), W, S
