"""The optimisation phase of `step`: `ppo_epochs` passes over shuffled mini-batches of the step's `Experience`.

Per mini-batch: the training forward (through the `ForwardPlan`: packed or padded, whole or in
token-budget micro-batches), the PPO loss, TRL's ratio guard, the backward and one optimizer step
through the `StepGuard`. TRL runs this forward in eval mode, so dropout never applies; gradient
checkpointing needs train mode, so with it dropout was disabled at construction instead.

`ppo_loss_for`, `ratio_spikes` and `zero_losses` are the one statement of the loss with the config's settings and
of TRL's loss-spike guard; TRL's public `loss` and `train_minibatch` use them too.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from .. import ops, reference, sharding
from ..op_outputs import PPOLossOutput, PPOLossSettings
from . import microbatch, step_guard
from . import stats as step_statistics
from .experience import Experience
from .forward_plan import ForwardPlan
from .profiling import profiler_range


def loss_settings(config) -> PPOLossSettings:
    """The loss's options from the config: clip ranges, value coefficient, dual clip, TIS cap, ratio level."""
    vf_coef = config.vf_coef if config.uses_critic else 0.0  # critic-free: values and returns are 0, no value loss
    return PPOLossSettings(ratio_clip(config), config.cliprange_value, vf_coef, config.dual_clip,
                           config.rollout_is_cap, config.importance_sampling_level)


def loss_weights_for(config, mask: torch.Tensor, length=None):
    """The mini-batch's per-token loss weights `[b, T]` of `config.loss_aggregation`, or None for TRL's token mean
    (the kernels' unweighted path). The sequence means run over the mini-batch's rows: accelerate divides each
    accumulated mini-batch's loss by gradient_accumulation_steps, which makes it the backward batch's mean."""
    if config.loss_aggregation == "token-mean":
        return None
    if config.loss_aggregation_length is not None:
        length = config.loss_aggregation_length
    return reference.loss_aggregation_weights(mask, config.loss_aggregation, rows=mask.shape[0], length=length)


def ppo_loss_for(config, logprobs, old_logprobs, values, old_values, advantages, returns, mask,
                 rollout_logprobs=None, loss_weights=None) -> PPOLossOutput:
    """`ops.ppo_loss` with the config's settings and backend (`[b, T]`), weighted by `loss_weights` if given."""
    return ops.ppo_loss(logprobs, old_logprobs, values, old_values, advantages, returns, mask,
                        backend=config.backend, settings=loss_settings(config), rollout_logprobs=rollout_logprobs,
                        loss_weights=loss_weights)


def ratio_clip(config):
    """The loss's `cliprange`: the config's number, or `(low, high)` where cliprange_low/high differ from it."""
    low = config.cliprange if config.cliprange_low is None else config.cliprange_low
    high = config.cliprange if config.cliprange_high is None else config.cliprange_high
    return config.cliprange if low == high == config.cliprange else (low, high)


def ratio_spikes(ratio_mean: torch.Tensor, threshold: float) -> torch.Tensor:
    """TRL's loss-spike guard: whether a mini-batch's mean ratio exceeds `ratio_threshold` (0-d bool, decided on
    the device: no host read). Such a mini-batch's losses are zeroed (`zero_losses`)."""
    return ratio_mean > threshold


def zero_losses(out: PPOLossOutput, skip: torch.Tensor) -> PPOLossOutput:
    """`out` with loss, pg_loss and vf_loss zeroed where `skip` (0-d bool) is set."""
    keep = (~skip).float()
    kl_loss = None if out.kl_loss is None else out.kl_loss * keep
    return out._replace(loss=out.loss * keep, pg_loss=out.pg_loss * keep, vf_loss=out.vf_loss * keep, kl_loss=kl_loss)


