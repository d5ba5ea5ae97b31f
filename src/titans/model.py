"""`TitansLM`: token embedding -> N pre-norm blocks (a sequence mixer, then SwiGLU) -> norm -> LM head.

`config.variant` picks the mixer: the Titans architectures `mac`, `mag`, `mal`, `lmm` (paper Section 4) and the
baselines `transformer`, `swa`, `deltanet`, `gated_deltanet`, `ttt`, all through the same blocks, streaming state and
training code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .attention import CausalSelfAttention
from .blocks import AttentionMixer, Block, MACMixer, MAGMixer, MALMixer, MemoryMixer
from .deltanet import DeltaNet
from .memory import NeuralMemory
from .ttt import TTT

Variant = Literal["mac", "mag", "mal", "lmm", "transformer", "swa", "deltanet", "gated_deltanet", "ttt"]
VARIANTS: tuple[str, ...] = Variant.__args__
TITANS_VARIANTS = ("mac", "mag", "mal", "lmm")


@dataclass
class TitansConfig:
    """Shape of a TitansLM. Every field is a YAML key under `model:`."""

    variant: Variant = "mac"
    vocab_size: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn_hidden: int | None = None  # SwiGLU width; default: 8/3 * dim rounded up to a multiple of 16
    tie_embeddings: bool = False  # tied heads start from small embeddings (std 0.02), untied from std 1
    # attention
    window: int = 64  # sliding-window size of `swa`, `mag`, `mal`
    segment_len: int = 64  # segment size of `mac`
    num_persistent: int = 4  # persistent memory tokens (Section 3.3); 0 disables them
    rope: bool = True
    # neural memory (Section 3.1)
    memory_depth: int = 2  # L_M; 1 is a linear memory
    memory_expansion: float = 2.0
    memory_heads: int | None = None  # default: heads
    chunk_size: int = 16  # tokens per memory mini-batch step (Eq. 16)
    momentum: bool = True
    forgetting: bool = True
    memory_conv: bool = True
    memory_activation: str = "silu"
    # the memory's step size theta, momentum eta and forgetting alpha (data-dependent gates, Section 3.1)
    max_lr: float = 0.5  # theta <= max_lr; 0.5 with unit keys is a full delta-rule overwrite (inner loss has no 1/2)
    init_lr: float = 0.25  # theta at initialisation
    init_momentum: float = 0.1  # eta at initialisation (0.5 doubles the effective step: a deep memory diverged)
    init_decay: float = 1e-4  # alpha at initialisation (1e-3 let deep memories decay to 0 over 100K tokens)
    normalize_chunk_lr: bool = True  # theta_j / (overlap of k_j with its chunk's earlier keys): stable at any chunk
    max_grad_norm: float | None = 100.0  # per-token surprise clipping (not in the paper): a divergence guard; null: off
    learn_initial_memory: bool = True  # M_0 (zero last layer) learned by the outer loop, or fixed

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
        config.dim, heads=config.memory_heads or config.heads, memory_depth=config.memory_depth,
        memory_expansion=config.memory_expansion, chunk_size=config.chunk_size,
        activation=config.memory_activation, momentum=config.momentum, forgetting=config.forgetting,
        use_conv=config.memory_conv,
        max_lr=config.max_lr, init_lr=config.init_lr, init_momentum=config.init_momentum,
        init_decay=config.init_decay, normalize_chunk_lr=config.normalize_chunk_lr,
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
                   mini_batch_size=c.chunk_size, conv_kernel=4 if c.memory_conv else 0)
    if c.variant == "mag":
        return MAGMixer(attention(c.window, c.num_persistent), _memory(c))
    if c.variant == "mal":
        return MALMixer(attention(c.window, 0), _memory(c), c.num_persistent)
    return MACMixer(c.dim, c.heads, c.segment_len, _memory(c), c.num_persistent, rope=c.rope)


@dataclass
class TitansState:
    """Streaming state of a TitansLM: one state per block and the number of tokens seen."""

    layers: list = field(default_factory=list)
    position: int = 0

    def detach(self) -> "TitansState":
        return TitansState([s.detach() for s in self.layers], self.position)


class TitansLM(nn.Module):
    def __init__(self, config: TitansConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config.dim, build_mixer(config), config.ffn_width)
                                    for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Untied: unit-scale embeddings, the scale of the normalised activations they feed (with std 0.02 the blocks'
        # default-initialised projections swamp them, and MQAR stays at chance for thousands of steps). Tied: the
        # embedding is also the output layer, so it starts small (GPT-2's 0.02) to keep the first logits small.
        nn.init.normal_(self.embed.weight, std=0.02 if config.tie_embeddings else 1.0)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        """tokens (B, T) int64 -> logits (B, T, vocab_size) and the state after them."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, time), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")
        layer_states = [None] * len(self.blocks) if state is None else state.layers
        if len(layer_states) != len(self.blocks):
            raise ValueError(f"the state holds {len(layer_states)} layers but the model has {len(self.blocks)}")
        x = self.embed(tokens)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states):
            x, layer_state = block(x, layer_state)
            new_states.append(layer_state)
        position = (0 if state is None else state.position) + tokens.shape[1]
        return self.head(self.norm(x)), TitansState(new_states, position)

    def set_activation_checkpointing(self, chunks: int) -> None:
        """Recompute the memory in groups of `chunks` chunks in the backward pass instead of storing its
        intermediates (0 or False: off; True: every chunk)."""
        for module in self.modules():
            if isinstance(module, NeuralMemory):
                module.checkpoint_chunks = int(chunks)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 state: TitansState | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continue `prompt` (B, T) by `max_new_tokens` tokens from a streaming state: greedy when temperature is 0,
        otherwise sampled from softmax(logits / temperature), restricted to the top_k most likely when given."""
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        logits, state = self(prompt, state)
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
            logits, state = self(token, state)
        return torch.cat([prompt] + out, dim=1)


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
    lo, hi = 8, 64 * config.dim
    while lo < hi:  # parameter count grows with the width: the smallest width reaching the target
        mid = (lo + hi) // 2 // 8 * 8 or 8
        if count_parameters(config.replace(ffn_hidden=mid)) < target:
            lo = mid + 8
        else:
            hi = mid
    best = min((config.replace(ffn_hidden=w) for w in (max(8, lo - 8), lo)),
               key=lambda c: abs(count_parameters(c) - target))
    got = count_parameters(best)
    if abs(got - target) > tolerance * target:
        raise ValueError(f"cannot match {target:,} parameters with variant {config.variant!r} at dim {config.dim} "
                         f"(closest: {got:,}); change dim or layers")
    return best
