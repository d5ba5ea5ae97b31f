"""`NeuralMemory`: the long-term memory layer of Titans (paper Sections 3.1 and 4.4).

x -> q, k, v (linear, 1-D depthwise causal convolution, SiLU; q and k L2-normalised, per head) -> the memory op
(store k -> v by gradient descent on ||M(k) - v||^2 with momentum and forgetting, read M(q)) -> per-head RMSNorm,
gated by a linear map of x -> output projection. The step size theta, momentum eta and forgetting alpha are
data-dependent: sigmoid-bounded linear functions of x, one per head and token. The initial memory M_0 has a zero
last layer (an empty memory reads 0) and is meta-learned by the outer loop unless `learn_initial_memory=False`;
gradients of the training loss flow through every inner update. Why each bound and initial value: docs/memory.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .ops import MemoryState, MLPMemory, Params, current_weights, memory_scan, memory_step, surprise_norms
from .ops.memory_decode import decode_state, decode_step, memory_state
from .ops.memory_scan import checkpoint_group


def depthwise_conv(conv: nn.Conv1d, padded: Tensor) -> Tensor:
    """A depthwise `conv` over time of padded inputs (B, kernel_size - 1 + T, C) -> (B, T, C). For one token this is a
    weighted sum of the window (mkldnn's convolution costs ~100 us on CPU for so short an input)."""
    if padded.shape[1] == conv.kernel_size[0]:
        y = (padded * conv.weight[:, 0].t()).sum(1, keepdim=True)
        return y if conv.bias is None else y + conv.bias
    return conv(padded.transpose(1, 2)).transpose(1, 2)


class CausalDepthwiseConv(nn.Module):
    """Depthwise 1-D convolution over time that sees only the past; its tail of inputs carries across calls."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: Tensor, tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, C); tail: the last kernel_size - 1 inputs before x (zeros at the start of a sequence)."""
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[2])
        padded = torch.cat([tail.to(x.dtype), x], dim=1)
        return depthwise_conv(self.conv, padded), padded[:, padded.shape[1] - (self.kernel_size - 1):]


