"""Titans: a neural long-term memory that learns at test time (Behrouz, Zhong, Mirrokni 2024, arXiv 2501.00663)."""

from . import hf_registration
from .memory import NeuralMemory, NeuralMemoryState
from .model import (VARIANTS, TitansConfig, TitansLM, TitansModel, TitansState, count_parameters, match_parameters,
                    preset)
from .ops import MLPMemory, MemoryState, memory_scan, memory_scan_reference

hf_registration.install()  # model type "titans" in transformers' Auto classes, once transformers is imported

__version__ = "0.1.0"

__all__ = [
    "MLPMemory", "MemoryState", "NeuralMemory", "NeuralMemoryState", "TitansConfig", "TitansLM", "TitansModel",
    "TitansState", "VARIANTS", "count_parameters", "match_parameters", "memory_scan", "memory_scan_reference", "preset",
]
