"""The non-finite guard: an optimizer step whose gradients (or the outputs behind them) hold NaN/inf is skipped.

`StepGuard` owns it for one trainer (`PPOConfig.nonfinite_guard`). Per `step` the PPO epochs call
`begin()`, then for every mini-batch `backward_allowed(flags, index)` before its backward and
`optimizer_step(flags, index)` after it, and `settle(...)` once at the end; `failure_message`
says where a step whose every optimizer step was skipped went wrong. The flags (`output_flags`:
log-probs, values, loss) are device tensors built without a host sync; a check of the gradients
(fused, or clipping's norm) joins them at the optimizer step, and on several processes one tiny
all-reduce makes every process decide alike. A fused torch optimizer (the trainer's default Adam
is one) skips on the device, through the `found_inf` its kernels take (as torch's GradScaler uses
it): those flags are read once, in `settle`, together with whatever else the step reads then. Any
other optimizer needs the decision on the host: one read per optimizer step. DeepSpeed steps inside
backward, so there the check runs before it (`backward_allowed`, one read per mini-batch) and the
gradients are DeepSpeed's own business.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from .. import sharding

# What the flags name, in the order a NaN travels: the forward's outputs, then the loss, then the gradients.
SOURCES = ("logits", "values", "loss", "grad norm")


def output_flags(logprobs: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`[3]` bool: a non-finite log-prob (from the logits) or value on a trained position, a non-finite loss."""
    outputs = torch.stack([logprobs.detach().float(), values.detach().float()])  # both at once: a few ops in all
    bad_outputs = (~torch.isfinite(torch.where(mask.bool(), outputs, 0.0))).flatten(1).any(1)
    return torch.cat([bad_outputs, ~torch.isfinite(loss.detach()).reshape(1)])


