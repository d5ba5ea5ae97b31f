"""Causal self-attention: full (Transformer baseline) and sliding-window (SWA, MAG/MAL branches).

Both variants support learnable persistent-memory tokens (Titans, Section 3.3), rotary position embeddings and
streaming: running a sequence whole or in pieces with the returned `AttentionState` carried gives the same output.
Sliding-window attention is computed block-wise so that its memory is O(T * window), never O(T^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def persistent_tokens(num: int, dim: int) -> nn.Parameter | None:
    """Persistent memory (Section 3.3): `num` learnable, input-independent tokens in input space, at the scale of a
    normalised input; None when num is 0. Every variant makes its tokens here and keeps them under the attribute (and
    state-dict key) `persistent`. Marked `no_weight_decay` (see titans.optim.param_groups): decay would pull the
    learned tokens to 0."""
    if num < 0:
        raise ValueError(f"num_persistent must be >= 0, got {num}")
    if not num:
        return None
    tokens = nn.Parameter(torch.randn(num, dim))
    tokens.no_weight_decay = True
    return tokens


def prepend_persistent(tokens: Tensor | None, x: Tensor) -> Tensor:
    """[p] || x: the persistent tokens (n, dim), in x's dtype, before every sequence of x (B, T, dim)."""
    if tokens is None:
        return x
    return torch.cat([tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), "rotate-half" layout.

    Channel i of the first half and channel i of the second half form a pair rotated by the angle
    position * base^(-2i / head_dim). cos/sin are computed in float32 (float64 for float64 inputs) and cached.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"rotary head_dim must be a positive even number, got {head_dim}")
        if base <= 1.0:
            raise ValueError(f"rotary base must be > 1, got {base}")
        self.head_dim = head_dim
        self.base = base
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    def _angles(self, positions: Tensor) -> Tensor:
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=positions.dtype)
        inv_freq = self.base ** (-exponents / self.head_dim)
        return positions[:, None] * inv_freq  # (T, head_dim / 2)

    def _cached_cos_sin(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cache = self._cos
        stale = cache is None or cache.size(0) < length or cache.device != device or cache.dtype != dtype
        if stale or (cache.is_inference() and not torch.is_inference_mode_enabled()):  # made by generate: no autograd
            # Grow geometrically so token-by-token decoding does not recompute the table every step.
            size = max(length, 2 * cache.size(0) if cache is not None else length)
            angles = self._angles(torch.arange(size, device=device, dtype=dtype))
            self._cos, self._sin = angles.cos(), angles.sin()
        return self._cos[:length], self._sin[:length]

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """Rotate x of shape (..., T, head_dim) for absolute positions offset .. offset + T - 1."""
        if x.size(-1) != self.head_dim:
            raise ValueError(f"expected last dimension {self.head_dim}, got shape {tuple(x.shape)}")
        length = x.size(-2)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if isinstance(offset, Tensor):
            if offset.numel() != 1:
                raise ValueError(f"offset must be a scalar, got shape {tuple(offset.shape)}")
            positions = offset.reshape(()).to(x.device, dtype) + torch.arange(length, device=x.device, dtype=dtype)
            angles = self._angles(positions)
            cos, sin = angles.cos(), angles.sin()
        else:
            if offset < 0:
                raise ValueError(f"offset must be >= 0, got {offset}")
            cos, sin = self._cached_cos_sin(offset + length, x.device, dtype)
            cos, sin = cos[offset:], sin[offset:]
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.to(x.dtype)


@dataclass
class AttentionState:
    """Streaming state of one attention layer.

    keys, values: (B, heads, L, head_dim) cached keys (already rotated) and values of the most recent tokens:
    all past tokens for full attention (a KV cache), at most window - 1 for sliding-window attention.
    offset: number of tokens seen so far (the absolute position of the next token).
    """

    keys: Tensor
    values: Tensor
    offset: int

    def detach(self) -> AttentionState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return AttentionState(self.keys.detach(), self.values.detach(), self.offset)


@dataclass
class AttentionDecodeState:
    """An `AttentionState` in fixed shapes, for `CausalSelfAttention.decode_step`: the cache is a ring of `slots`
    positions, position t at slot t % slots (window slots for sliding-window attention, room for every token to come
    for full attention), so that decoding writes one slot and never changes a shape."""

    keys: Tensor  # (B, heads, slots, head_dim), rotated
    values: Tensor
    offset: Tensor  # 0-d int64: the absolute position of the next token


def attention_mask(
    num_queries: int, num_past: int, window: int | None, num_persistent: int, device: torch.device | None = None
) -> Tensor:
    """Boolean mask (num_queries, num_persistent + num_past + num_queries); True means "may attend".

    Keys are [persistent tokens] || [num_past earlier tokens] || [the queries' own tokens]. Query i sees every
    persistent token and the tokens at distance 0 .. window - 1 before it (all earlier ones when window is None).
    """
    query_pos = torch.arange(num_queries, device=device)[:, None] + num_past
    key_pos = torch.arange(num_past + num_queries, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    persistent = torch.ones(num_queries, num_persistent, dtype=torch.bool, device=device)
    return torch.cat((persistent, visible), dim=1)


def _append(cache: Tensor, new: Tensor) -> Tensor:
    """cache || new along time (B, heads, L, head_dim): a view of a buffer with spare room (the view's `buffer`
    attribute: inference tensors keep no `_base`), written in place when no other state has claimed that room, so a
    KV cache grows in amortised O(1) per token. A state continued twice gets a copy the second time; with autograd on,
    every append copies."""
    buffer, length = getattr(cache, "buffer", None), cache.size(2)
    if buffer is None or torch.is_grad_enabled() or buffer.claimed != length or buffer.size(2) == length:
        buffer = cache.new_empty(*cache.shape[:2], max(2 * length, 64), cache.size(3))
        buffer[:, :, :length] = cache
    buffer[:, :, length:length + 1] = new
    buffer.claimed = length + 1
    out = buffer[:, :, :length + 1]
    out.buffer = buffer
    return out


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, full (window=None) or sliding-window (window=W: position t sees t-W+1..t).

    num_persistent learnable, input-independent tokens (Section 3.3) are projected with the same key/value
    projections (without rotary position) and are visible to every query, whatever the window.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        window: int | None = None,
        num_persistent: int = 0,
        rope: bool = True,
        qk_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim <= 0 or heads <= 0:
            raise ValueError(f"dim and heads must be positive, got dim={dim}, heads={heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when head_dim is not given")
            head_dim = dim // heads
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if num_persistent < 0:
            raise ValueError(f"num_persistent must be >= 0, got {num_persistent}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.window = window
        self.num_persistent = num_persistent
        self.dropout = dropout

        inner = heads * head_dim
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)
        self.value = nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        self.out_dropout = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(head_dim) if rope else None
        self.query_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.key_norm = nn.RMSNorm(head_dim) if qk_norm else None
        self.persistent = persistent_tokens(num_persistent, dim)

    def _heads(self, x: Tensor) -> Tensor:
        """(..., T, heads * head_dim) -> (..., heads, T, head_dim)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def _persistent_keys_values(self, batch: int, prefix: Tensor | None) -> tuple[Tensor, Tensor] | tuple[None, None]:
        tokens = self.persistent if prefix is None else prefix
        if tokens is None:
            return None, None
        keys, values = self._heads(self.key(tokens)), self._heads(self.value(tokens))
        if self.key_norm is not None:
            keys = self.key_norm(keys)
        return keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, pk: Tensor | None, pv: Tensor | None, num_past: int) -> Tensor:
        """Attention of q (..., Tq, D) over [pk] || k (..., num_past + Tq, D) with the causal (banded) mask."""
        dropout = self.dropout if self.training else 0.0
        num_queries = q.size(-2)
        within_window = self.window is None or num_queries <= self.window
        if pk is None and num_past == 0 and within_window:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        if pk is not None:
            k, v = torch.cat((pk, k), dim=-2), torch.cat((pv, v), dim=-2)
        mask = attention_mask(num_queries, num_past, self.window, 0 if pk is None else pk.size(-2), q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    def _attend_blockwise(
        self, q: Tensor, k: Tensor, v: Tensor, pk: Tensor | None, pv: Tensor | None, num_past: int
    ) -> Tensor:
        """Sliding-window attention in query blocks of `window` tokens, so memory is O(T * window).

        The first block sees the cached past; query block j >= 1 sees only the current key blocks j - 1 and j.
        The last block is zero-padded: padded keys are visible only to padded queries, which are dropped.
        """
        w = self.window
        batch, _, length, _ = q.shape
        first = self._attend(q[:, :, :w], k[:, :, : num_past + w], v[:, :, : num_past + w], pk, pv, num_past)

        num_blocks = -(-length // w)
        pad = num_blocks * w - length

        def blocks(t: Tensor) -> Tensor:  # (B, H, T, D) -> (B, num_blocks, H, w, D)
            return F.pad(t, (0, 0, 0, pad)).unflatten(2, (num_blocks, w)).transpose(1, 2)

        queries = blocks(q)[:, 1:]
        key_blocks, value_blocks = blocks(k[:, :, num_past:]), blocks(v[:, :, num_past:])
        keys = torch.cat((key_blocks[:, :-1], key_blocks[:, 1:]), dim=3)  # (B, num_blocks - 1, H, 2w, D)
        values = torch.cat((value_blocks[:, :-1], value_blocks[:, 1:]), dim=3)
        if pk is not None:
            pk = pk[:, None].expand(-1, num_blocks - 1, -1, -1, -1).flatten(0, 1)
            pv = pv[:, None].expand(-1, num_blocks - 1, -1, -1, -1).flatten(0, 1)
        rest = self._attend(queries.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), pk, pv, num_past=w)
        rest = rest.unflatten(0, (batch, num_blocks - 1)).transpose(1, 2).flatten(2, 3)[:, :, : length - w]
        return torch.cat((first, rest), dim=2)

    def queries(self, x: Tensor, offset: int) -> Tensor:
        """Queries (B, heads, T, head_dim) of x (B, T, dim) at positions offset.., normalised and rotated."""
        q = self._heads(self.query(x))
        if self.query_norm is not None:
            q = self.query_norm(q)
        return q if self.rotary is None else self.rotary(q, offset)

    def keys_values(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """Keys (normalised, rotated) and values (B, heads, T, head_dim) of x (B, T, dim) at positions offset.."""
        k, v = self._heads(self.key(x)), self._heads(self.value(x))
        if self.key_norm is not None:
            k = self.key_norm(k)
        return (k if self.rotary is None else self.rotary(k, offset)), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Output (B, T, dim) of queries q (B, heads, T, head_dim) over keys/values k, v (B, heads, L, head_dim) with
        a boolean mask (T, L) of what each query may see; the persistent tokens are visible to every query. For
        layers whose keys are not the queries' own tokens (MAC attends over [p] || h || S)."""
        pk, pv = self._persistent_keys_values(q.size(0), None)
        if pk is not None:
            k, v = torch.cat((pk, k), dim=-2), torch.cat((pv, v), dim=-2)
            mask = torch.cat((mask.new_ones(mask.size(0), pk.size(-2)), mask), dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_dropout(self.out(y.transpose(1, 2).flatten(2)))

    def step(self, x: Tensor, state: AttentionState, prefix: Tensor | None = None) -> tuple[Tensor, AttentionState]:
        """`forward` of one token x (B, 1, dim) continuing `state`, for decoding: the query sees every cached key (no
        mask); full attention appends to its cache in place (`_append`), sliding-window keeps the last window - 1."""
        if x.dim() != 3 or x.shape[1:] != (1, self.dim) or state.keys.size(0) != x.size(0):
            raise ValueError(f"step expects x of shape ({state.keys.size(0)}, 1, {self.dim}), got {tuple(x.shape)}")
        q, (k, v) = self.queries(x, state.offset), self.keys_values(x, state.offset)
        if self.window is None:
            k, v = _append(state.keys, k), _append(state.values, v)
            cached_k, cached_v = k, v
        else:
            k, v = torch.cat((state.keys, k), dim=2), torch.cat((state.values, v), dim=2)
            keep = min(self.window - 1, k.size(2))
            cached_k, cached_v = k[:, :, k.size(2) - keep:], v[:, :, v.size(2) - keep:]
        pk, pv = self._persistent_keys_values(x.size(0), prefix)
        if pk is not None:
            k, v = torch.cat((pk, k), dim=-2), torch.cat((pv, v), dim=-2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = self.out_dropout(self.out(y.transpose(1, 2).flatten(2)))
        return y, AttentionState(cached_k, cached_v, state.offset + 1)

    def _slots(self, capacity: int) -> int:
        return capacity if self.window is None else self.window

    def decode_state(self, state: AttentionState, capacity: int) -> AttentionDecodeState:
        """`state` as a ring cache; capacity: the most tokens the sequence will hold (full attention's slots)."""
        slots, cached = self._slots(capacity), state.keys.size(2)
        if state.offset > capacity:
            raise ValueError(f"the state holds {state.offset} tokens, more than the capacity {capacity}")
        at = torch.arange(state.offset - cached, state.offset, device=state.keys.device) % slots
        ring = lambda cache: cache.new_zeros(*cache.shape[:2], slots, cache.size(3)).index_copy_(2, at, cache)  # noqa
        return AttentionDecodeState(ring(state.keys), ring(state.values),
                                    torch.tensor(state.offset, device=state.keys.device))

    def decode_step(self, x: Tensor, state: AttentionDecodeState,
                    prefix: Tensor | None = None) -> tuple[Tensor, AttentionDecodeState]:
        """`step` on a `decode_state`: the token's key and value take its slot, in place (continue from the returned
        state only: a copy of the cache per token would cost O(slots)), overwriting the one position that has just
        left the window; the query then sees the filled slots (the whole ring once full) and the persistent tokens."""
        q, (k, v) = self.queries(x, state.offset), self.keys_values(x, state.offset)
        slots = state.keys.size(2)
        slot = (state.offset % slots).reshape(1)
        keys, values = state.keys.index_copy_(2, slot, k), state.values.index_copy_(2, slot, v)
        mask = torch.arange(slots, device=x.device) <= state.offset
        pk, pv = self._persistent_keys_values(x.size(0), prefix)
        if pk is not None:
            keys, values = torch.cat((pk, keys), dim=2), torch.cat((pv, values), dim=2)
            mask = torch.cat((mask.new_ones(pk.size(2)), mask))
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[None])
        return self.out(y.transpose(1, 2).flatten(2)), AttentionDecodeState(state.keys, state.values,
                                                                            state.offset + 1)

    def state_from_decode(self, state: AttentionDecodeState) -> AttentionState:
        """The `step` state equal to a `decode_state`: the cached positions in order."""
        offset, slots = int(state.offset), state.keys.size(2)
        cached = offset if self.window is None else min(self.window - 1, offset)
        at = torch.arange(offset - cached, offset, device=state.keys.device) % slots
        return AttentionState(state.keys.index_select(2, at), state.values.index_select(2, at), offset)

    def forward(self, x: Tensor, state: AttentionState | None = None,
                prefix: Tensor | None = None) -> tuple[Tensor, AttentionState]:
        """x: (B, T, dim) -> (y: (B, T, dim), the state after these T tokens). prefix: (B, n, dim) tokens that every
        position sees, whatever the window, in place of the learned persistent tokens (MAL's memory-read ones)."""
        if x.dim() != 3 or x.size(-1) != self.dim:
            raise ValueError(f"expected input of shape (B, T, {self.dim}), got {tuple(x.shape)}")
        batch, length, _ = x.shape
        offset = 0 if state is None else state.offset
        if state is not None and state.keys.size(0) != batch:
            raise ValueError(f"state batch size {state.keys.size(0)} does not match input batch size {batch}")

        q, (k, v) = self.queries(x, offset), self.keys_values(x, offset)
        if state is not None:
            k, v = torch.cat((state.keys, k), dim=2), torch.cat((state.values, v), dim=2)
        num_past = k.size(2) - length
        pk, pv = self._persistent_keys_values(batch, prefix)

        if self.window is None or length <= self.window:
            y = self._attend(q, k, v, pk, pv, num_past)
        else:
            y = self._attend_blockwise(q, k, v, pk, pv, num_past)
        y = self.out_dropout(self.out(y.transpose(1, 2).flatten(2)))

        if self.window is not None:  # keep only what the next tokens can see; clone frees the longer buffer
            keep = min(self.window - 1, k.size(2))
            k, v = k[:, :, k.size(2) - keep :].clone(), v[:, :, v.size(2) - keep :].clone()
        return y, AttentionState(keys=k, values=v, offset=offset + length)
