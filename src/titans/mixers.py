"""The sequence mixers of Titans (paper Section 4): MAC, MAG, MAL, LMM, the gate of MAC and MAG, and the attention
baselines' wrapper.

Every mixer maps (B, T, dim) -> (B, T, dim) and carries a streaming state: `forward(x, state) -> (y, state)`;
`step` reads one token. For fast decoding (`titans.decoding`) each also turns its state into fixed shapes
(`decode_state(state, capacity)`), reads a token on it (`decode_step`) and turns it back (`state_from_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionState, CausalSelfAttention, persistent_tokens, prepend_persistent
from .memory import NeuralMemory, NeuralMemoryState
from .ops import MemoryState, current_weights


class MemoryGate(nn.Module):
    """o = y (x) M of MAC and MAG (Sections 4.1-4.2; the paper leaves the gating open): each branch normalised with
    learnable vector-valued weights; the memory carries the content and attention gates it through a sigmoid,
    o = norm(M) * sigmoid(norm(y)). With attention as the content (o = norm(y) * sigmoid(norm(M))), both hybrids
    answered what attention sees and never learned to use their memory: MQAR answers beyond the window 10-13% against
    91-98% (docs/memory.md)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_attention = nn.RMSNorm(dim)
        self.norm_memory = nn.RMSNorm(dim)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.norm_memory(m) * torch.sigmoid(self.norm_attention(y))


def _upgrade_on_load(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: the module's `upgrade_state_dict` (checkpoint loading calls it before checking
    keys)."""
    module.upgrade_state_dict(state_dict, prefix)


def _with_persistent_prefix(memory: NeuralMemory, persistent: Tensor | None, x: Tensor,
                            state: NeuralMemoryState | None) -> tuple[Tensor, Tensor | None, NeuralMemoryState]:
    """M([p] || x): at the start of a sequence the memory first reads the persistent tokens (Section 3.3). Returns
    the outputs on x, the outputs on the persistent tokens (None when none were read: no tokens, or a later piece of
    a stream, which continues from the state) and the state."""
    if state is not None or persistent is None:
        y, state = memory(x, state)
        return y, None, state
    n = persistent.shape[0]
    y, state = memory(prepend_persistent(persistent, x), None)
    return y[:, n:], y[:, :n], state


class AttentionMixer(nn.Module):
    """Baselines `transformer` (full causal attention) and `swa` (sliding window)."""

    def __init__(self, attention: CausalSelfAttention):
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor, state: AttentionState | None = None):
        return self.attention(x, state)

    def step(self, x: Tensor, state: AttentionState):
        return self.attention.step(x, state)

    def decode_state(self, state: AttentionState, capacity: int):
        return self.attention.decode_state(state, capacity)

    def decode_step(self, x: Tensor, state):
        return self.attention.decode_step(x, state)

    def state_from_decode(self, state) -> AttentionState:
        return self.attention.state_from_decode(state)


class MemoryMixer(nn.Module):
    """`lmm`: the neural memory alone (Section 4.3), reading the persistent tokens first (Section 3.3)."""

    def __init__(self, memory: NeuralMemory, num_persistent: int = 0):
        super().__init__()
        self.memory = memory
        self.persistent = persistent_tokens(num_persistent, memory.dim)

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None):
        y, _, state = _with_persistent_prefix(self.memory, self.persistent, x, state)
        return y, state

    def step(self, x: Tensor, state: NeuralMemoryState):
        """`forward` of one token (B, 1, dim) continuing `state` (the persistent tokens were read at its start)."""
        return self.memory.step(x, state)

    def decode_state(self, state: NeuralMemoryState, capacity: int) -> NeuralMemoryState:
        return self.memory.decode_state(state)

    def decode_step(self, x: Tensor, state: NeuralMemoryState):
        return self.memory.decode_step(x, state)

    def state_from_decode(self, state: NeuralMemoryState) -> NeuralMemoryState:
        return self.memory.state_from_decode(state)


@dataclass
class GateMixerState:
    attention: AttentionState
    memory: NeuralMemoryState

    def detach(self) -> "GateMixerState":
        return GateMixerState(self.attention.detach(), self.memory.detach())


class MAGMixer(nn.Module):
    """Memory as a Gate (Section 4.2): x~ = [p] || x;  y = SW-Attn*(x~);  o = y (x) M(x~).
    The persistent tokens are the attention's (always visible, whatever the window) and the memory reads them first."""

    def __init__(self, attention: CausalSelfAttention, memory: NeuralMemory):
        super().__init__()
        self.attention, self.memory, self.gate = attention, memory, MemoryGate(attention.dim)

    def forward(self, x: Tensor, state: GateMixerState | None = None):
        y, attention_state = self.attention(x, None if state is None else state.attention)
        m, _, memory_state = _with_persistent_prefix(self.memory, self.attention.persistent, x,
                                                     None if state is None else state.memory)
        return self.gate(y, m), GateMixerState(attention_state, memory_state)

    def step(self, x: Tensor, state: GateMixerState):
        """`forward` of one token (B, 1, dim) continuing `state`."""
        y, attention_state = self.attention.step(x, state.attention)
        m, memory_state = self.memory.step(x, state.memory)
        return self.gate(y, m), GateMixerState(attention_state, memory_state)

    def decode_state(self, state: GateMixerState, capacity: int) -> GateMixerState:
        return GateMixerState(self.attention.decode_state(state.attention, capacity),
                              self.memory.decode_state(state.memory))

    def decode_step(self, x: Tensor, state: GateMixerState):
        y, attention_state = self.attention.decode_step(x, state.attention)
        m, memory_state = self.memory.decode_step(x, state.memory)
        return self.gate(y, m), GateMixerState(attention_state, memory_state)

    def state_from_decode(self, state: GateMixerState) -> GateMixerState:
        return GateMixerState(self.attention.state_from_decode(state.attention),
                              self.memory.state_from_decode(state.memory))


