"""`trl.core`'s public helpers (TRL 0.11), so `from fastppo.core import ...` works in TRL scripts.

Same names, signatures and results; the math that fastppo already has (log-probs, entropy,
masked statistics, whitening) goes through `fastppo.ops`, so each piece has one implementation.
Differences, all documented in docs/trl-compatibility.md: results of the ops are float32
whatever the input dtype (TRL keeps the input's), and `masked_var` of a single masked position
is 0 (TRL divides by zero there).
"""

from __future__ import annotations

import contextlib
import gc
import random
import warnings
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import ops

__all__ = [
    "WANDB_PADDING", "LengthSampler", "PPODecorators", "add_suffix", "average_torch_dicts", "clip_by_value",
    "convert_to_scalar", "entropy_from_logits", "flatten_dict", "logprobs_from_logits", "masked_mean", "masked_var",
    "masked_whiten", "pad_to_size", "randn_tensor", "respond_to_batch", "set_seed", "stack_dicts", "stats_to_np",
    "top_k_top_p_filtering", "whiten",
]

WANDB_PADDING = -1  # what stack_dicts pads ragged statistics with


# --------------------------------------------------------------------------- math, through fastppo.ops

def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Log-prob of each label `[B, T]` from logits `[B, T, V]`; `gather=False`: the whole log-softmax."""
    if not gather:
        return torch.log_softmax(logits, dim=-1)
    return ops.logprobs_from_logits(logits, labels)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, `[...]`."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # unused by the entropy
    return ops.logprobs_from_logits(logits, labels, return_entropy=True)[1]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Mean of `values` where `mask` is set: over everything, or along `axis`."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return ops.masked_mean(values, mask)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is set (Bessel-corrected when `unbiased`)."""
    if unbiased and float(mask.sum()) == 0:
        raise ValueError("The sum of the mask is zero, which can happen when `mini_batch_size=1`; try increasing "
                         "`mini_batch_size` or `gradient_accumulation_steps`")
    return ops.masked_var(values, mask, unbiased)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − masked mean) / sqrt(masked var + 1e-8); `shift_mean=False` adds the mean back."""
    return ops.masked_whiten(values, mask, shift_mean=shift_mean)


def whiten(values: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`masked_whiten` over every element."""
    return ops.masked_whiten(values, torch.ones_like(values, dtype=torch.bool), shift_mean=shift_mean)