@dataclass
class NeuralMemoryState:
    """Everything `NeuralMemory` needs to continue a sequence: the memory (weights, momentum, partial chunk) and the
    convolution tails of the store path ('q', 'k', 'v') and of the read-only path ('retrieve_q')."""

    memory: MemoryState
    conv: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.detach(), {k: v.detach() for k, v in self.conv.items()})


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class NeuralMemory(nn.Module):
    """Neural long-term memory (LMM) over (B, T, dim) inputs; `forward(x, state) -> (y, state)`.

    Args:
    Arguments fed by a `TitansConfig` field have its name and default (see there).

        dim: model width. memory_heads / head_dim: memory heads (head_dim defaults to dim // memory_heads).
        memory_depth: L_M, layers of the memory MLP (1 = linear memory). memory_expansion: hidden width factor.
        chunk_size: tokens per mini-batch gradient step of the memory (Eq. 16); 1 = the plain online rule.
        memory_activation: the memory MLP's nonlinearity. memory_residual: M(x) = x + MLP(x).
        momentum / forgetting: ablation switches for eta (Eq. 10) and alpha (Eq. 13).
        memory_conv: the depthwise convolutions after the q, k, v projections (Section 4.4).
        max_lr: upper bound of the data-dependent step size theta. The inner loss has no 1/2, so for a linear memory
            with unit keys theta = 0.5 would be the delta rule with beta = 1 (one token overwrites its association);
            the default 0.25 (beta <= 0.5) is what MAC, the memory without convolution and the deep memories train
            through (docs/memory.md).
            init_lr, init_momentum, init_decay: the gates' values at initialisation.
        normalize_chunk_lr: divide each token's theta by how many earlier tokens of its chunk its gradient piles onto
            (see `memory_scan`), so that one max_lr is stable at any chunk size; exact at chunk size 1.
        max_grad_norm: per-token bound on the norm of the surprise gradient (None: the paper's rule unclipped). The
            default 100 is a divergence guard that normal tokens never reach (docs/memory.md).
        learn_initial_memory: M_0 is a parameter of the outer loop (True) or fixed (False).
        checkpoint_chunks: activation checkpointing in groups of this many memory chunks (0: off): less training
            memory for one more forward pass of the memory op. "auto" (the default): chosen from the chunk size and
            the number of chunks (`titans.ops.memory_scan.auto_checkpoint_chunks`: about sqrt(n_chunks) below chunk
            size 16, off from 16 up), so that small chunks train in about the memory of large ones (live tensors;
            glibc < 2.38's allocator keeps more resident: benchmarks/NOTES.md).
        compile_chunks: run the memory op's chunk step through torch.compile (`memory_scan`): faster training and
            prefill after a one-off compilation; decoding (`step`) stays eager (`titans.decoding` compiles it).
    """

    def __init__(self, dim: int, memory_heads: int = 4, head_dim: int | None = None, memory_depth: int = 2,
                 memory_expansion: float = 2.0, chunk_size: int = 16, memory_activation: str = "silu",
                 memory_residual: bool = False, momentum: bool = True, forgetting: bool = True,
                 memory_conv: bool = True,
                 conv_kernel: int = 4, max_lr: float = 0.25, init_lr: float = 0.125, init_momentum: float = 0.1,
                 init_decay: float = 5e-5, max_grad_norm: float | None = 100.0, normalize_chunk_lr: bool = True,
                 learn_initial_memory: bool = True, checkpoint_chunks: int | str = "auto",
                 compile_chunks: bool = False):
        super().__init__()
        if dim < 1 or memory_heads < 1:
            raise ValueError(f"dim and memory_heads must be positive, got dim={dim}, memory_heads={memory_heads}")
        head_dim = head_dim if head_dim is not None else dim // memory_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive (dim={dim}, memory_heads={memory_heads})")
        if not 0 < init_lr < max_lr:
            raise ValueError(f"need 0 < init_lr < max_lr, got init_lr={init_lr}, max_lr={max_lr}")
        for name, value in (("init_momentum", init_momentum), ("init_decay", init_decay)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        checkpoint_group(checkpoint_chunks, chunk_size, 1)  # refuses anything but "auto" and integers >= 0
        self.dim, self.heads, self.head_dim, self.chunk_size = dim, memory_heads, head_dim, chunk_size
        self.max_lr, self.max_grad_norm, self.checkpoint_chunks = max_lr, max_grad_norm, checkpoint_chunks
        self.normalize_chunk_lr, self.compile_chunks = normalize_chunk_lr, compile_chunks
        self.memory = MLPMemory(dim=head_dim, depth=memory_depth, hidden=max(1, round(head_dim * memory_expansion)),
                                activation=memory_activation, residual=memory_residual)
        inner = memory_heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.convs = nn.ModuleDict(
            {name: CausalDepthwiseConv(inner, conv_kernel) for name in ("q", "k", "v")} if memory_conv else {})
        # data-dependent gates, one per head and token (Section 3.1): theta, eta, alpha
        self.to_lr = nn.Linear(dim, memory_heads)
        self.to_momentum = nn.Linear(dim, memory_heads) if momentum else None
        self.to_decay = nn.Linear(dim, memory_heads) if forgetting else None
        for linear, value in ((self.to_lr, init_lr / max_lr), (self.to_momentum, init_momentum),
                              (self.to_decay, init_decay)):
            if linear is not None:
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.constant_(linear.bias, _logit(value))
        # M_0, one set per head: random hidden layers and a zero last layer, so that an empty memory reads 0 (a
        # random M_0 is a fixed read path that swamps what was stored). learn_initial_memory: meta-learned by the
        # outer loop, else fixed (S_0 = 0 for a linear memory, as in DeltaNet). No weight decay: M_0 is a state, and
        # decay would pull its random hidden layers to 0.
        initial = self.memory.init_params(memory_heads)
        initial[self.memory.names[-1]].zero_()
        self.initial_weights = nn.ParameterDict(
            {name: nn.Parameter(w, requires_grad=learn_initial_memory) for name, w in initial.items()})
        for w in self.initial_weights.values():
            w.no_weight_decay = True
        # output: per-head norm, gate from a linear map of x, projection (Section 4.4)
        self.norm = nn.RMSNorm(head_dim)
        self.to_gate = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    # ------------------------------------------------------------------------------------------------ helpers

    def _project(self, x: Tensor, name: str, state: NeuralMemoryState, tail_key: str) -> Tensor:
        """Linear -> causal depthwise conv -> SiLU, split into heads: (B * heads, T, head_dim)."""
        h = getattr(self, f"to_{name}")(x)
        if name in self.convs:
            h, state.conv[tail_key] = self.convs[name](h, state.conv.get(tail_key))
        h = nn.functional.silu(h)
        b, t, _ = h.shape
        h = h.view(b, t, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, t, self.head_dim)
        return nn.functional.normalize(h, dim=-1) if name in ("q", "k") else h

    def _gate(self, linear: nn.Linear | None, x: Tensor) -> Tensor | None:
        if linear is None:
            return None
        return torch.sigmoid(linear(x)).transpose(1, 2).reshape(-1, x.shape[1])  # (B * heads, T)

    def _op_dtype(self, x: Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)  # the memory state is fp32 (or fp64) even under autocast

    def initial_state(self, batch: int, dtype: torch.dtype = torch.float32) -> NeuralMemoryState:
        weights = {name: w.to(dtype).unsqueeze(0).expand(batch, *w.shape).reshape(batch * self.heads, *w.shape[1:])
                   for name, w in self.initial_weights.items()}
        return NeuralMemoryState(MemoryState.initial(weights))

    def _output(self, retrieved: Tensor, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        y = self.norm(retrieved.to(x.dtype)).view(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
        return self.to_out(y * nn.functional.silu(self.to_gate(x)))

    def _check(self, x: Tensor, state: NeuralMemoryState | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"NeuralMemory expects input of shape (batch, time, {self.dim}), got {tuple(x.shape)}")
        if state is not None:
            rows = next(iter(state.memory.weights.values())).shape[0]
            if rows != x.shape[0] * self.heads:
                raise ValueError(f"the memory state was built for batch {rows // self.heads}, got batch "
                                 f"{x.shape[0]}: a state carries on only the batch it was built for")

    def _begin(self, x: Tensor, state: NeuralMemoryState | None) -> tuple[torch.dtype, NeuralMemoryState]:
        """Validate x against the state; the op's dtype and a state whose conv tails this call may replace."""
        self._check(x, state)
        dtype = self._op_dtype(x)
        if state is None:
            return dtype, self.initial_state(x.shape[0], dtype)
        return dtype, NeuralMemoryState(state.memory, dict(state.conv))

    # ------------------------------------------------------------------------------------------------ API

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """Store every token of x in the memory and read it back: token t reads M_t, after its own update."""
        return self._store(x, state)

    def step(self, x: Tensor, state: NeuralMemoryState | None) -> tuple[Tensor, NeuralMemoryState]:
        """`forward` of one token x (B, 1, dim), for decoding: the memory op is `memory_step` (the token joins the
        partial chunk and reads with its row's closed form) instead of the chunked scan."""
        if x.shape[1] != 1:
            raise ValueError(f"NeuralMemory.step reads one token, got x of shape {tuple(x.shape)}")
        return self._store(x, state, lambda k, v, q, lr, momentum, decay, memory: memory_step(
            self.memory, k, v, q, lr, momentum, decay, self.chunk_size, memory, max_grad_norm=self.max_grad_norm,
            normalize_chunk_lr=self.normalize_chunk_lr))

    # ------------------------------------------------------------------------------------------------ fixed shapes

    def decode_state(self, state: NeuralMemoryState) -> NeuralMemoryState:
        """`state` (after at least one token) with its memory in fixed shapes (`MemoryDecodeState`), for
        `decode_step` (`titans.decoding`)."""
        memory = decode_state(self.memory, state.memory, self.chunk_size, self.max_grad_norm, self.normalize_chunk_lr,
                              self.to_momentum is not None, self.to_decay is not None)
        return NeuralMemoryState(memory, dict(state.conv))

    def decode_step(self, x: Tensor, state: NeuralMemoryState) -> tuple[Tensor, NeuralMemoryState]:
        """`step` on a `decode_state`: every tensor keeps its shape, so one compiled graph serves every token."""
        return self._store(x, state, lambda k, v, q, lr, momentum, decay, memory: decode_step(
            self.memory, k, v, q, lr, momentum, decay, memory, self.max_grad_norm, self.normalize_chunk_lr))

    def state_from_decode(self, state: NeuralMemoryState) -> NeuralMemoryState:
        """The `step` state equal to a `decode_state`."""
        return NeuralMemoryState(memory_state(state.memory, self.normalize_chunk_lr), dict(state.conv))

    def _store(self, x: Tensor, state: NeuralMemoryState | None, op=None) -> tuple[Tensor, NeuralMemoryState]:
        """Project x, run the memory op (default: the chunked scan; `op(k, v, q, lr, momentum, decay, memory_state)`
        otherwise) and project its retrievals out."""
        dtype, state = self._begin(x, state)
        if x.shape[1] == 0:  # an empty piece: nothing to store or read
            return x.new_zeros(x.shape), state
        q, k, v = (self._project(x, name, state, name) for name in ("q", "k", "v"))
        gates = [self._gate(linear, x) for linear in (self.to_lr, self.to_momentum, self.to_decay)]
        lr = None if gates[0] is None else self.max_lr * gates[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
            k, v, q, lr, momentum, decay = (cast(t) for t in (k, v, q, lr, gates[1], gates[2]))
            if op is not None:
                retrieved, state.memory = op(k, v, q, lr, momentum, decay, state.memory)
            else:
                retrieved, state.memory = memory_scan(
                    self.memory, state.memory.weights, k, v, q, lr, momentum, decay, self.chunk_size,
                    state=state.memory, max_grad_norm=self.max_grad_norm, normalize_chunk_lr=self.normalize_chunk_lr,
                    checkpoint_chunks=self.checkpoint_chunks, compile_chunks=self.compile_chunks)
        return self._output(retrieved, x), state

    def signals(self, x: Tensor, state: NeuralMemoryState | None = None) -> dict[str, Tensor]:
        """What the memory would do with x, per head and token, each (B, heads, T): the step size `theta`, momentum
        `eta` and forgetting `alpha` (0 where switched off), the surprise ||grad l(W; k_t, v_t)||
        at the weights the state holds now (`surprise`) and the factor surprise clipping applies to it (`clip`, 1
        when off). The state is not advanced. The signals that show a memory that cannot learn: theta too small to
        overwrite, eta saturated at 1 (momentum as an accumulator), alpha wiping the memory, clipping on every token."""
        _, state = self._begin(x, state)
        k, v = self.associations(x, state)
        gates = [self._gate(linear, x) for linear in (self.to_lr, self.to_momentum, self.to_decay)]
        with torch.autocast(device_type=x.device.type, enabled=False):
            surprise = surprise_norms(self.memory, self.weights(state), k, v)
        clip = torch.ones_like(surprise) if self.max_grad_norm is None else \
            (self.max_grad_norm / surprise.clamp(min=torch.finfo(surprise.dtype).tiny)).clamp(max=1)
        zero = torch.zeros_like(surprise)
        by_head = dict(theta=self.max_lr * gates[0], eta=zero if gates[1] is None else gates[1],
                       alpha=zero if gates[2] is None else gates[2], surprise=surprise, clip=clip)
        return {name: t.reshape(x.shape[0], self.heads, x.shape[1]) for name, t in by_head.items()}

    def retrieve(self, x: Tensor, state: NeuralMemoryState | None = None,
                 weights: Params | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """Read the memory with queries from x without storing anything (M* in the paper): with `weights` (per
        (batch, head) row), else the state's current ones. Only the read path's convolution tail advances."""
        dtype, state = self._begin(x, state)
        if x.shape[1] == 0:
            return x.new_zeros(x.shape), state
        q = self._project(x, "q", state, "retrieve_q")
        with torch.autocast(device_type=x.device.type, enabled=False):
            retrieved = self.memory(self.weights(state) if weights is None else weights, q.to(dtype))
        return self._output(retrieved, x), state

    def associations(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, Tensor]:
        """The keys and values storing x would write, each (B * heads, T, head_dim) in the memory's dtype (keys
        L2-normalised). The state is not advanced."""
        dtype, state = self._begin(x, state)
        k, v = (self._project(x, name, state, name).to(dtype) for name in ("k", "v"))
        return k, v

    def weights(self, state: NeuralMemoryState) -> Params:
        """The memory's weights after every token `state` holds (its partial chunk folded in), per (batch, head) row:
        what a read sees. Outside autocast."""
        return current_weights(self.memory, state.memory, self.max_grad_norm, self.normalize_chunk_lr)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[Tensor, NeuralMemoryState, NeuralMemoryState]]]:
        """Within the block, every storing call appends (x, state before, state after) to the list it yields."""
        calls = []

        def record(memory: NeuralMemory, args: tuple, kwargs: dict, output: tuple) -> None:
            x, before = args[0], args[1] if len(args) > 1 else kwargs.get("state")
            calls.append((x, before if before is not None else self.initial_state(x.shape[0], self._op_dtype(x)),
                          output[1]))

        handle = self.register_forward_hook(record, with_kwargs=True)
        try:
            yield calls
        finally:
            handle.remove()