@dataclass
class MALState:
    attention: AttentionState
    memory: NeuralMemoryState
    prefix: Tensor | None  # the persistent tokens after the memory layer: the attention's always-visible prefix

    def detach(self) -> "MALState":
        return MALState(self.attention.detach(), self.memory.detach(),
                        None if self.prefix is None else self.prefix.detach())


class MALMixer(nn.Module):
    """Memory as a Layer (Section 4.3, Eqs. 29-31) in an H3-like block with a residual around each layer (4.4):
    x~ = [p] || x;  y = x~ + g * M(x~);  o = y + SW-Attn(y), with g the learned `series_gate` (Eq. 30 has g = 1).
    The persistent tokens reach the attention through the memory: their outputs y_p are the attention's prefix,
    visible to every position whatever the window. Returns M(x~) + SW-Attn(y): the block's own residual adds x back.
    attention_trains_memory=False (the default) stops the attention's gradient at the memory output it reads: the
    forward pass is the paper's, but the memory is trained by its own output only. Trained through the attention, the
    memory learned to pass tokens through to it and never to recall: MQAR answers beyond the window 3.4% against
    82.7-99.2% with the gradient stopped (docs/memory.md)."""

    def __init__(self, attention: CausalSelfAttention, memory: NeuralMemory, num_persistent: int,
                 attention_trains_memory: bool = False, series_gate_init: float = 0.0):
        super().__init__()
        self.attention, self.memory = attention, memory
        self.persistent = persistent_tokens(num_persistent, memory.dim)
        self.attention_trains_memory = attention_trains_memory
        # g of Eq. 30 as we read it, y = x~ + g * M(x~): learned per channel from series_gate_init. From g = 1 (the
        # paper's form) MAL sat on a unigram plateau in language modelling for hundreds of steps (docs/memory.md)
        self.series_gate = nn.Parameter(torch.full((memory.dim,), float(series_gate_init)))
        self.register_load_state_dict_pre_hook(_upgrade_on_load)

    def upgrade_state_dict(self, state_dict: dict, prefix: str = "") -> list[str]:
        """Bring a state dict of an older release to this mixer's names, in place, and return the keys it added: a
        checkpoint written before the series gate computes what it did, g = 1."""
        if prefix + "series_gate" in state_dict:
            return []
        state_dict[prefix + "series_gate"] = torch.ones_like(self.series_gate, device="cpu")
        return [prefix + "series_gate"]

    def _read(self, m: Tensor) -> Tensor:
        """g * M(x~), the memory output as the attention reads it."""
        return self.series_gate.to(m.dtype) * (m if self.attention_trains_memory else m.detach())

    def forward(self, x: Tensor, state: MALState | None = None):
        m, m_persistent, memory_state = _with_persistent_prefix(self.memory, self.persistent, x,
                                                                None if state is None else state.memory)
        y = x + self._read(m)
        if state is not None:
            prefix = state.prefix
        else:  # y_p = p + g * M(p), in x's dtype like y
            prefix = None if m_persistent is None else self.persistent.to(x.dtype) + self._read(m_persistent)
        o, attention_state = self.attention(y, None if state is None else state.attention, prefix=prefix)
        return m + o, MALState(attention_state, memory_state, prefix)

    def step(self, x: Tensor, state: MALState):
        """`forward` of one token (B, 1, dim) continuing `state`."""
        m, memory_state = self.memory.step(x, state.memory)
        o, attention_state = self.attention.step(x + self._read(m), state.attention, prefix=state.prefix)
        return m + o, MALState(attention_state, memory_state, state.prefix)

    def decode_state(self, state: MALState, capacity: int) -> MALState:
        return MALState(self.attention.decode_state(state.attention, capacity), self.memory.decode_state(state.memory),
                        state.prefix)

    def decode_step(self, x: Tensor, state: MALState):
        m, memory_state = self.memory.decode_step(x, state.memory)
        o, attention_state = self.attention.decode_step(x + self._read(m), state.attention, prefix=state.prefix)
        return m + o, MALState(attention_state, memory_state, state.prefix)

    def state_from_decode(self, state: MALState) -> MALState:
        return MALState(self.attention.state_from_decode(state.attention),
                        self.memory.state_from_decode(state.memory), state.prefix)