class PPOEpochs:
    """The PPO epochs of one trainer: its (accelerate-prepared) model and optimizer, forward plan and guard."""

    def __init__(self, config, accelerator, model, optimizer, plan: ForwardPlan, guard: step_guard.StepGuard):
        self.config, self.accelerator, self.model, self.optimizer = config, accelerator, model, optimizer
        self.plan, self.guard = plan, guard
        self.aggregation_length = None  # set per step by `run` (Dr. GRPO's length from the batch)

    def run(self, experience: Experience) -> tuple:
        """Train on `experience` (`config.batch_size` rows): the mini-batches' stats stacked (TRL's `train_stats`
        layout, see `record_step_stats`) and the `fastppo/*` counters. Mini-batches whose optimizer step was
        skipped for non-finite values are left out of the stats."""
        config = self.config
        per_minibatch, skips, early_stopped = [], [], False
        # Dr. GRPO's constant length, when the config leaves it to the batch: its longest response (on the device)
        by_batch = config.loss_aggregation == "seq-mean-token-sum-norm" and config.loss_aggregation_length is None
        self.aggregation_length = experience.mask.sum(-1).amax() if by_batch and len(experience) else None
        self.guard.begin()
        self.model.train(config.gradient_checkpointing)  # once: no pass below changes a module's mode
        for _ in range(config.ppo_epochs):
            order = np.random.permutation(config.batch_size)
            for start in range(0, config.batch_size, config.mini_batch_size):
                rows = order[start:start + config.mini_batch_size]
                with self.accelerator.accumulate(self.model):
                    stats, skip = self.train_minibatch(experience.select(rows), len(per_minibatch))
                per_minibatch.append(stats)
                skips.append(skip)
                self.plan.release_cache()
            if config.early_stopping and self.should_stop_early(per_minibatch[-1]["policy/policykl"]):
                early_stopped = True
                break
        n_skipped = sum(self.guard.settle(torch.stack(skips)))  # the step's one read of these
        if n_skipped:
            warnings.warn(f"{n_skipped} mini-batch(es) had a mean ratio above ratio_threshold="
                          f"{config.ratio_threshold}; their loss was zeroed")
        if self.guard.skipped and self.guard.steps:
            warnings.warn(f"{len(self.guard.skipped)} optimizer step(s) skipped for non-finite values (first: "
                          f"{self.guard.first_skip()}); the weights and optimizer state did not take them, and the "
                          "ppo/* statistics leave those mini-batches out")
            left_out = self.guard.skipped_minibatches()
            per_minibatch = [stats for index, stats in enumerate(per_minibatch) if index not in left_out]
        counters = {
            "fastppo/optimizer_steps": float(self.guard.steps),
            "fastppo/skipped_minibatches": float(n_skipped),
            "fastppo/skipped_nonfinite": float(len(self.guard.skipped)),
            "fastppo/early_stopped": float(early_stopped),
        }
        return step_statistics.stack_minibatch_stats(per_minibatch), counters

    def train_minibatch(self, experience: Experience, index: int) -> tuple:
        """Forward, loss, backward and the guarded optimizer step of mini-batch `index`: (stats, ratio-guard skip).

        With token-budget micro-batches each one's loss is weighted by its share of the response tokens (with a
        `loss_aggregation`'s per-token weights, made for the whole mini-batch, the shares are in the weights)
        and the gradients all-reduce once, after the last. TRL's ratio guard needs the whole mini-batch's
        mean ratio before any backward, so a split mini-batch finds it in a no-grad pass first.
        """
        config = self.config
        micro = self.plan.micro_batches(experience.attention_mask, experience.mask, experience.layout)
        weights = loss_weights_for(config, experience.mask, self.aggregation_length)

        def part(rows):  # the micro-batch's rows and loss weights
            return experience.select(rows), None if weights is None else weights[rows]

        skip = None
        if len(micro) > 1:
            with torch.no_grad():
                ratio_mean = sum(weight * self.loss(*part(rows))[0].ratio_mean for rows, weight in micro)
            skip = ratio_spikes(ratio_mean, config.ratio_threshold)
        outs, entropies, flags, backward_ran = [], [], None, True
        for position, (rows, weight) in enumerate(micro):
            last = position == len(micro) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                with profiler_range("fastppo/minibatch_forward"):
                    out, entropy, part_flags = self.loss(*part(rows))
                    if skip is None:  # one pass: its own mean ratio decides
                        skip = ratio_spikes(out.ratio_mean, config.ratio_threshold)
                    flags = part_flags if flags is None else flags | part_flags
                if self.guard.backward_allowed(part_flags, index):  # (False only under DeepSpeed: no micro-batches)
                    with profiler_range("fastppo/minibatch_backward"):
                        share = weight if weights is None else 1.0  # weighted: the part's loss is its share already
                        self.accelerator.backward(out.loss * (share * (~skip).float()))
                else:
                    backward_ran = False
            outs.append(out)
            entropies.append(entropy.detach())
        if len(outs) > 1:
            out = microbatch.combine_loss_outputs(outs, [weight for _, weight in micro], weighted=weights is not None)
            entropy = torch.cat(entropies)
        out = zero_losses(out, skip)
        if backward_ran:
            with profiler_range("fastppo/optimizer_step"):
                self.guard.optimizer_step(flags, index)
        with torch.no_grad():
            stats = step_statistics.minibatch_stats(out, entropy, experience.advantages, experience.returns,
                                                    experience.old_values, experience.mask, config.vf_coef,
                                                    config.uses_critic)
        return stats, skip

    def loss(self, experience: Experience, loss_weights=None) -> tuple:
        """The training forward and the PPO loss of some rows (weighted by `loss_weights` `[b, L-1]` if given):
        (PPOLossOutput, entropy `[b, L-1]`, non-finite flags)."""
        batch = self.plan.prepare(experience.input_ids, experience.attention_mask, experience.mask,
                                  layout=experience.layout, encoder=experience.encoder)
        logprobs, entropy, values, _ = self.plan.forward(self.model, batch, return_entropy=True)
        out = ppo_loss_for(self.config, logprobs, experience.old_logprobs, values.float(), experience.old_values,
                           experience.advantages, experience.returns, experience.mask, experience.rollout_logprobs,
                           loss_weights)
        if experience.ref_logprobs is not None:  # GRPO's KL loss, aggregated as the policy loss
            kl = reference.aggregate(reference.kl_loss_terms(logprobs, experience.ref_logprobs,
                                                             self.config.kl_loss_type), experience.mask, loss_weights)
            out = out._replace(loss=out.loss + self.config.kl_loss_coef * kl, kl_loss=kl)
        return out, entropy, step_guard.output_flags(logprobs, values, experience.mask, out.loss)

    def apply(self, loss: torch.Tensor, flags: torch.Tensor) -> None:
        """Backward and one guarded optimizer step for a loss computed outside `run` (TRL's `train_minibatch`):
        a non-finite step is skipped with a warning, as inside `step`."""
        before = len(self.guard.skipped)
        if self.guard.backward_allowed(flags, 0):
            self.accelerator.backward(loss)
            self.guard.optimizer_step(flags, 0)
        self.guard.settle()
        if len(self.guard.skipped) > before:
            where = step_guard.describe(*self.guard.skipped[-1])
            warnings.warn(f"optimizer step skipped for non-finite values ({where}); the weights and optimizer state "
                          "did not take it")

    def should_stop_early(self, policykl: torch.Tensor) -> bool:
        """True (and gradients zeroed) when the policy KL (averaged over processes) passed 1.5 × target_kl."""
        policykl = policykl.detach().float()
        if sharding.world_size(self.accelerator) > 1:
            policykl = self.accelerator.reduce(policykl.to(self.accelerator.device), "mean")
        if float(policykl) > 1.5 * self.config.target_kl:
            self.optimizer.zero_grad()
            return True
        return False
