"""Small helpers TRL scripts import from `trl.core`, so `from fastppo.core import ...` works too."""

from __future__ import annotations

import numpy as np
import torch
from transformers import set_seed

__all__ = ["LengthSampler", "respond_to_batch", "set_seed"]


class LengthSampler:
    """Draws a length uniformly from [min_value, max_value) with numpy's global RNG (as TRL does)."""

    def __init__(self, min_value: int, max_value: int):
        if not min_value < max_value:
            raise ValueError(f"LengthSampler needs min_value < max_value, got {min_value} and {max_value}")
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))


@torch.no_grad()
def respond_to_batch(model, queries: torch.Tensor, txt_len: int = 20, top_k: int = 0, top_p: float = 1.0):
    """Sample `txt_len` tokens after each row of `queries` `[B, L]` → `[B, txt_len]` (TRL's early helper)."""
    generated = model.generate(
        input_ids=queries, attention_mask=torch.ones_like(queries), do_sample=True, top_k=top_k, top_p=top_p,
        max_new_tokens=txt_len, min_new_tokens=txt_len,
    )
    return generated[:, queries.shape[1]:]
