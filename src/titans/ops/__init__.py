"""Functional ops of Titans' neural memory: the fast chunked scan and its naive reference."""

from .activations import ACTIVATIONS, get_activation
from .memory_scan import MemoryState, PendingTokens, current_weights, memory_retrieve, memory_scan
from .mlp_memory import MLPMemory, Params
from .reference import memory_scan_reference

__all__ = [
    "ACTIVATIONS", "MLPMemory", "MemoryState", "Params", "PendingTokens", "current_weights", "get_activation",
    "memory_retrieve", "memory_scan", "memory_scan_reference",
]
