"""Next-token log-probs and values from one forward pass of a value-head model, three ways.

- "full" (TRL's way, the default): the LM head over every position, log-probs from the
  `[b, L-1, V]` logits.
- "response": the LM head only at response positions (`mask` set): `[n, V]` logits for
  the n response tokens instead of `[b, L-1, V]`.
- "fused": no logits at all: `ops.linear_logprobs` from the response positions' hidden
  states and the LM head weight, O(chunk × V) memory.

All three give the same log-probs at response positions; "response" and "fused" leave 0
elsewhere (those positions are masked out of every loss and statistic but
`objective/logprobs`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import ops
from .value_head import LOGIT_TRANSFORMS, AutoModelForCausalLMWithValueHead


def head_mode(config) -> str:
    """"full", "response" or "fused", from a PPOConfig."""
    if config.fused_lm_head:
        return "fused"
    return "response" if config.response_only_logits else "full"


def check_plain_lm_head(model: AutoModelForCausalLMWithValueHead) -> None:
    """Raise unless the model's logits are exactly `lm_head(last_hidden_state)`."""
    config = model.causal_lm.config
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"response_only_logits/fused_lm_head need logits = lm_head(hidden), but this model's "
                             f"config sets {name}={value}; use the default full-logits path")


class TokenOutputs(NamedTuple):
    logprobs: torch.Tensor  # [b, L-1] float32, log-prob of token t+1 at position t
    entropy: Optional[torch.Tensor]  # [b, L-1] or None
    values: Optional[torch.Tensor]  # [b, L-1]; None when the model was called with return_values=False
    logits: Optional[torch.Tensor]  # "full": [b, L-1, V] view; "response": [n, V]; "fused": None


# The logits come straight out of the LM head (whose backward reads its input and weight, not
# its output) and nothing reads them after the loss's backward: the Triton logprobs backward
# may overwrite them with their gradient (`inplace_backward`), one [b, L-1, V] buffer less.
# A model whose graph did save them would raise at backward (the kernel bumps their version).


def token_outputs(
    model,
    unwrapped: AutoModelForCausalLMWithValueHead,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    backend: str,
    return_entropy: bool = False,
    keep_logits: bool = False,
    response_positions: Optional[tuple] = None,
    encoder_input_ids: Optional[torch.Tensor] = None,
    **model_kwargs,
) -> TokenOutputs:
    """Run `model` (possibly accelerate-wrapped; `unwrapped` is the bare module) on a batch.

    input_ids `[b, L]`; mask `[b, L-1]` marks the response positions.
    `keep_logits` ("full" only): logits the caller keeps, as TRL's model returns them (float32, never
    overwritten by the log-probs' backward). `response_positions` ("response"/"fused"): (rows, columns) of the
    response positions, built on the host (else found from `mask`: a host read). `model_kwargs` go to the model
    (`attention_mask`, and a packed batch's `position_ids`, `use_cache=False`). `encoder_input_ids`: an
    encoder-decoder model's encoder input ("full" only); `input_ids` are then the decoder's (the rows scored).
    """
    if keep_logits and mode != "full":
        raise ValueError(f"keep_logits needs the full-logits path, not {mode!r}")
    labels = input_ids[:, 1:]
    if encoder_input_ids is not None:
        if mode != "full":
            raise ValueError(f"encoder-decoder models run the full-logits path, not {mode!r}")
        model_kwargs["decoder_input_ids"], input_ids = input_ids, encoder_input_ids
    if mode == "full":
        logits, _, values = model(input_ids=input_ids, upcast_logits=keep_logits, **model_kwargs)
        logits = logits[:, :-1]
        out = ops.logprobs_from_logits(logits, labels, return_entropy=return_entropy, backend=backend,
                                       inplace_backward=not keep_logits)
        logprobs, entropy = out if return_entropy else (out, None)
        return TokenOutputs(logprobs, entropy, None if values is None else values[:, :-1], logits)

    hidden, _, values = model(input_ids=input_ids, output="hidden", **model_kwargs)
    if response_positions is None:
        positions = mask.bool()
        response_hidden, response_labels = hidden[:, :-1][positions], labels[positions]  # [n, H], [n]
    else:  # every response position, masked or not (masked ones are zeroed after)
        positions = response_positions
        response_hidden, response_labels = hidden[positions], labels[positions]
    head = unwrapped.lm_head
    logits = None
    if mode == "fused":
        out = ops.linear_logprobs(response_hidden, head.weight, response_labels, bias=head.bias,
                                  return_entropy=return_entropy, backend=backend)
    else:
        logits = torch.nn.functional.linear(response_hidden, head.weight, head.bias)
        out = ops.logprobs_from_logits(logits, response_labels, return_entropy=return_entropy, backend=backend,
                                       inplace_backward=True)
    logprobs, entropy = out if return_entropy else (out, None)
    return TokenOutputs(_scatter(logprobs, positions, mask), _scatter(entropy, positions, mask) if return_entropy
                        else None, None if values is None else values[:, :-1], logits)


def full_kl(policy: TokenOutputs, reference: TokenOutputs, mask: torch.Tensor, backend: str,
            response_positions: Optional[tuple] = None) -> torch.Tensor:
    """Exact per-position KL `[b, L-1]` from two outputs' logits (0 off the response in "response" mode, whose
    logits are at `response_positions`, or at `mask`'s positions when those are None)."""
    kl = ops.full_kl(policy.logits, reference.logits, backend=backend)
    if policy.logits.dim() == 2:  # response rows only
        kl = _scatter(kl, mask.bool() if response_positions is None else response_positions, mask)
    return kl


def _scatter(values: torch.Tensor, positions, mask: torch.Tensor) -> torch.Tensor:
    """`[n]` values at `positions` → `mask`'s shape `[b, L-1]`, zeros elsewhere and where `mask` is 0
    (differentiable). `positions`: a bool tensor of that shape, or (rows, columns) index tensors."""
    out = values.new_zeros(mask.shape)
    if isinstance(positions, torch.Tensor):
        return out.masked_scatter(positions, values)
    return out.index_put(positions, values) * mask
