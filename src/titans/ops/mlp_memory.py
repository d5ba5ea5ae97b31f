"""The memory model M of Titans (paper Section 3.1, "Memory architecture"): an MLP with L_M >= 1 layers.

    f(W, x) = W_L s( ... s(W_2 s(W_1 x)) ... )          (plus x when `residual`)

L_M = 1 is a linear map, i.e. online linear regression. Weights are per batch x head: layer l is a tensor of
shape (BH, d_out, d_in), no biases. `MLPMemory` is a pure-function description (no parameters of its own), so the
same object serves the fast chunked op, the naive reference and torch.func.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .activations import Activation, get_activation

Params = dict[str, Tensor]


@dataclass(frozen=True)
class MLPMemory:
    """Shape and nonlinearity of the memory MLP: dim -> hidden -> ... -> hidden -> dim."""

    dim: int
    depth: int = 2
    hidden: int | None = None  # default: 2 * dim, as TitansConfig.memory_expansion
    activation: str = "silu"
    residual: bool = False

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"memory depth must be >= 1, got {self.depth}")
        if self.dim < 1 or (self.hidden is not None and self.hidden < 1):
            raise ValueError(f"memory dims must be positive, got dim={self.dim}, hidden={self.hidden}")
        get_activation(self.activation)  # validate the name early

    @property
    def act(self) -> Activation:
        return get_activation(self.activation)

    @property
    def names(self) -> list[str]:
        return [f"w{i}" for i in range(self.depth)]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of each layer."""
        hidden = self.hidden if self.hidden is not None else 2 * self.dim
        sizes = [self.dim] + [hidden] * (self.depth - 1) + [self.dim]
        return {name: (sizes[i + 1], sizes[i]) for i, name in enumerate(self.names)}

    def init_params(self, batch: int, *, generator: torch.Generator | None = None, dtype=torch.float32,
                    device=None) -> Params:
        """Random weights with a leading batch axis, scaled so f(W, x) keeps the size of x: std 1 / sqrt(d_in), times
        the activation's gain for the layers an activation follows (so a deep memory's hidden layers neither vanish
        nor need a training signal to stay alive)."""
        gain = self.act.gain
        params = {}
        for i, (name, (d_out, d_in)) in enumerate(self.shapes().items()):
            w = torch.randn(batch, d_out, d_in, generator=generator, dtype=dtype, device=device)
            params[name] = w * ((gain if i < self.depth - 1 else 1.0) / d_in**0.5)
        return params

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """f(W, x) for x of shape (BH, N, dim) (or (N, dim) with unbatched params, as under vmap)."""
        h = x
        for i, name in enumerate(self.names):
            h = h @ params[name].transpose(-1, -2)
            if i < self.depth - 1:
                h = self.act.fn(h)
        return x + h if self.residual else h
