"""Fast decoding: every layer's state in fixed shapes, and one compiled graph that reads a token.

`TitansLM.step` costs O(1) per token, but in eager PyTorch a token of a small model is hundreds of small ops (about
600 for a 2-layer MAC, 7-10 us each), while a prompt shares each op across all its tokens. A compiled graph fuses
them, but `step`'s states grow by a token per call (the memory's partial chunk, a KV cache), so each call would be a
new graph. Here every mixer turns its state into fixed shapes (`decode_state`: the memory's partial chunk in buffers
of chunk_size rows, attention caches as rings of window slots, or of `capacity` slots for full attention, MAC's
segment in segment_len slots, TTT's mini-batch in as many rows) and reads a token on it (`decode_step`), positions
being tensors: one graph, compiled once by inductor (with its C++ wrapper, which cuts the per-kernel cost of calling
them from Python), serves a whole generation. Its results equal `step`'s up to rounding; `state_from_decode` gives
the `step` state back, so a generation can return or continue its state. benchmarks/NOTES.md has the measurements.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .state import map_tensors

if TYPE_CHECKING:
    from .model import TitansLM, TitansState


def _standard_strides(t: Tensor) -> Tensor:
    """t with the strides of a fresh contiguous tensor (a copy only where they differ, e.g. a convolution tail that is a
    view of a longer buffer): the compiled graph's inputs then keep the same strides from token to token, and one
    graph serves them all (torch.compile specialises on strides)."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.insert(0, step)
        step *= size
    return t if list(t.stride()) == strides else t.clone(memory_format=torch.contiguous_format)


def _own_code(method: Callable) -> Callable:
    """`method` with a code object of its own. torch.compile keeps its graphs per code object, at most
    `torch._dynamo.config.recompile_limit` (8) of them, and each model needs its own (the graph reads its
    parameters): decoders of more models than that in one process would otherwise share one code object and fail."""
    fn = method.__func__
    return types.MethodType(types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                               fn.__closure__), method.__self__)


@dataclass
class DecodeState:
    """A `TitansState` in fixed shapes: each mixer's `decode_state`, the tokens read and the most it may hold."""

    layers: list
    position: int
    capacity: int


def capacity_for(tokens: int) -> int:
    """The capacity `generate` gives a decode state of `tokens` tokens: the next power of two (at least 256), so that
    generations of similar lengths share one compiled graph (full attention's cache size is part of its shape)."""
    return max(256, 1 << (tokens - 1).bit_length())


class Decoder:
    """Reads one token per call on a `DecodeState`, compiled (`compile=True`) or eager (same values up to rounding;
    for testing). The first compiled call of a model takes about a minute on CPU; every later one reuses it while the
    batch size, dtype and capacity stay the same."""

    def __init__(self, model: "TitansLM", compile: bool = True):
        self.model = model
        # fullgraph: a graph break would fall back to eager silently, as slow as `step` or slower
        self._token = torch.compile(_own_code(self._read_token), fullgraph=True, dynamic=False,
                                    options={"cpp_wrapper": True}) if compile else self._read_token

    def _read_token(self, tokens: Tensor, layers: list) -> tuple[Tensor, list]:
        """`TitansLM.step` on decode states; not `_blocks`, whose Python-int position would be a new graph per token."""
        model, new_layers = self.model, []
        x = model.embed(tokens)
        for block, layer in zip(model.blocks, layers):
            x, layer = block(x, layer, "decode_step")
            new_layers.append(map_tensors(layer, _standard_strides, keep_shared=False))
        return model.head(model.norm(x)), new_layers

    def begin(self, state: "TitansState", capacity: int) -> DecodeState:
        """`state` (after at least one token, from this model) in fixed shapes, with room for `capacity` tokens."""
        if state.position == 0 or any(layer is None for layer in state.layers):
            raise ValueError("fixed-shape decoding continues a state that has read at least one token")
        self.model._check_state(state, None)
        layers = [block.mixer.decode_state(layer, capacity) for block, layer in zip(self.model.blocks, state.layers)]
        seen: set[int] = set()

        def own(t: Tensor) -> Tensor:  # every tensor once (torch.compile specialises on aliasing) in standard strides
            t = t.clone() if id(t) in seen else t
            seen.add(id(t))
            return _standard_strides(t)

        return DecodeState(map_tensors(layers, own, keep_shared=False), state.position, capacity)

    def step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Logits (B, 1, vocab_size) of tokens (B, 1) and the state after them. The attention caches of `state` are
        written in place: continue from the returned state only."""
        if state.position >= state.capacity:
            raise ValueError(f"the decode state is full ({state.capacity} tokens): begin again with a larger capacity")
        logits, layers = self._token(tokens, state.layers)
        return logits, DecodeState(layers, state.position + 1, state.capacity)

    def end(self, state: DecodeState) -> "TitansState":
        """The `TitansState` (as `TitansLM.step` makes it) equal to `state`."""
        layers = [block.mixer.state_from_decode(layer) for block, layer in zip(self.model.blocks, state.layers)]
        return self.model._state(layers, state.position)