def clip_by_value(x: torch.Tensor, tensor_min, tensor_max) -> torch.Tensor:
    """max(min(x, tensor_max), tensor_min), element-wise; the bounds may be tensors or numbers."""
    upper = torch.as_tensor(tensor_max, dtype=x.dtype, device=x.device)
    lower = torch.as_tensor(tensor_min, dtype=x.dtype, device=x.device)
    return torch.maximum(torch.minimum(x, upper), lower)


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                          filter_value: float = -float("inf"), min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Logits `[B, V]` with everything outside the top-k and the top-p nucleus set to `filter_value`
    (transformers' own logits warpers)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k > 0:
        logits = TopKLogitsWarper(top_k=top_k, filter_value=filter_value,
                                  min_tokens_to_keep=min_tokens_to_keep)(None, logits)
    if 0 <= top_p <= 1.0:
        logits = TopPLogitsWarper(top_p=top_p, filter_value=filter_value,
                                  min_tokens_to_keep=min_tokens_to_keep)(None, logits)
    return logits


# --------------------------------------------------------------------------- statistics dicts

def flatten_dict(nested: Dict, sep: str = "/") -> Dict:
    """{"a": {"b": 1}} → {"a/b": 1}; a key containing `sep` is a ValueError."""
    flat = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if sep in key:
                raise ValueError(f"separator '{sep}' not allowed to be in key '{key}'")
            if isinstance(value, Mapping):
                walk(value, prefix + key + sep)
            else:
                flat[prefix + key] = value

    walk(nested, "")
    return flat


def convert_to_scalar(stats: Dict) -> Dict:
    """Single-element tensors and arrays (shape () or (1,)) → Python numbers; everything else as is."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, (torch.Tensor, np.ndarray)) and (value.ndim == 0 or tuple(value.shape) == (1,)):
            value = value.item()
        out[key] = value
    return out


def stack_dicts(stats_dicts: List[Dict]) -> Dict:
    """Per key, the flattened tensors of every dict as rows `[n, longest]`, padded with WANDB_PADDING."""
    return {key: torch.nn.utils.rnn.pad_sequence([torch.flatten(d[key]) for d in stats_dicts], batch_first=True,
                                                 padding_value=WANDB_PADDING)
            for key in stats_dicts[0]}


def add_suffix(input_dict: Dict, suffix: str) -> Dict:
    return {key + suffix: value for key, value in input_dict.items()}


def pad_to_size(tensor: torch.Tensor, size: int, dim: int = 1, padding: int = 50256) -> torch.Tensor:
    """`tensor` right-padded with `padding` to `size` along its last dim (`dim` is the dim whose size is checked)."""
    if tensor.size(dim) == size:
        return tensor
    return torch.nn.functional.pad(tensor, (0, size - tensor.size(dim)), "constant", padding)


def average_torch_dicts(list_of_dicts: List[Dict]) -> Dict:
    """Per key, the mean of the dicts' tensors stacked along a new first dim."""
    return {key: torch.mean(torch.stack([d[key] for d in list_of_dicts]), dim=0) for key in list_of_dicts[0]}


def stats_to_np(stats_dict: Dict) -> Dict:
    """Tensors → numpy arrays (bfloat16 through float32); numpy/Python numbers → float (strings stay)."""
    out = {}
    for key, value in stats_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        if np.isscalar(value) and not isinstance(value, (str, bytes)):
            value = float(value)
        out[key] = value
    return out


# --------------------------------------------------------------------------- sampling and seeds

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


def randn_tensor(shape: Sequence[int], generator: Union[torch.Generator, List[torch.Generator], None] = None,
                 device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None,
                 layout: Optional[torch.layout] = None) -> torch.Tensor:
    """Standard-normal noise of `shape` on `device` (CPU by default), as TRL's (and diffusers') helper.

    `generator`: one generator, or a list of `shape[0]` generators, row i drawn from generator i (each row then
    reproducible on its own). A CPU generator for another device draws on the CPU, then moves the result (with
    a warning, except for MPS). Raises ValueError for a generator on another accelerator than `device`, or a list
    whose length is not `shape[0]`.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    layout = torch.strided if layout is None else layout
    generators = generator if isinstance(generator, (list, tuple)) else None
    if generators is not None and len(generators) == 1:
        generators, generator = None, generators[0]
    draw_device = device
    if generator is not None:
        generator_device = torch.device((generators or [generator])[0].device)
        if generator_device.type == "cpu" and device.type != "cpu":
            draw_device = generator_device  # a CPU generator draws CPU numbers only
            if device.type != "mps":
                warnings.warn(f"randn_tensor: the generator is on the CPU but device={device}; drawing on the CPU, "
                              "then moving (a generator on that device would skip the copy)")
        elif generator_device.type != device.type:
            raise ValueError(f"randn_tensor: cannot draw a {device.type} tensor from a {generator_device.type} "
                             "generator; pass device= of the generator's type")
    if generators is None:
        return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype,
                           layout=layout).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"randn_tensor: generator is a list of {len(generators)} generators; it needs one per row "
                         f"of shape[0]={shape[0]}")
    row = (1, *shape[1:])
    rows = [torch.randn(row, generator=g, device=draw_device, dtype=dtype, layout=layout) for g in generators]
    return torch.cat(rows).to(device)


def set_seed(seed: int) -> None:
    """Seed `random`, numpy and torch (every device) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices, CUDA included


class PPODecorators:
    """TRL's `PPODecorators.empty_device_cache()`: after the block, hand cached device memory back
    when `optimize_device_cache` is set (PPOConfig.optimize_device_cache does the same in fastppo)."""

    optimize_device_cache = False

    @classmethod
    @contextlib.contextmanager
    def empty_device_cache(cls):
        yield
        if cls.optimize_device_cache:
            from accelerate.utils.memory import clear_device_cache

            gc.collect()
            clear_device_cache(garbage_collection=True)
