"""Element-wise activations of the memory MLP, each paired with its derivative.

The chunked memory op back-propagates the inner loss by hand (so the whole chunk's gradients come out of a few
batched matrix products), which needs s'(a) next to s(a). Derivatives are written in closed form so the outer
training loop can differentiate through them again.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor


class Activation(NamedTuple):
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    gain: float  # g with E[s(g a)^2] = 1 for a ~ N(0, 1) (tanh: torch's 5/3): keeps activations' size per layer


def _silu_derivative(a: Tensor) -> Tensor:
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _gelu_derivative(a: Tensor) -> Tensor:  # exact (erf) GELU
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return cdf + a * pdf


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(torch.nn.functional.silu, _silu_derivative, 1.5588),
    "gelu": Activation(torch.nn.functional.gelu, _gelu_derivative, 1.4680),
    "tanh": Activation(torch.tanh, lambda a: 1 - torch.tanh(a) ** 2, 5 / 3),
    "relu": Activation(torch.relu, lambda a: (a > 0).to(a.dtype), math.sqrt(2)),
    "identity": Activation(lambda a: a, torch.ones_like, 1.0),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown memory activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
