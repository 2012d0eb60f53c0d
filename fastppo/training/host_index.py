"""Index tensors built on the host from lengths the host already knows, sent to the device without a wait.

The step knows every row's length as a Python int (the lists it was given), so where a row's
tokens go in a padded or packed layout is host arithmetic. Building those positions with numpy and
copying them once is one launch for the whole batch instead of one per row, and needs no read of a
device value: a boolean-mask index (`x[mask]`) or `.tolist()` on the device would wait for it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a tensor on `device`: on CUDA through pinned memory with `non_blocking`, so the host
    does not wait for the device's queue (a pageable, blocking copy synchronises the stream)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def spans(starts: Sequence[int], lengths: Sequence[int], width: int) -> np.ndarray:
    """Flat positions (row-major, rows of `width`; 0: all in one row) of row i's columns
    `starts[i] … starts[i]+lengths[i]-1`, row after row: int64 `[Σ lengths]`."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    firsts = np.arange(len(lengths), dtype=np.int64) * width + starts
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(firsts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def place(values: Sequence[torch.Tensor], starts: Sequence[int], width: int, fill, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """`[B, width]` of `fill` with row i's `values[i]` (1-D, on `device`) at columns from `starts[i]`."""
    out = torch.full((len(values), width), fill, dtype=dtype, device=device)
    index = to_device(spans(starts, [len(v) for v in values], width), device)
    out.view(-1)[index] = torch.cat(list(values)).to(dtype)
    return out
