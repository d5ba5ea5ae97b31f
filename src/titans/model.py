"""`TitansModel`, the backbone: input layer -> N pre-norm blocks (a sequence mixer, then SwiGLU) -> norm, on any
(B, T, features) input; `TitansLM`: the backbone with a token embedding as its input layer and an LM head.

`config.variant` picks the mixer: the Titans architectures `mac`, `mag`, `mal`, `lmm` (paper Section 4) and the
baselines `transformer`, `swa`, `deltanet`, `gated_deltanet`, `ttt`, all through the same blocks, streaming state and
training code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionState, CausalSelfAttention
from .decoding import Decoder, capacity_for
from .deltanet import DeltaNet, DeltaNetState
from .memory import NeuralMemory, NeuralMemoryState
from .mixers import AttentionMixer, GateMixerState, MACMixer, MACState, MAGMixer, MALMixer, MALState, MemoryMixer
from .ttt import TTT, TTTState

Variant = Literal["mac", "mag", "mal", "lmm", "transformer", "swa", "deltanet", "gated_deltanet", "ttt"]
VARIANTS: tuple[str, ...] = Variant.__args__
TITANS_VARIANTS = ("mac", "mag", "mal", "lmm")


@dataclass
class TitansConfig:
    """Shape of a TitansLM. Every field is a YAML key under `model:`, and the layer argument it feeds has the same
    name and default (`NeuralMemory(memory_conv=...)`).

    `window` is only the attention span of `swa`, `mag` and `mal` (position t sees t - window + 1 .. t);
    `segment_len` is only MAC's segment (Section 4.1). Neither is how many tokens a call or a streamed piece holds:
    feeding a sequence in pieces (`eval.chunk_len`, `train.tbptt_segments`) never changes the result.
    """

    variant: Variant = "mac"
    vocab_size: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn_hidden: int | None = None  # SwiGLU width; default: 8/3 * dim rounded up to a multiple of 16
    tie_embeddings: bool = False  # tied heads start from small embeddings (std 0.02), untied from std 1
    # attention
    window: int = 64  # attention span of `swa`, `mag`, `mal` (nothing else)
    segment_len: int = 64  # MAC's segment (nothing else)
    num_persistent: int = 4  # persistent memory tokens (Section 3.3); 0 disables them
    rope: bool = True
    # neural memory (Section 3.1)
    memory_depth: int = 2  # L_M; 1 is a linear memory
    memory_expansion: float = 2.0  # hidden width of the memory MLP: memory_expansion * head_dim
    memory_heads: int | None = None  # default: heads
    chunk_size: int = 16  # tokens per memory mini-batch step (Eq. 16)
    momentum: bool = True
    forgetting: bool = True
    memory_conv: bool = True
    memory_activation: str = "silu"
    # the memory's step size theta, momentum eta and forgetting alpha (data-dependent gates, Section 3.1)
    max_lr: float = 0.25  # theta <= max_lr (0.5, a full delta-rule overwrite, made MAC spike: docs/memory.md)
    init_lr: float = 0.125  # theta at initialisation
    init_momentum: float = 0.1  # eta at initialisation (0.5 doubles the effective step: a deep memory diverged)
    init_decay: float = 5e-5  # alpha at initialisation (depth-4 memories decayed to 0 over 100K tokens at 1e-4)
    normalize_chunk_lr: bool = True  # theta_j / (overlap of k_j with its chunk's earlier keys): stable at any chunk
    max_grad_norm: float | None = 100.0  # per-token surprise clipping (not in the paper): a divergence guard; null: off
    learn_initial_memory: bool = True  # M_0 (zero last layer) learned by the outer loop, or fixed
    attention_trains_memory: bool = False  # MAL: the attention's gradient reaches the memory output it reads
    # MAL: its attention reads x~ + g * M(x~), g a learned per-channel weight starting here; 1.0 is the paper's series
    # form from the first step, which held MAL on a unigram plateau in language modelling (docs/memory.md)
    series_gate_init: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        for name in ("vocab_size", "dim", "layers", "heads", "window", "segment_len", "memory_depth", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.num_persistent < 0:
            raise ValueError(f"num_persistent must be >= 0, got {self.num_persistent}")
        if not (math.isfinite(self.max_lr) and 0 < self.init_lr < self.max_lr):
            raise ValueError(f"need 0 < init_lr < max_lr, got init_lr={self.init_lr}, max_lr={self.max_lr}; "
                             "change model.init_lr or model.max_lr")
        for name in ("init_momentum", "init_decay"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}; change model.{name}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}; "
                             "change model.max_grad_norm")
        if not math.isfinite(self.series_gate_init):
            raise ValueError(f"series_gate_init must be finite, got {self.series_gate_init}; "
                             "change model.series_gate_init")
        if self.memory_expansion <= 0:
            raise ValueError(f"memory_expansion must be > 0, got {self.memory_expansion}")
        if self.memory_heads is not None and self.memory_heads < 1:
            raise ValueError(f"memory_heads must be >= 1 or null, got {self.memory_heads}")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"ffn_hidden must be >= 1 or null, got {self.ffn_hidden}; change model.ffn_hidden")

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else -(-(8 * self.dim // 3) // 16) * 16

    def replace(self, **changes) -> "TitansConfig":
        return dataclasses.replace(self, **changes)


# Named sizes. Those with a parameter target are matched per variant (SwiGLU width) so that every variant and
# baseline of one size has the same parameter count within 5%; 170m and 340m are the paper's shapes (Section 5.1).
PRESETS: dict[str, tuple[dict, int | None]] = {
    "tiny": (dict(dim=32, layers=2, heads=2, window=16, segment_len=16, chunk_size=8, num_persistent=2), None),
    "small": (dict(dim=128, layers=4, heads=4, window=64, segment_len=64, chunk_size=16), 1_500_000),
    "170m": (dict(vocab_size=32000, dim=768, layers=12, heads=12, window=512, segment_len=512, chunk_size=64,
                  num_persistent=16, tie_embeddings=True), 170_000_000),
    "340m": (dict(vocab_size=32000, dim=1024, layers=24, heads=16, window=512, segment_len=512, chunk_size=64,
                  num_persistent=16, tie_embeddings=True), 340_000_000),
}


def preset(name: str, variant: str = "mac", **overrides) -> TitansConfig:
    """A named size for a variant; sizes with a parameter target are matched to it (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    shape, target = PRESETS[name]
    config = TitansConfig(variant=variant, **{**shape, **overrides})
    return config if target is None or "ffn_hidden" in overrides else match_parameters(config, target)


def _memory(config: TitansConfig) -> NeuralMemory:
    return NeuralMemory(
        config.dim, memory_heads=config.memory_heads or config.heads, memory_depth=config.memory_depth,
        memory_expansion=config.memory_expansion, chunk_size=config.chunk_size,
        memory_activation=config.memory_activation, momentum=config.momentum, forgetting=config.forgetting,
        memory_conv=config.memory_conv, max_lr=config.max_lr, init_lr=config.init_lr,
        init_momentum=config.init_momentum, init_decay=config.init_decay, normalize_chunk_lr=config.normalize_chunk_lr,
        max_grad_norm=config.max_grad_norm, learn_initial_memory=config.learn_initial_memory)


def build_mixer(config: TitansConfig) -> nn.Module:
    c = config

    def attention(window: int | None, persistent: int) -> CausalSelfAttention:
        return CausalSelfAttention(c.dim, c.heads, window=window, num_persistent=persistent, rope=c.rope)

    if c.variant == "transformer":
        return AttentionMixer(attention(None, 0))
    if c.variant == "swa":
        return AttentionMixer(attention(c.window, 0))
    if c.variant == "lmm":
        return MemoryMixer(_memory(c), c.num_persistent)
    if c.variant in ("deltanet", "gated_deltanet"):  # the (gated) delta rule as published, exact chunked form
        return DeltaNet(c.dim, heads=c.memory_heads or c.heads, gated=c.variant == "gated_deltanet",
                        chunk_size=c.chunk_size, conv_kernel=4 if c.memory_conv else 0)
    if c.variant == "ttt":  # TTT-Linear (memory_depth 1) or TTT-MLP, mini-batch = chunk; Mamba-backbone short conv
        return TTT(c.dim, heads=c.memory_heads or c.heads, inner="linear" if c.memory_depth == 1 else "mlp",
                   chunk_size=c.chunk_size, conv_kernel=4 if c.memory_conv else 0)
    if c.variant == "mag":
        return MAGMixer(attention(c.window, c.num_persistent), _memory(c))
    if c.variant == "mal":
        return MALMixer(attention(c.window, 0), _memory(c), c.num_persistent,
                        attention_trains_memory=c.attention_trains_memory, series_gate_init=c.series_gate_init)
    return MACMixer(c.dim, c.heads, c.segment_len, _memory(c), c.num_persistent, rope=c.rope)


@dataclass
class TitansState:
    """Streaming state of a TitansModel or TitansLM: one state per block (None: nothing seen yet) and the number of
    positions seen, marked with the variant and width of the model that made it."""

    layers: list = field(default_factory=list)
    position: int = 0
    variant: str | None = None
    dim: int | None = None

    def detach(self) -> "TitansState":
        """The same state cut from the autograd graph (every tensor of every layer)."""
        from .state import map_tensors

        return TitansState(map_tensors(list(self.layers), lambda t: t.detach()), self.position, self.variant,
                           self.dim)

    def to(self, target: torch.device | str | torch.dtype) -> "TitansState":
        """The state on another device (every tensor) or in another floating dtype (floating tensors only)."""
        from .state import map_tensors

        if isinstance(target, torch.dtype):
            if not target.is_floating_point:
                raise ValueError(f"a state converts to a floating dtype, got {target}")
            convert = lambda t: t.to(target) if t.is_floating_point() else t  # noqa: E731
        else:
            convert = lambda t: t.to(torch.device(target))  # noqa: E731
        return TitansState(map_tensors(list(self.layers), convert), self.position, self.variant, self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (a tensor shared by two parts counted once)."""
        from .state import tensors

        return sum(t.numel() * t.element_size() for t in tensors(self.layers))

    def save(self, path) -> None:
        """Write the state to `path` (safetensors; the structure as JSON in its metadata), atomically."""
        from .state import save_state

        save_state(self, path)

    @classmethod
    def load(cls, path, model: "TitansLM") -> "TitansState":
        """A state saved by `save`, on `model`'s device; a one-line ValueError when `model` did not make it."""
        from .state import load_state

        return load_state(path, model)


# The state type each mixer makes, and the variants that make it (named when a state of another variant is passed).
_STATE_TYPES = {AttentionMixer: AttentionState, MemoryMixer: NeuralMemoryState, MAGMixer: GateMixerState,
                MALMixer: MALState, MACMixer: MACState, DeltaNet: DeltaNetState, TTT: TTTState}
_MADE_BY = {AttentionState: "transformer or swa", NeuralMemoryState: "lmm", GateMixerState: "mag", MALState: "mal",
            MACState: "mac", DeltaNetState: "deltanet or gated_deltanet", TTTState: "ttt"}


def _memory_shapes(memory: NeuralMemory, weights: dict, label: str):
    if sorted(weights) != sorted(memory.initial_weights):
        yield f"{label} weights {sorted(weights)}, this model's {sorted(memory.initial_weights)}", None, None, 1
        return
    for name, w in memory.initial_weights.items():
        yield f"{label} weight {name}", weights[name], (None, *w.shape[1:]), memory.heads


def _attention_shapes(attention: CausalSelfAttention, state: AttentionState, label: str = "attention"):
    yield f"{label} keys", state.keys, (None, attention.heads, None, attention.head_dim), 1
    yield f"{label} values", state.values, (None, attention.heads, None, attention.head_dim), 1


def _state_shapes(mixer: nn.Module, state):
    """(what, tensor, expected shape with None for any size, rows per batch element) for each tensor of a layer
    state whose shape the mixer fixes; the batch dimension comes first. (what, None, None, 1) when the state's parts
    themselves differ."""
    if isinstance(mixer, AttentionMixer):
        yield from _attention_shapes(mixer.attention, state)
    elif isinstance(mixer, MemoryMixer):
        yield from _memory_shapes(mixer.memory, state.memory.weights, "memory")
    elif isinstance(mixer, (MAGMixer, MALMixer)):
        yield from _attention_shapes(mixer.attention, state.attention)
        yield from _memory_shapes(mixer.memory, state.memory.memory.weights, "memory")
        if isinstance(mixer, MALMixer) and (mixer.persistent is None) != (state.prefix is None):
            yield (f"persistent prefix {'present' if state.prefix is not None else 'absent'}, this model's "
                   f"{'absent' if mixer.persistent is None else 'present'}"), None, None, 1
        elif isinstance(mixer, MALMixer) and state.prefix is not None:
            yield "persistent prefix", state.prefix, (None, *mixer.persistent.shape), 1
    elif isinstance(mixer, MACMixer):
        yield from _memory_shapes(mixer.memory, state.memory.memory.weights, "memory")
        yield from _memory_shapes(mixer.memory, state.segment_memory.weights, "segment memory")
        for name in ("keys", "values"):
            yield f"segment {name}", getattr(state, name), (None, mixer.heads, 2, None, mixer.head_dim), 1
    elif isinstance(mixer, DeltaNet):
        yield "fast weights S", state.S, (None, mixer.heads, mixer.head_v_dim, mixer.head_dim), 1
    elif isinstance(mixer, TTT):
        if sorted(state.inner.weights) != sorted(mixer.param_names):
            names = f"inner weights {sorted(state.inner.weights)}, this model's {sorted(mixer.param_names)}"
            yield names, None, None, 1
            return
        for name in mixer.param_names:
            shape = (None, *getattr(mixer, name).shape[1:])
            yield f"inner weight {name}", state.inner.weights[name], shape, mixer.heads


class SwiGLU(nn.Module):
    """Feed-forward: W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + SwiGLU(norm(x))."""

    def __init__(self, dim: int, mixer: nn.Module, ffn_hidden: int):
        super().__init__()
        self.mixer_norm, self.mixer = nn.RMSNorm(dim), mixer
        self.ffn_norm, self.ffn = nn.RMSNorm(dim), SwiGLU(dim, ffn_hidden)

    def forward(self, x: Tensor, state=None, mix: str = "forward"):
        """mix: how the mixer reads x: "forward", or one token (B, 1, dim) continuing `state` by its decoding "step"
        or by its fixed-shape "decode_step" (`titans.decoding`)."""
        y, state = (self.mixer if mix == "forward" else getattr(self.mixer, mix))(self.mixer_norm(x), state)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


class TitansModel(nn.Module):
    """The sequence backbone: inputs (B, T, in_features) -> hidden states (B, T, dim) through an input layer, the
    blocks and a final norm, with the streaming state of every variant. Continuous inputs (time series, signals) enter
    through a linear projection; `TitansLM` is this backbone with a token embedding as its input layer and an LM head.
    """

    def __init__(self, config: TitansConfig, in_features: int | nn.Module):
        """in_features: the width of a continuous input (a linear input layer), or the input layer itself."""
        super().__init__()
        if isinstance(in_features, int) and in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.config = config
        self.embed = nn.Linear(in_features, config.dim) if isinstance(in_features, int) else in_features
        self.blocks = nn.ModuleList(Block(config.dim, build_mixer(config), config.ffn_width)
                                    for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.dim)

    def forward(self, inputs: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        """inputs (B, T, in_features) -> hidden states (B, T, dim) and the state after them; position t depends on
        inputs 0..t only, and feeding a sequence in pieces with the carried state gives the same hidden states."""
        return self._hidden(inputs, state)

    def step(self, inputs: Tensor, state: TitansState | None) -> tuple[Tensor, TitansState]:
        """`forward` of one position per sequence (B, 1, ...) by every mixer's single-token path (decoding)."""
        return self._hidden_step(inputs, state)

    def _check_inputs(self, inputs: Tensor) -> None:
        width = self.embed.in_features
        if inputs.dim() != 3 or not inputs.is_floating_point() or inputs.shape[-1] != width:
            raise ValueError(f"inputs must be a floating tensor of shape (batch, time, {width}), got "
                             f"{tuple(inputs.shape)} {inputs.dtype}")
        if inputs.shape[0] == 0:
            raise ValueError(f"inputs hold no sequence (batch 0, shape {tuple(inputs.shape)}): give at least one")

    def _hidden(self, inputs: Tensor, state: TitansState | None) -> tuple[Tensor, TitansState]:
        self._check_inputs(inputs)
        if state is not None and not torch.compiler.is_compiling():  # not traced (training passes its own states)
            self._check_state(state, inputs.shape[0])
        if inputs.shape[1] == 0:  # nothing to read or store (the mixers' convolutions need a token)
            return self.norm(self.embed(inputs)), (state if state is not None
                                                   else self._state([None] * len(self.blocks), 0))
        return self._blocks(inputs, state, "forward")

    def _hidden_step(self, inputs: Tensor, state: TitansState | None) -> tuple[Tensor, TitansState]:
        """Without a state (or before any token) this is `_hidden`; `state` must be one this model returned (it is
        not checked tensor by tensor)."""
        if state is None or state.position == 0 or any(layer is None for layer in state.layers):
            return self._hidden(inputs, state)
        if inputs.dim() < 2 or inputs.shape[1] != 1:
            raise ValueError(f"step reads one position per sequence, inputs (batch, 1, ...); got "
                             f"{tuple(inputs.shape)}")
        if (state.variant, state.dim) != (self.config.variant, self.config.dim):
            self._check_state(state, inputs.shape[0])  # raises its one-line error
        return self._blocks(inputs, state, "step")

    def _blocks(self, inputs: Tensor, state: TitansState | None, mix: str) -> tuple[Tensor, TitansState]:
        layer_states = [None] * len(self.blocks) if state is None else state.layers
        x = self.embed(inputs)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states):
            x, layer_state = block(x, layer_state, mix)
            new_states.append(layer_state)
        position = (0 if state is None else state.position) + inputs.shape[1]
        return self.norm(x), self._state(new_states, position)

    def _state(self, layers: list, position: int) -> TitansState:
        return TitansState(layers, position, self.config.variant, self.config.dim)

    def _check_state(self, state: TitansState, batch: int | None) -> None:
        """A one-line ValueError unless ``state`` was made by a model like this one (variant, width, layers and the
        shapes of its tensors) for ``batch`` sequences (None: any batch, the same in every tensor)."""
        c = self.config
        this = f"this model is variant {c.variant}, width {c.dim}"
        if not isinstance(state, TitansState):
            raise ValueError(f"the state must be a TitansState returned by a TitansModel or TitansLM, got "
                             f"{type(state).__name__}")
        made = (f"variant {state.variant}, width {state.dim}" if state.variant is not None and state.dim is not None
                else "")
        if made and (state.variant, state.dim) != (c.variant, c.dim):
            raise ValueError(f"the state was made by a different model ({made}); {this}")

        def different(why: str) -> ValueError:
            return ValueError(f"the state was made by a different model ({made + ': ' if made else ''}{why}); {this}")

        if not isinstance(state.layers, (list, tuple)) or len(state.layers) != len(self.blocks):
            n = len(state.layers) if isinstance(state.layers, (list, tuple)) else type(state.layers).__name__
            raise different(f"its state holds {n} layers but the model has {len(self.blocks)}")
        for i, (block, layer) in enumerate(zip(self.blocks, state.layers)):
            if layer is None:
                continue
            expected = _STATE_TYPES[type(block.mixer)]
            if type(layer) is not expected:
                by = _MADE_BY.get(type(layer))
                raise different(f"layer {i} holds a state of type {type(layer).__name__}"
                                f"{f' (variant {by})' if by else ''}, not {expected.__name__}")
            for what, tensor, shape, rows in _state_shapes(block.mixer, layer):
                if shape is None:  # the names differ, or a part only one of them has: `what` says which
                    raise different(f"layer {i} {what}")
                got = tuple(tensor.shape)
                if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)) \
                        or got[0] % rows:
                    want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
                    raise different(f"layer {i} {what} has shape {got}, expected {want}")
                if batch is None:
                    batch = got[0] // rows
                if got[0] // rows != batch:
                    raise ValueError(f"the state was built for batch {got[0] // rows}, got batch {batch}: a state "
                                     "carries on only the batch it was built for")

    def set_activation_checkpointing(self, chunks: int) -> None:
        """Recompute the memory in groups of `chunks` chunks in the backward pass instead of storing its
        intermediates (0 or False: off; True: every chunk)."""
        for module in self.modules():
            if isinstance(module, NeuralMemory):
                module.checkpoint_chunks = int(chunks)

    def set_compile_chunks(self, compile_chunks: bool) -> None:
        """Run every memory layer's chunk step (and TTT's mini-batch step) through torch.compile
        (`NeuralMemory(compile_chunks=...)`, `TTT(compile_chunks=...)`)."""
        for module in self.modules():
            if isinstance(module, (NeuralMemory, TTT)):
                module.compile_chunks = bool(compile_chunks)


