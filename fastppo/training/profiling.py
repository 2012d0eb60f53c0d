"""The step's named ranges for torch.profiler (`bench/tools/profile_step.py` reads them)."""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function


def profiler_range(name: str):
    """`record_function(name)` while a profiler records, else nothing: with none, each range would still cost ~7 µs of
    host time (some 45 per step)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()
