"""Functional ops of Titans' neural memory (the fast chunked scan and its naive reference) and of the delta-rule
and TTT baselines."""

from .activations import ACTIVATIONS, get_activation
from .delta_rule import delta_rule_chunked, delta_rule_reference
from .memory_scan import (MemoryState, PendingTokens, auto_checkpoint_chunks, causal_overlap, current_weights,
                          memory_retrieve, memory_scan, memory_step, surprise_norms)
from .mlp_memory import MLPMemory, Params
from .reference import memory_scan_reference
from .ttt import TTTInnerState, TTTPending, ttt_current_weights, ttt_reference, ttt_scan, ttt_step

__all__ = [
    "ACTIVATIONS", "MLPMemory", "MemoryState", "Params", "PendingTokens", "auto_checkpoint_chunks", "causal_overlap",
    "current_weights", "delta_rule_chunked", "surprise_norms",
    "delta_rule_reference", "get_activation", "memory_retrieve", "memory_scan", "memory_scan_reference", "memory_step",
    "TTTInnerState", "TTTPending", "ttt_current_weights", "ttt_reference", "ttt_scan", "ttt_step",
]