class TitansLM(TitansModel):
    """Token embedding -> the backbone (`TitansModel`) -> LM head. Its parameters keep the names `embed`, `blocks`,
    `norm`, `head` (checkpoints and Hugging Face exports of every version load unchanged)."""

    def __init__(self, config: TitansConfig):
        super().__init__(config, nn.Embedding(config.vocab_size, config.dim))
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Untied: unit-scale embeddings, the scale of the normalised activations they feed (with std 0.02 the blocks'
        # default-initialised projections swamp them, and MQAR stays at chance for thousands of steps). Tied: the
        # embedding is also the output layer, so it starts small (GPT-2's 0.02) to keep the first logits small.
        nn.init.normal_(self.embed.weight, std=0.02 if config.tie_embeddings else 1.0)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        """tokens (B, T) int64 -> logits (B, T, vocab_size) and the state after them. T = 0 returns empty logits
        and the state unchanged; a state must come from this model (same variant and shapes) and batch size."""
        hidden, state = self._hidden(tokens, state)
        return self.head(hidden), state

    def step(self, tokens: Tensor, state: TitansState | None) -> tuple[Tensor, TitansState]:
        """`forward` of one token per sequence, tokens (B, 1), for decoding: every mixer takes its single-token path
        (no chunk machinery). `state` must be one this model returned (it is not checked tensor by tensor); without
        one (or before any token) this is `forward`."""
        hidden, state = self._hidden_step(tokens, state)
        return self.head(hidden), state

    def decoder(self) -> Decoder:
        """This model's compiled fixed-shape `Decoder`, built on first use and kept (its compiled graph with it)."""
        if getattr(self, "_decoder", None) is None:
            self._decoder = Decoder(self)
        return self._decoder

    def _check_inputs(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, time), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        if tokens.shape[0] == 0:
            raise ValueError(f"tokens hold no sequence (batch 0, shape {tuple(tokens.shape)}): give at least one")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")

    @torch.inference_mode()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 state: TitansState | None = None, generator: torch.Generator | None = None,
                 return_state: bool = False, compile: bool = False) -> Tensor | tuple[Tensor, TitansState]:
        """Continue `prompt` (B, T) by `max_new_tokens` tokens from a streaming state: greedy when temperature is 0,
        otherwise sampled from softmax(logits / temperature), restricted to the top_k most likely when given. With
        return_state: also the state after the prompt and every generated token. The prompt is read in one call, each
        new token by `step`, or with compile=True by one compiled fixed-shape graph (`titans.decoding`: several times
        faster per token, after a one-off compilation of about a minute on CPU)."""
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        if prompt.dim() == 2 and prompt.shape[1] == 0 and max_new_tokens > 0:
            raise ValueError("the prompt is empty: generation continues at least one token")
        decoder = self.decoder() if compile and max_new_tokens > 0 else None
        logits, state = self(prompt, state)
        step = self.step
        if decoder is not None:
            state = decoder.begin(state, capacity_for(state.position + max_new_tokens))
            step = decoder.step
        out = []
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature <= 0:
                token = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    kth = last.topk(min(top_k, last.shape[-1]), dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, -torch.inf)
                token = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)
            out.append(token)
            logits, state = step(token, state)
        if decoder is not None:
            state = decoder.end(state)
        tokens = torch.cat([prompt] + out, dim=1)
        return (tokens, state) if return_state else tokens


