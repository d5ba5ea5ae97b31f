"""`TitansCache`: the streaming state of every layer of a `TitansForCausalLM`, the cache of transformers' generate()."""

from __future__ import annotations

from titans.model import TitansState


class TitansCache:
    """A `TitansState` (every layer's memory, attention keys and values, pending chunk tokens) that each forward pass
    advances in place: decoding with it gives the logits of recomputing the whole sequence."""

    # Read by transformers' generate(): a memory state cannot be cut back to an earlier token (no assisted decoding,
    # no deferred stop) nor compiled as a fixed-shape cache, and it is recurrent in every layer: generate() need not
    # slice input_ids for it (TitansForCausalLM.prepare_inputs_for_generation feeds the tokens it has not read).
    is_compileable = False
    is_croppable = False
    is_linear = (True,)

    def __init__(self, state: TitansState | None = None):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far."""
        return 0 if self.state is None else self.state.position

    def __repr__(self) -> str:
        return f"TitansCache(position={self.get_seq_length()})"
