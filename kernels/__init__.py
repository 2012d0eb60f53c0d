"""Triton kernels of fastppo, installed as `fastppo.kernels`, one op per module.

`fastppo.ops` looks an op up here by name (`fastppo.kernels.gae`, ...). Modules are
imported on first use, so importing fastppo needs neither a GPU nor triton; an op whose
module does not exist yet is simply absent (AttributeError), and ops falls back or
raises as its backend rule says.
"""

import importlib

# op name → module (kernels/<module>.py) that defines it
_OP_MODULES = {
    "logprobs_from_logits": "logprobs",
    "full_kl": "full_kl",
    "kl_penalty_rewards": "kl_reward",
    "gae": "gae",
    "masked_whiten": "gae",
    "ppo_loss": "ppo_loss",
}


def __getattr__(name):
    module_name = _OP_MODULES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module_name}":
            raise
        raise AttributeError(f"no Triton kernel module for {name} yet") from None
    return getattr(module, name)