def stream(model: Callable, tokens: Tensor, piece_len: int, state: TitansState | None = None,
           autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
           ) -> Iterator[tuple[slice, Tensor, TitansState]]:
    """Feed tokens (B, T) to `model` (a TitansLM, or it compiled) `piece_len` tokens at a time, carrying the state
    from `state`: yields (positions, logits, state) per piece, `positions` the piece's slice of T. The logits are
    those of one call on all of T; only one piece's activations exist at a time. `autocast` wraps each call."""
    if piece_len < 1:
        raise ValueError(f"piece_len must be >= 1, got {piece_len}")
    for start in range(0, tokens.shape[1], piece_len):
        positions = slice(start, start + piece_len)
        with autocast():
            logits, state = model(tokens[:, positions], state)
        yield positions, logits, state


def count_parameters(config_or_model: TitansConfig | nn.Module, by_component: bool = False):
    """Trainable parameters (tied weights once). With by_component: a dict of counts per top-level part and per
    kind of module inside the blocks (mixer attention / memory / gate, ffn, norms)."""
    model = config_or_model
    if isinstance(config_or_model, TitansConfig):
        with torch.device("meta"):
            model = TitansLM(config_or_model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # de-duplicates tied weights
    if not by_component:
        return sum(p.numel() for p in params.values())
    counts: dict[str, int] = {}
    for name, p in params.items():
        parts = name.split(".")
        key = parts[0] if parts[0] != "blocks" else ".".join(["blocks"] + parts[2:4])
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def match_parameters(config: TitansConfig, target: int, tolerance: float = 0.05) -> TitansConfig:
    """The config with its SwiGLU width chosen (multiple of 8) so the model has `target` parameters, within
    `tolerance`: how variants are compared at equal size."""
    # the count grows linearly with the width (3 * dim per unit in each block): the smallest width reaching the target
    at_8 = count_parameters(config.replace(ffn_hidden=8))
    per_8 = count_parameters(config.replace(ffn_hidden=16)) - at_8
    lo = min(64 * config.dim, 8 + 8 * max(0, -(-(target - at_8) // per_8)))
    best = min((config.replace(ffn_hidden=w) for w in (max(8, lo - 8), lo)),
               key=lambda c: abs(count_parameters(c) - target))
    got = count_parameters(best)
    if abs(got - target) > tolerance * target:
        raise ValueError(f"cannot match {target:,} parameters with variant {config.variant!r} at dim {config.dim} "
                         f"(closest: {got:,}); change dim or layers")
    return best
