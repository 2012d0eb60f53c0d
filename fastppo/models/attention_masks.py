"""The attention mask a forward pass hands the model, in a form the model never inspects on the host.

Given a 2-D padding mask, transformers 5 asks the device whether it holds any pad before choosing
SDPA's `is_causal` path (`masking_utils._ignore_causal_mask_sdpa`: a host read per forward), and
GPT-2 checks for pad tokens when no mask is given (`warn_if_padding_and_no_attention_mask`). The
trainer knows each row's length on the host, so it knows whether a pass is padded:

- unpadded: SDPA's causal path without a mask, as the model takes it after its check — through
  `varlen_attention`'s causal marker where the trainer installed that implementation (every SDPA
  model), else `None` where that costs no read;
- padded: the 4-D mask transformers itself would build (`create_causal_mask` without the
  `is_causal` shortcut, which padding rules out anyway), which the model uses as it is — made
  here ("built": causal and key padding in a few ops, a fifth of transformers' host time) where
  that gives transformers' tensor element for element, else by transformers ("prepared").

Either form is what the model would have computed from the 2-D mask, so the numbers do not move.
`choose_form` finds, once per model, which forms it accepts — by running a padded and an unpadded
probe both ways and comparing the logits, and the built masks against transformers' own — and
which cost a read: a model that builds its mask without asking the device (eager attention) takes
the built mask where it matches, else keeps the 2-D mask, as does one whose layers do not all use
full causal attention (sliding windows).

On transformers without `masking_utils` (4.46) each model builds its 4-D mask inside its own forward, so
there is no "prepared" form: a padded pass keeps the 2-D mask, and an unpadded one drops it only where the
probe shows that costs no read and changes no logit.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..host_reads import HostReads
from . import varlen_attention

try:
    from transformers.masking_utils import create_causal_mask
except ImportError:  # transformers 4.46: no shared mask builder (see the module docstring)
    create_causal_mask = None


class MaskForm(NamedTuple):
    unpadded: str  # "causal" (varlen_attention's causal marker), "none" (no mask), "built"/"prepared" (4-D), "raw"
    padded: str  # "built", "prepared" or "raw"


RAW = MaskForm("raw", "raw")


def _full_attention_only(config) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


def prepared(causal_lm, attention_mask: torch.Tensor) -> torch.Tensor:
    """The 4-D mask `causal_lm` builds from a `[b, L]` padding mask when it cannot skip it (transformers 5)."""
    if create_causal_mask is None:
        raise RuntimeError("this transformers has no masking_utils.create_causal_mask to prepare a 4-D mask with")
    batch, width = attention_mask.shape
    shape_only = torch.empty((batch, width, 0), dtype=causal_lm.dtype, device=attention_mask.device)
    return create_causal_mask(causal_lm.config, shape_only, attention_mask.bool(), None, allow_is_causal_skip=False)


def built(causal_lm, attention_mask: torch.Tensor) -> torch.Tensor:
    """`prepared`'s mask made here in a few ops (transformers' builder costs ~45 µs of host time per pass): causal and
    key padding, as an additive mask of the model's dtype for eager attention, as booleans otherwise. Used only where
    `choose_form` found it equal to `prepared`'s, element for element."""
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    keep = causal & attention_mask.bool()[:, None, None, :]
    if causal_lm.config._attn_implementation != "eager":
        return keep
    dtype = causal_lm.dtype
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def _builds_as_transformers(causal_lm, masks) -> bool:
    """Whether `built` gives exactly `prepared`'s tensor (shape, dtype, every element) for each of `masks`."""
    for mask in masks:
        want, got = prepared(causal_lm, mask), built(causal_lm, mask)
        if not (isinstance(want, torch.Tensor) and want.shape == got.shape and want.dtype == got.dtype
                and torch.equal(want, got)):
            return False
    return True