def total_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients (0-d, device), read-only; a sharded (DTensor) norm is made whole."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def nonfinite_gradients(parameters: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d bool on `device`: whether this process's gradients (its shards, where sharded: the caller all-reduces the
    flag) hold NaN/inf. One fused check per device and dtype — GradScaler's, unscaling by exactly 1 — instead of
    the norm of every gradient (a tenth of the time); the norm where a gradient is sparse."""
    grads = [p.grad for p in parameters if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor: its local shard
    if any(g.is_sparse for g in grads):
        return ~torch.isfinite(total_grad_norm(parameters)).to(device)
    groups = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    found = torch.zeros((), device=device)
    for (grad_device, _), group in groups.items():
        found_here = torch.zeros((), device=grad_device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, torch.ones((), device=grad_device))
        found = found + found_here.to(device)
    return found > 0


def first_source(flags: list) -> Optional[str]:
    """The name of the first raised flag (SOURCES order), or None when all are clear."""
    return next((name for name, raised in zip(SOURCES, flags) if raised), None)


def first_nonfinite(named_tensors) -> Optional[str]:
    """The name of the first floating tensor of `(name, tensor)` pairs holding NaN/inf, or None (one host sync)."""
    named = [(name, tensor) for name, tensor in named_tensors if tensor.is_floating_point()]
    if not named:
        return None
    device = named[0][1].device
    bad = torch.stack([(~torch.isfinite(tensor.detach())).any().to(device) for _, tensor in named]).tolist()
    return next((name for (name, _), raised in zip(named, bad) if raised), None)


def describe(indices: range, source: str) -> str:
    """"the logits of mini-batch 3" / "the grad norm of mini-batches 2-3" (one optimizer step's mini-batches)."""
    where = f"mini-batch {indices[0]}" if len(indices) == 1 else f"mini-batches {indices[0]}-{indices[-1]}"
    return f"the {source} of {where}"


def default_adam(parameters: list, lr: float, fused: bool) -> torch.optim.Optimizer:
    """TRL's optimizer, `Adam(trainable parameters, lr)`; fused (one kernel, and a device-side skip) where
    torch has a fused Adam for every parameter's device and dtype."""
    if fused:
        try:
            return torch.optim.Adam(parameters, lr=lr, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            pass
    return torch.optim.Adam(parameters, lr=lr)


def device_skipping_optimizer(optimizer, accelerator) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer under `optimizer` if its step can be skipped on the device (fused kernels take
    `found_inf`), else None. Not with a gradient scaler: it sets `found_inf` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if getattr(accelerator, "scaler", None) is not None or not getattr(inner, "_step_supports_amp_scaling", False):
        return None
    return inner


def _passed_through(optimizer, accelerator, method: str) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer under accelerate's wrapper where the wrapper's `method` ("step" or "zero_grad") would only
    pass the call on to it (no gradient scaler, gradients synced, not XLA, not a LOMO optimizer, the method not
    replaced on the wrapper), else None. Those two methods search importlib for `lomo_optim` and read the inner
    method's signature on every call: ~5 % of a tiny model's PPO step together."""
    inner = getattr(optimizer, "optimizer", None)
    if (type(optimizer) is AcceleratedOptimizer and isinstance(inner, torch.optim.Optimizer)
            and method not in vars(optimizer) and optimizer.scaler is None and accelerator.sync_gradients
            and accelerator.distributed_type != DistributedType.XLA
            and not type(inner).__module__.startswith("lomo_optim")):
        return inner
    return None


def step_optimizer(optimizer, accelerator) -> None:
    """`optimizer.step()`, on the torch optimizer itself where accelerate's wrapper would only pass the call on."""
    (_passed_through(optimizer, accelerator, "step") or optimizer).step()


def zero_grad(optimizer, accelerator) -> None:
    """`optimizer.zero_grad()` (gradients set to None), on the torch optimizer itself where the wrapper would only
    pass the call on."""
    (_passed_through(optimizer, accelerator, "zero_grad") or optimizer).zero_grad()


@contextlib.contextmanager
def skip_if(optimizer: torch.optim.Optimizer, skip: torch.Tensor):
    """Within: `optimizer.step()` changes nothing (weights, state, step count) where `skip` (0-d, device) is True."""
    optimizer.found_inf = skip.float()
    try:
        yield
    finally:
        del optimizer.found_inf


class StepGuard:
    """Decides, for every optimizer step of the trainer, whether it is applied; keeps what it skipped.

    `model` and `optimizer` are the trainer's (accelerate-prepared). `skipped` lists, per skipped
    optimizer step, `(mini-batch indices, first non-finite source)`; `steps` counts the applied ones
    (final after `settle`).
    """

    def __init__(self, config, accelerator, model, optimizer):
        self.enabled = config.nonfinite_guard
        self.max_grad_norm = config.max_grad_norm
        self.accumulation_steps = config.gradient_accumulation_steps
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.deepspeed = sharding.is_deepspeed(accelerator)
        self._trainable_parameters = None
        self.begin()

    def _trainable(self) -> list:
        """The parameters that train (listed once: the optimizer was built for them; a list per optimizer step cost
        more than the clipping)."""
        if self._trainable_parameters is None:
            self._trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        return self._trainable_parameters

    def begin(self) -> None:
        """Forget the previous step's decisions."""
        self.skipped = []
        self.steps = 0
        self._deferred = []  # (mini-batch indices, flags) of optimizer steps skipped (or not) on the device
        self._accumulated = None  # flags OR-ed over the mini-batches of the optimizer step being accumulated

    def reset(self) -> None:
        """After a step raised: drop the flags of a half-accumulated optimizer step."""
        self._accumulated = None

    def backward_allowed(self, flags: torch.Tensor, index: int) -> bool:
        """False, and the step recorded as skipped, when DeepSpeed (whose engine steps inside backward) would
        step on non-finite logits, values or loss of any process; always True elsewhere."""
        if not (self.enabled and self.deepspeed):
            return True
        raised = flags.int()
        if sharding.world_size(self.accelerator) > 1:
            raised = self.accelerator.reduce(raised, "max")
        source = first_source(raised.tolist())
        if source is not None:
            self.skipped.append((range(index, index + 1), source))
        return source is None

    def optimizer_step(self, flags: torch.Tensor, index: int) -> bool:
        """Clip and step unless this optimizer step's gradients, loss or outputs are non-finite; True if it stepped
        (or may have: a step skipped on the device counts until `settle` takes it back).

        `flags` (logits, values, loss) of mini-batch `index` are OR-ed over the mini-batches one
        optimizer step accumulates; accelerate steps only at the accumulation's last one.
        """
        if self.enabled:
            self._accumulated = flags if self._accumulated is None else self._accumulated | flags
        if not self.accelerator.sync_gradients:
            self.optimizer.step()  # accelerate: a no-op until the accumulation's last mini-batch
            self.optimizer.zero_grad()
            return False
        trainable = self._trainable()
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(trainable, self.max_grad_norm)
        accumulated = range(max(0, index - self.accumulation_steps + 1), index + 1)  # this step's share of them
        source, skip_on_device = None, contextlib.nullcontext()
        if self.enabled and not self.deepspeed:
            bad_gradients = (nonfinite_gradients(trainable, flags.device) if grad_norm is None
                             else ~torch.isfinite(grad_norm.to(flags.device)))  # (clipping's norm, already there)
            raised = torch.cat([self._accumulated, bad_gradients.reshape(1)])
            if sharding.world_size(self.accelerator) > 1:
                raised = self.accelerator.reduce(raised.int(), "max").bool()  # a device collective: every process alike
            skipping_optimizer = device_skipping_optimizer(self.optimizer, self.accelerator)
            if skipping_optimizer is not None:  # skipped on the device; `settle` reads the flags
                self._deferred.append((accumulated, raised))
                skip_on_device = skip_if(skipping_optimizer, raised.any())
            else:
                source = first_source(raised.tolist())  # another optimizer: decided on the host
        self._accumulated = None
        if source is not None:
            self.skipped.append((accumulated, source))
        else:
            with skip_on_device:
                step_optimizer(self.optimizer, self.accelerator)
            self.steps += 1
        zero_grad(self.optimizer, self.accelerator)
        return source is None

    def settle(self, also_read: Optional[torch.Tensor] = None) -> list:
        """The step's one host read: `also_read` (a 1-D device tensor of the caller's, e.g. the ratio guard's
        skips) together with the flags of the optimizer steps decided on the device. Records those that
        were skipped and returns `also_read`'s values as a list."""
        parts = [] if also_read is None else [also_read.flatten().int()]
        parts += [raised.flatten().int() for _, raised in self._deferred]
        read = torch.cat([part.to(self.accelerator.device) for part in parts]).tolist() if parts else []
        n_caller = 0 if also_read is None else also_read.numel()
        flags = read[n_caller:]
        for position, (accumulated, _) in enumerate(self._deferred):
            source = first_source(flags[position * len(SOURCES):(position + 1) * len(SOURCES)])
            if source is not None:
                self.skipped.append((accumulated, source))
                self.steps -= 1
        self._deferred = []
        return read[:n_caller]

    def skipped_minibatches(self) -> set:
        """The indices of the mini-batches whose optimizer step was skipped."""
        return {index for indices, _ in self.skipped for index in indices}

    def first_skip(self) -> str:
        """"the logits of mini-batch 3": the first skipped step, for messages (there must be one)."""
        return describe(*self.skipped[0])

    def failure_message(self, unwrapped_model, rollout_tensors: list, mask: torch.Tensor) -> str:
        """Where a step whose every optimizer step was non-finite went wrong: a poisoned weight, one of the
        rollout's `(name, [B, L-1] tensor)` on trained positions, or the training pass (host reads: the
        failure path only)."""
        message = (f"step: all {len(self.skipped)} optimizer steps had non-finite values (first: "
                   f"{self.first_skip()}); nothing was applied. ")
        weight = first_nonfinite(unwrapped_model.state_dict().items())  # the checkpoint's names
        if weight is not None:
            return message + f"The policy's weight {weight} already holds NaN/inf (load a good checkpoint)"
        trained = mask.bool()
        for name, tensor in rollout_tensors:
            if not bool(torch.isfinite(tensor[trained]).all()):
                return message + f"They started in the rollout's {name}, before any update"
        return message + "They started in the training forward or backward (e.g. an overflow in low precision)"
