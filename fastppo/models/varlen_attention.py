"""Varlen attention for packed rows: no dense mask, no host read.

transformers 5.24 on "sdpa" (and "eager") turns a packed row (`attention_mask=None`, position ids
restarting at 0) into a dense block-diagonal `[1, 1, N, N]` mask: `masking_utils._preprocess_mask_arguments`
calls `find_packed_sequence_indices`, whose `(... == 0).all()` test is read on the host, and `sdpa_mask` then
materialises the mask. GPT-2 adds one more read (`warn_if_padding_and_no_attention_mask` looks for the pad id
in `input_ids` whenever the mask is None).

`install(model)` switches an "sdpa" model to the attention implementation registered here, `NAME`. Its
attention function dispatches on the call's own kwargs, so a layer recomputed under gradient checkpointing
(same kwargs, outside any context manager) takes the same path:

- with `cu_seq_lens_q` (transformers' FlashAttentionKwargs, which GPT-2 and Llama forward through
  `**kwargs` down to the attention function): varlen attention over the packed sequences;
- without: transformers' own `sdpa_attention_forward`, with `sdpa_mask` registered as the mask function,
  so padded batches and `generate` run exactly as on "sdpa".

A caller whose rows are unpadded passes `causal_kwargs(device)` instead: the same marker, and SDPA's
own causal path. The packed caller passes `packed_kwargs(lengths, device)`. Its `attention_mask` is an empty 4D tensor: a
4D mask is returned as is by `_preprocess_mask_arguments` before it looks at position ids, so neither
`find_packed_sequence_indices` nor the mask function runs, and it is not None, so GPT-2 skips its pad check.
The attention function ignores that marker on the packed path and refuses it on any other.

Older transformers (4.46 among those fastppo supports) have no attention-implementation registry
(`AttentionInterface`, `masking_utils`, `integrations.sdpa_attention`): there `AVAILABLE` is False, nothing is
registered and `install` leaves every model on its own implementation (`UNAVAILABLE` says what is missing).
Unpadded and padded passes then run as transformers runs them, and `padding_free` is refused at construction
(`fastppo.training.packing.check_model_packs`: those versions attend across packed sequences on SDPA/eager).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:  # the registry of attention implementations (transformers 5; absent from 4.46)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:
    AVAILABLE, UNAVAILABLE = False, f"transformers has no attention-implementation registry ({error})"
else:
    AVAILABLE, UNAVAILABLE = True, None

__all__ = ["AVAILABLE", "CAUSAL", "KERNELS", "NAME", "SEQ_LENS", "UNAVAILABLE", "call_kwargs", "causal_kwargs",
           "choose_kernel", "install", "packed_kwargs"]

# No "sdpa"/"flash"/"flex"/"paged" in the name: transformers picks checks and fallbacks by substring.
NAME = "fastppo_varlen"
KERNELS = ("flash_attn", "torch_varlen", "sdpa_per_sequence")
SEQ_LENS = "fastppo_seq_lens"  # our own kwarg: the lengths as Python ints, for the per-sequence path
CAUSAL = "fastppo_causal"  # our own kwarg: unpadded rows, plain causal attention (causal_kwargs)
_HALF = (torch.float16, torch.bfloat16)  # what the varlen CUDA kernels compute in


@functools.cache
def _choose(device_type: str, index) -> str:
    if device_type == "cuda" and torch.cuda.get_device_capability(index) >= (8, 0):  # both need Ampere+
        try:
            import flash_attn  # noqa: F401
            return "flash_attn"
        except ImportError:
            pass
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
            return "torch_varlen"
        except ImportError:
            pass
    return "sdpa_per_sequence"


def choose_kernel(device) -> str:
    """The varlen kernel for `device` (decided once per device): "flash_attn" (the flash_attn package), else
    "torch_varlen" (`torch.nn.attention.varlen.varlen_attn`), both on CUDA only, else "sdpa_per_sequence"."""
    device = torch.device(device)
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    return _choose(device.type, index)


def _is_marker(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-2:] == (0, 0)


def _per_sequence(query, key, value, lengths, dropout, scaling, causal) -> torch.Tensor:
    """[1, H, N, D] → [1, N, H, D], each sequence's slice through SDPA alone (masks at most [L, L] inside)."""
    gqa = query.shape[1] != key.shape[1]
    outputs, start = [], 0
    for length in lengths:
        end = start + length
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=gqa))
        start = end
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _packed(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    if attention_mask is not None and not _is_marker(attention_mask):
        raise ValueError(f"{NAME}: a packed call (cu_seq_lens_q given) must pass packed_kwargs()' attention_mask; "
                         "with attention_mask=None transformers builds a dense [N, N] mask from the position ids")
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(f"{NAME}: packed attention takes one row of self-attention without a cache, got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME} does not support softcap")
    max_q, max_k = kwargs["max_length_q"], kwargs["max_length_k"]
    window = kwargs.get("sliding_window")
    if window is not None and max_k > window:  # a window no sequence exceeds changes nothing
        raise NotImplementedError(f"{NAME}: sliding window {window} shorter than a packed sequence ({max_k})")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kernel = choose_kernel(query.device)
    if kernel != "sdpa_per_sequence" and query.dtype not in _HALF:
        kernel = "sdpa_per_sequence"  # the flash kernels have no float32
    if kernel == "sdpa_per_sequence":
        lengths = kwargs.get(SEQ_LENS)
        if lengths is None or sum(lengths) != query.shape[2]:
            raise ValueError(f"{NAME}: the per-sequence path needs the packed lengths on the host: pass "
                             f"packed_kwargs() ({SEQ_LENS}={lengths!r} for {query.shape[2]} tokens)")
        return _per_sequence(query, key, value, lengths, dropout, scaling, causal), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D], last dim contiguous
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
    if kernel == "flash_attn":
        from flash_attn import flash_attn_varlen_func  # GQA: k/v may have fewer heads

        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout,
                                     softmax_scale=scaling, causal=causal)
    else:
        from torch.nn.attention.varlen import varlen_attn

        if dropout:
            raise ValueError(f"{NAME}: torch's varlen_attn has no dropout (got {dropout}); install flash_attn")
        out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, enable_gqa=q.shape[1] != k.shape[1],
                          window_size=(-1, 0) if causal else (-1, -1))
    return out.unsqueeze(0), None  # [1, N, H, D], as sdpa_attention_forward returns


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """The registered attention function: varlen when the call carries `cu_seq_lens_q`, else transformers' SDPA."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return _packed(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if _is_marker(attention_mask):
        if kwargs.pop(CAUSAL, False):  # unpadded rows: SDPA's own causal path, no mask at all
            return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        raise ValueError(f"{NAME}: packed_kwargs()' attention_mask without its cu_seq_lens_q; pass all of "
                         "packed_kwargs() (or causal_kwargs()) or a real attention mask")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


# Both class-wide mappings: every model and `_preprocess_mask_arguments` (which tests `_global_mapping`) see them.
if AVAILABLE:
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model) -> str:
    """Switch `model` (a transformers causal LM, or fastppo's value-head model: its `.causal_lm`) from "sdpa"
    to `NAME`; return the kernel packed calls will use on its device. A model on another implementation is
    left alone: "transformers:<implementation>" (eager, flash_attention_2, ...), and so is every model where
    transformers has no registry to switch to (`AVAILABLE` False). The switch lives in
    `config._attn_implementation_internal`, which `save_pretrained` does not write."""
    lm = getattr(model, "causal_lm", model)
    current = lm.config._attn_implementation
    if current == "sdpa" and AVAILABLE:
        lm.set_attn_implementation(NAME)  # a model that cannot switch logs a warning and stays on sdpa
        current = lm.config._attn_implementation
    if current != NAME:
        return f"transformers:{current}"
    return choose_kernel(lm.device)


def packed_kwargs(lengths: list[int], device) -> dict:
    """The kwargs of the model call for one packed row `[1, sum(lengths)]`, sequences of these lengths in order:

        model(input_ids=row, use_cache=False, **packed_kwargs(lengths, device))

    `position_ids` [1, N] (0 … n-1 per sequence), `cu_seq_lens_q`/`_k` int32 [S+1], `max_length_q`/`_k` ints,
    the lengths themselves (for the CPU path) and the marker `attention_mask` (see the module docstring). Built
    on the host, sent in one copy; nothing is read back."""
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths!r}")
    device = torch.device(device)
    sizes = torch.tensor(lengths, dtype=torch.int64)
    total = int(sum(lengths))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=cu[1:])
    positions = torch.arange(total) - torch.repeat_interleave(cu[:-1], sizes, output_size=total)
    host = torch.cat([positions, cu])
    if device.type == "cuda":
        host = host.pin_memory()  # so that the copy is asynchronous
    both = host.to(device, non_blocking=True)
    return call_kwargs(both[:total].view(1, total), both[total:], lengths)


def call_kwargs(position_ids: torch.Tensor, cu_seq_lens: torch.Tensor, lengths) -> dict:
    """`packed_kwargs` from tensors the caller already has on the device: position ids `[1, N]` and the
    cumulative lengths `[S+1]` (any integer dtype) of the sequences of `lengths` (host ints)."""
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    longest = max(lengths)
    return {
        "position_ids": position_ids,
        "attention_mask": torch.empty((1, 1, 0, 0), dtype=torch.bool, device=position_ids.device),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
        SEQ_LENS: tuple(lengths),
    }


def causal_kwargs(device) -> dict:
    """The kwargs of a model call on unpadded rows `[b, L]`: plain causal attention through SDPA's `is_causal` path
    (its flash kernel on a GPU), as transformers takes it for an all-ones mask, but decided on the host: the
    marker mask skips transformers' check of the mask (a host read) and GPT-2's look for pad tokens."""
    return {"attention_mask": torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device), CAUSAL: True}