@dataclass
class MACState:
    """Memory as a Context, mid-stream: the memory now (after storing this segment's outputs so far), the memory at
    the start of the current segment (what its retrievals read), and the segment's attention keys/values so far."""

    memory: NeuralMemoryState
    segment_memory: MemoryState
    keys: Tensor  # (B, heads, 2, n, head_dim): retrieved tokens h and segment tokens x, rotated by in-segment position
    values: Tensor

    @property
    def filled(self) -> int:
        return self.keys.shape[3]

    def detach(self) -> "MACState":
        return MACState(self.memory.detach(), self.segment_memory.detach(), self.keys.detach(), self.values.detach())


class MACMixer(nn.Module):
    """Memory as a Context (Section 4.1, Fig. 2). The sequence is split into segments S of `segment_len` tokens; for
    each one:  h = M*_{t-1}(q) read with the segment's queries;  y = Attn([p] || h || S) on the segment's positions;
    z = RMSNorm(S + y);  M_t = M_{t-1}.store(z);  o = M*_t(z) (x) y.
    The memory stores and reads the residual stream after attention (every block has residuals, Section 4.4),
    pre-normed like every layer's input, and carries the output's content (`MemoryGate`). As Eqs. 24-25 write it
    (store y, attention as the content) the memory went unused: MQAR answers beyond the segment 10% (docs/memory.md).
    Attention mask: the persistent tokens are visible to every position; position i sees h_j and x_j for j <= i (h_j
    derives from x_j, so seeing later h's would leak the future). Token i's memory read M*(z_i) sees M after z_i."""

    def __init__(self, dim: int, heads: int, segment_len: int, memory: NeuralMemory, num_persistent: int,
                 rope: bool = True):
        super().__init__()
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        self.dim, self.heads, self.head_dim, self.segment_len = dim, heads, dim // heads, segment_len
        self.memory = memory
        self.attention = CausalSelfAttention(dim, heads, num_persistent=num_persistent, rope=rope)
        self.gate = MemoryGate(dim)
        self.register_load_state_dict_pre_hook(_upgrade_on_load)

    def upgrade_state_dict(self, state_dict: dict, prefix: str = "") -> list[str]:
        """Bring a state dict of an older release to this mixer's names, in place (none added): before MAC attended
        through `CausalSelfAttention`, its `query`, `key`, `value`, `out` and `persistent` sat at the mixer level."""
        for name in ("query.weight", "key.weight", "value.weight", "out.weight", "persistent"):
            if prefix + name in state_dict:
                state_dict[prefix + "attention." + name] = state_dict.pop(prefix + name)
        return []

    def _segment_piece(self, x: Tensor, state: MACState, store=None) -> tuple[Tensor, MACState]:
        """Tokens x (B, n, dim) that continue the current segment (state.filled + n <= segment_len). store: how the
        memory stores (default: its forward)."""
        start = state.filled
        reader = NeuralMemoryState(state.segment_memory, state.memory.conv)
        h, reader = self.memory.retrieve(x, reader)  # every token of the segment reads M_{t-1}
        attention = self.attention
        q = attention.queries(x, start)
        k, v = zip(attention.keys_values(h, start), attention.keys_values(x, start))
        keys = torch.cat([state.keys, torch.stack(k, dim=2)], dim=3)  # (B, heads, 2, filled, head_dim)
        values = torch.cat([state.values, torch.stack(v, dim=2)], dim=3)
        filled = start + x.shape[1]
        causal = torch.arange(filled, device=x.device)[None, :] <= torch.arange(start, filled, device=x.device)[:, None]
        y = attention.attend(q, keys.flatten(2, 3), values.flatten(2, 3), torch.cat([causal, causal], dim=1))
        z = F.rms_norm(x + y, (self.dim,))  # the residual stream after attention, pre-normed
        m, memory_state = (store or self.memory)(z, NeuralMemoryState(state.memory.memory, reader.conv))
        state = MACState(memory_state, state.segment_memory, keys, values)
        if filled == self.segment_len:  # segment complete: the next one reads the memory as it is now
            empty = keys[:, :, :, :0]
            state = MACState(memory_state, memory_state.memory, empty, empty)
        return self.gate(y, m), state

    def initial_state(self, x: Tensor) -> MACState:
        memory = self.memory.initial_state(x.shape[0], torch.promote_types(x.dtype, torch.float32))
        empty = x.new_zeros(x.shape[0], self.heads, 2, 0, self.head_dim)
        return MACState(memory, memory.memory, empty, empty)

    def forward(self, x: Tensor, state: MACState | None = None):
        state = self.initial_state(x) if state is None else state
        outputs, start = [], 0
        while start < x.shape[1]:
            n = min(self.segment_len - state.filled, x.shape[1] - start)
            y, state = self._segment_piece(x[:, start:start + n], state)
            outputs.append(y)
            start += n
        return (torch.cat(outputs, dim=1) if outputs else x.new_zeros(x.shape)), state

    def step(self, x: Tensor, state: MACState):
        """`forward` of one token (B, 1, dim) continuing `state`: the memory stores it with `NeuralMemory.step`."""
        return self._segment_piece(x, state, store=self.memory.step)

    def decode_state(self, state: MACState, capacity: int) -> MACDecodeState:
        m = self.memory
        segment = current_weights(m.memory, state.segment_memory, m.max_grad_norm, m.normalize_chunk_lr)
        room = lambda cache: F.pad(cache, (0, 0, 0, self.segment_len - state.filled))  # noqa: E731  segment_len slots
        return MACDecodeState(m.decode_state(state.memory), dict(segment), room(state.keys), room(state.values),
                              torch.tensor(state.filled, device=state.keys.device))

    def decode_step(self, x: Tensor, state: MACDecodeState):
        """`step` on a `decode_state`: the segment's keys sit in a buffer of segment_len slots, visible up to the
        token's own; at the segment's end the memory's weights now become the ones the next segment reads."""
        start = state.filled
        h, reader = self.memory.retrieve(x, NeuralMemoryState(state.memory.memory, state.memory.conv),
                                         weights=state.segment_weights)
        attention = self.attention
        q = attention.queries(x, start)
        k, v = zip(attention.keys_values(h, start), attention.keys_values(x, start))
        at = start.reshape(1)
        keys = state.keys.index_copy(3, at, torch.stack(k, dim=2))
        values = state.values.index_copy(3, at, torch.stack(v, dim=2))
        visible = torch.arange(self.segment_len, device=x.device) <= start
        y = attention.attend(q, keys.flatten(2, 3), values.flatten(2, 3), torch.cat([visible, visible])[None])
        z = F.rms_norm(x + y, (self.dim,))
        m, memory_state = self.memory.decode_step(z, NeuralMemoryState(state.memory.memory, reader.conv))
        complete = start == self.segment_len - 1
        segment = {k: torch.where(complete, w, state.segment_weights[k])
                   for k, w in memory_state.memory.weights_now.items()}
        return self.gate(y, m), MACDecodeState(memory_state, segment, keys, values,
                                               (start + 1) % self.segment_len)

    def state_from_decode(self, state: MACDecodeState) -> MACState:
        """The `step` state equal to a `decode_state`; its segment memory holds the weights the segment reads (as a
        state without momentum or pending tokens: reads see the same memory)."""
        filled = int(state.filled)
        segment = MemoryState(dict(state.segment_weights),
                              {k: torch.zeros_like(w) for k, w in state.segment_weights.items()})
        return MACState(self.memory.state_from_decode(state.memory), segment, state.keys[:, :, :, :filled],
                        state.values[:, :, :, :filled])


@dataclass
class MACDecodeState:
    """A `MACState` in fixed shapes: the memory's `decode_state`, the weights the segment reads, the segment's keys
    and values in buffers of segment_len slots, and how many are filled (0-d int64)."""

    memory: NeuralMemoryState
    segment_weights: dict[str, Tensor]
    keys: Tensor  # (B, heads, 2, segment_len, head_dim)
    values: Tensor
    filled: Tensor
