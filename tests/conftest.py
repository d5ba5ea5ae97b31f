"""Test-wide settings: one torch thread per test process (pytest-xdist runs one process per core; more threads
than cores makes small-tensor work many times slower)."""

import torch

torch.set_num_threads(1)
