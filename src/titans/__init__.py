"""Titans: a neural long-term memory that learns at test time (arXiv 2501.00663)."""

__version__ = "0.1.0"
