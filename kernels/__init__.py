"""Triton kernels of fastppo, installed as `fastppo.kernels`, one op per module.

`fastppo.ops` asks `kernel_for(op)` for an op's Triton implementation. Modules are
imported on first use, so importing fastppo needs neither a GPU nor triton; an op whose
module does not exist yet has no kernel (None), and ops falls back or raises as its
backend rule says.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

# op name → module (kernels/<module>.py) that defines a function of that name
OP_MODULES = {
    "logprobs_from_logits": "logprobs",
    "full_kl": "full_kl",
    "kl_penalty_rewards": "kl_reward",
    "gae": "gae",
    "masked_whiten": "gae",
    "ppo_loss": "ppo_loss",
    "linear_logprobs": "linear_logprobs",
}


def kernel_for(op: str) -> Optional[Callable]:
    """The Triton implementation of `op`, or None if fastppo has none."""
    module_name = OP_MODULES.get(op)
    if module_name is None:
        return None
    qualified = f"{__name__}.{module_name}"
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:
            raise
        return None
    return getattr(module, op, None)