def mask_kwargs(form: MaskForm, causal_lm, attention_mask: Optional[torch.Tensor], padded: Optional[bool]) -> dict:
    """The attention kwargs of a pass whose padding is `padded` (None: not known on the host)."""
    if attention_mask is None or padded is None:
        return {"attention_mask": attention_mask}
    kind = form.padded if padded else form.unpadded
    if kind == "causal":
        return varlen_attention.causal_kwargs(attention_mask.device)
    if kind == "none":
        return {"attention_mask": None}
    if kind == "built":
        return {"attention_mask": built(causal_lm, attention_mask)}
    return {"attention_mask": prepared(causal_lm, attention_mask) if kind == "prepared" else attention_mask}


@torch.no_grad()
def choose_form(model, unwrapped, vocab_size: int, device: torch.device, float32: bool = True) -> MaskForm:
    """The forms `model` (the value-head model, possibly accelerate-wrapped; `unwrapped` the bare one) accepts
    with the logits of the 2-D mask. Every process must call it: under ZeRO-3/FSDP a forward is collective."""
    causal_lm = unwrapped.causal_lm
    if not _full_attention_only(causal_lm.config):
        return RAW
    ids = torch.tensor([[3, 5, 7, 11, 13], [17, 19, 23, 29, 31]], device=device) % vocab_size
    padded_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], device=device)
    unpadded_mask = torch.ones_like(padded_mask)
    # the bare module's mode: a DeepSpeed engine's own `training` flag does not follow its train()/eval()
    was_training = unwrapped.training
    unwrapped.eval()

    def logits(mask, **kwargs):
        return model(input_ids=ids, use_cache=False, return_values=False,  # logits only: the value head stays idle
                     **(kwargs or {"attention_mask": mask}))[0].float()

    def same(got, want, where):
        tolerance = (1e-5 if float32 else 2e-2) * (1.0 + float(want[where].abs().max()))
        return bool((got[where] - want[where]).abs().max() <= tolerance)

    def read_free(mask, **kwargs):
        with HostReads() as reads:
            out = logits(mask, **kwargs)
        return out, reads.total == 0

    try:  # the same five forwards on every process, whatever they show (collective under ZeRO-3/FSDP)
        real, everywhere = padded_mask.bool(), torch.ones_like(padded_mask, dtype=torch.bool)
        padded_raw, padded_raw_free = read_free(padded_mask)
        can_prepare = create_causal_mask is not None  # the same on every process
        padded_prepared = logits(prepared(causal_lm, padded_mask)) if can_prepare else None
        unpadded_raw, unpadded_raw_free = read_free(unpadded_mask)
        without, without_free = read_free(None)
        unpadded_prepared = logits(prepared(causal_lm, unpadded_mask)) if can_prepare else None
        varlen = causal_lm.config._attn_implementation == varlen_attention.NAME
        causal, causal_free = read_free(None, **varlen_attention.causal_kwargs(device)) if varlen else (None, False)
        left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
        builds = can_prepare and _builds_as_transformers(causal_lm, (padded_mask, unpadded_mask, left_padded))
        if builds and same(padded_prepared, padded_raw, real):  # what the model would build, built cheaper
            padded = "built"
        elif padded_raw_free or not can_prepare:  # the model builds the mask without asking the device
            padded = "raw"
        else:
            padded = "prepared" if same(padded_prepared, padded_raw, real) else "raw"
        if causal_free and same(causal, unpadded_raw, everywhere):
            unpadded = "causal"
        elif without_free and same(without, unpadded_raw, everywhere):
            unpadded = "none"
        elif builds and same(unpadded_prepared, unpadded_raw, everywhere):
            unpadded = "built"
        elif unpadded_raw_free:
            unpadded = "raw"
        else:
            unpadded = "prepared" if can_prepare and same(unpadded_prepared, unpadded_raw, everywhere) else "raw"
    except (TypeError, ValueError, RuntimeError):  # a model that refuses a 4-D mask or no mask
        return RAW
    finally:
        unwrapped.train(was_training)
    return MaskForm(unpadded, padded)
