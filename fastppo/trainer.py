"""PPOTrainer: TRL's classic `generate` → score → `step` API on accelerate, with fastppo's ops.

`step` reads as its phases: check inputs → scores → padded batch → rollout forward
(policy and reference log-probs, values) → per-token rewards → advantages → PPO epochs
over shuffled mini-batches → statistics → KL-coefficient update. The per-token math goes
through `fastppo.ops`, which picks the Triton kernels or the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import time
import warnings
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from accelerate.utils.memory import clear_device_cache
from transformers import PreTrainedTokenizerBase, set_seed

from . import checkpointing, ops, sharding
from .config import PPOConfig
from .models import heads
from .models.value_head import AutoModelForCausalLMWithValueHead, create_reference_model, disable_dropout
from .rollout.hf_engine import HFEngine, draw_lengths, list_output, single_output
from .training import checks, guards, inputs, microbatch, packing, padding
from .training import stats as step_statistics
from .training.controllers import AdaptiveKLController, FixedKLController, RunningMoments
from .training.trl_methods import TRLMethods


class Rollout(NamedTuple):
    """What the no-grad forward passes over the whole batch produce; all `[B, L-1]`."""

    logprobs: torch.Tensor  # policy log-prob of token t+1 at position t
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    full_kl: Optional[torch.Tensor]  # exact KL per position, for kl_penalty="full"


class PPOTrainer(TRLMethods):
    """PPO for a causal LM with a value head, TRL 0.11 classic math by default.

    Args:
        config: a `PPOConfig`.
        model: the policy, an `AutoModelForCausalLMWithValueHead`.
        ref_model: the frozen reference; None makes a frozen copy of `model` (for a PEFT
            model, the base with adapters disabled is used instead, without a copy).
        tokenizer: a transformers tokenizer; `generate` of a list and `step` need its pad token
            (refused there, with a ValueError, when it has none). Its `padding_side` ("right" or
            "left") is the side `step` pads its batch on, as TRL does.
        dataset: optional torch Dataset; `trainer.dataloader` then yields `batch_size` items
            (without one, a warning, as TRL gives).
        optimizer: default `torch.optim.Adam(trainable params, lr=config.learning_rate)`, TRL's, with torch's
            fused kernel where it exists for the parameters (then a non-finite step is skipped on the device).
        data_collator: collate function of the dataloader.
        num_shared_layers: with `ref_model=None`, freeze the policy's embeddings and first
            `num_shared_layers` blocks and share them with the reference instead of copying
            them (TRL's math; see `create_reference_model`). Ignored, with a warning, when
            a `ref_model` is given or the model is a PEFT model.
        lr_scheduler: optional, stepped once per `step`.
        training_data_collator: optional; pads `prepare_model_inputs`' rows instead of fastppo's own
            padding (TRL's argument). Ignored with `padding_free`.

    The TRL 0.11 methods (`prepare_model_inputs`, `compute_rewards`, ...) come from `TRLMethods`.
    """

    def __init__(
        self,
        config: Optional[PPOConfig] = None,
        model: Optional[AutoModelForCausalLMWithValueHead] = None,
        ref_model: Optional[AutoModelForCausalLMWithValueHead] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        dataset=None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        data_collator: Optional[Callable] = None,
        num_shared_layers: Optional[int] = None,
        lr_scheduler=None,
        training_data_collator: Optional[Callable] = None,
    ):
        checks.check_constructor_args(config, model, ref_model, tokenizer, optimizer, num_shared_layers, lr_scheduler)
        self.config = config
        self.tokenizer = tokenizer
        self.data_collator = training_data_collator
        self._warn_unreached_overrides()
        if dataset is None:
            warnings.warn("PPOTrainer has no dataset: each step trains on the batch you pass, which must hold "
                          f"config.batch_size={config.batch_size} rows (per process)")
        set_seed(config.seed)

        self.accelerator = Accelerator(
            log_with=config.log_with,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            project_config=ProjectConfiguration(**config.project_kwargs),
            **config.accelerator_kwargs,
        )
        config.world_size = sharding.world_size(self.accelerator)  # DeepSpeed on CPU: accelerate may say 1
        config.global_backward_batch_size = config.backward_batch_size * config.world_size
        config.global_batch_size = config.batch_size * config.world_size
        config.is_encoder_decoder = False
        config.is_peft_model = model.is_peft_model
        self.is_peft_model = model.is_peft_model

        self.head_mode = heads.head_mode(config)
        if self.head_mode != "full":
            heads.check_plain_lm_head(model)
            if sharding.shards_parameters(self.accelerator):
                raise ValueError("response_only_logits/fused_lm_head read the LM head's weight directly, which ZeRO-3 "
                                 "and FSDP shard across processes; leave both False there")
        if num_shared_layers is not None and (ref_model is not None or self.is_peft_model):
            warnings.warn("num_shared_layers is ignored: " + ("a ref_model was given" if ref_model is not None
                          else "a PEFT model's reference is its base with the adapter disabled, nothing is copied"))
        if ref_model is None and not self.is_peft_model:
            if num_shared_layers is not None and self.accelerator.distributed_type in (DistributedType.FSDP,
                                                                                      DistributedType.DEEPSPEED):
                raise ValueError(f"num_shared_layers: {self.accelerator.distributed_type.value} shards the policy "
                                 "and the reference separately, so they cannot share tensors; leave it None there")
            ref_model = create_reference_model(model, num_shared_layers=num_shared_layers)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            disable_dropout(model)  # the training forward then runs in train mode (see _train_minibatch)
        if optimizer is None:
            optimizer = guards.default_adam([p for p in model.parameters() if p.requires_grad], config.learning_rate,
                                            fused=not sharding.is_deepspeed(self.accelerator)
                                            and not sharding.shards_parameters(self.accelerator))
        checks.check_model_pairing(model, ref_model, optimizer)
        checks.warn_low_precision_training(model, self.accelerator)
        self.dataset = dataset
        dataloader = None
        if dataset is not None:
            dataloader = self.prepare_dataloader(dataset, data_collator, model)
        sharding.check_supported(self.accelerator)
        if config.max_tokens_per_microbatch is not None and sharding.is_deepspeed(self.accelerator):
            raise ValueError("max_tokens_per_microbatch: DeepSpeed's engine steps the optimizer after a fixed count "
                             "of backward passes, which token-budget micro-batches vary; leave it None under DeepSpeed")
        sharding.configure_deepspeed(self.accelerator, config)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.dataloader = self.accelerator.prepare(dataloader) if dataloader is not None else None
        self.lr_scheduler = self.accelerator.prepare(lr_scheduler) if lr_scheduler is not None else None
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = sharding.prepare_reference(self.accelerator, ref_model, config.mini_batch_size)
        self.current_device = self.accelerator.device
        if config.padding_free:  # proven on the model itself: packed logits equal unpacked ones
            float32 = self.accelerator.mixed_precision == "no" and all(
                p.dtype == torch.float32 for p in self.unwrapped_model.parameters())
            for name, candidate in (("the policy", self.model), ("the reference", self.ref_model)):
                if candidate is not None:
                    packing.check_model_packs(candidate, self.vocab_size, self.current_device, float32=float32,
                                              name=f"{name} ({type(self.unwrapped_model.causal_lm).__name__}, "
                                                   f"attention {self.unwrapped_model.config._attn_implementation})")
        self.hf_engine = HFEngine(self.accelerator, tokenizer)
        self.rollout_engine = self.hf_engine
        if config.rollout_engine == "vllm":
            from .rollout.vllm_engine import VLLMEngine, check_vllm_installed

            if config.world_size > 1:
                raise ValueError("PPOConfig.rollout_engine='vllm' runs one colocated engine in a single process; "
                                 f"this run has {config.world_size} processes (not supported yet)")
            check_vllm_installed()
            self.rollout_engine = VLLMEngine(config.vllm_kwargs, seed=config.seed, accelerator=self.accelerator)

        self.kl_ctl = (
            AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
            if config.adap_kl_ctrl
            else FixedKLController(config.init_kl_coef)
        )
        self.running = RunningMoments()
        self.current_step = 0
        self._config_at_start = copy.deepcopy(config.to_dict())  # step refuses a config changed since
        self.highest_reward, self._compare_step = -math.inf, 0  # push_to_hub_if_best_kwargs
        self.accelerator.init_trackers(
            config.tracker_project_name, config=config.to_dict(), init_kwargs=config.tracker_kwargs
        )

    # ------------------------------------------------------------------ helpers

    def prepare_dataloader(self, dataset, data_collator: Optional[Callable] = None, model=None):
        """A shuffled DataLoader of `config.batch_size` items (last partial batch dropped), as TRL's.

        A Hugging Face `datasets.Dataset` first loses the columns that neither the model's
        forward takes nor "label", "query" or "response" name, when `config.remove_unused_columns`.
        """
        if self.config.remove_unused_columns and hasattr(dataset, "column_names") and hasattr(dataset, "remove_columns"):
            forward = (model if model is not None else self.unwrapped_model).forward
            keep = set(inspect.signature(forward).parameters) | {"label", "query", "response"}
            unused = [name for name in dataset.column_names if name not in keep]
            if unused:
                dataset = dataset.remove_columns(unused)
        return torch.utils.data.DataLoader(dataset, batch_size=self.config.batch_size, collate_fn=data_collator,
                                           shuffle=True, drop_last=True)

    @property
    def unwrapped_model(self) -> AutoModelForCausalLMWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    @property
    def vocab_size(self) -> int:
        return sharding.vocab_size(self.unwrapped_model.lm_head.weight)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        query_tensor,
        length_sampler: Optional[Callable[[], int]] = None,
        batch_size: int = 4,
        return_prompt: bool = True,
        generate_ref_response: bool = False,
        remove_padding: bool = True,
        return_logprobs: bool = False,
        **generation_kwargs,
    ):
        """Sample responses to one query (1-D tensor → `[n, L]` tensor) or a list (→ list of 1-D tensors).

        Sampled by `config.rollout_engine`: HF `generate`, `batch_size` queries at a time with
        left padding (TRL's way), or vLLM (all at once; `batch_size` is ignored; kwargs are
        translated, and one without a faithful translation is a ValueError). A list's responses
        lose their padding and, with `remove_padding`, everything after the first EOS (which is
        kept); with `num_return_sequences=n` each query's n responses follow one another.
        `return_prompt=False` returns only the new tokens. `length_sampler` draws max_new_tokens
        per `batch_size` chunk. `generate_ref_response=True` also samples from the reference
        (always with HF generate) and returns `(policy's, reference's)`. `return_logprobs=True`
        returns `(responses, logprobs)` instead of `responses`: per response, the float32
        log-prob of each new token (prompt tokens excluded) under the unmodified model
        distribution (temperature 1, before top-k/top-p) as the engine computed it — 1-D
        tensors for a list, `[n, new]` (0 past a row's end) for a single query. Pass them to
        `step(..., rollout_logprobs=...)`.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(return_logprobs, bool):
            raise TypeError(f"return_logprobs must be True or False, got {return_logprobs!r}")
        single = isinstance(query_tensor, torch.Tensor)
        if not single or generation_kwargs.get("num_return_sequences", 1) != 1:
            self._require_pad_token("generate")  # batched queries are left-padded, samples right-padded
        if self.tokenizer.pad_token_id is not None:
            generation_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if single:
            queries = [inputs.check_token_ids("query_tensor", query_tensor, self.vocab_size, self.current_device)]
        else:
            queries = inputs.check_token_list("query_tensor", query_tensor, self.vocab_size, self.current_device)
        self._check_generation_lengths(queries, single, length_sampler, generation_kwargs)
        self.rollout_engine.check_kwargs(self.model, generation_kwargs)
        if generate_ref_response:
            self.hf_engine.check_kwargs(self._reference_model(), generation_kwargs)

        def sample(engine, model, disable_adapter=False):
            lengths = draw_lengths(length_sampler, len(queries), batch_size)
            with sharding.gathered(self.accelerator, model):  # ZeRO-3: sample from full weights
                samples = engine.generate(model, queries, lengths, batch_size, generation_kwargs, return_logprobs,
                                          disable_adapter=disable_adapter)
            if single:
                return single_output(queries[0], samples[0], self.tokenizer.pad_token_id, return_prompt,
                                             return_logprobs)
            return list_output(queries, samples, self.tokenizer.eos_token_id, return_prompt, remove_padding,
                                       return_logprobs)

        responses = sample(self.rollout_engine, self.model)
        if generate_ref_response:
            return responses, sample(self.hf_engine, self._reference_model(), disable_adapter=self.is_peft_model)
        return responses

    def _check_generation_lengths(self, queries, single: bool, length_sampler, generation_kwargs) -> None:
        """Query + the most new tokens asked for must fit the model's positions (checked before sampling)."""
        limit = checks.max_positions(self.unwrapped_model)
        values = getattr(length_sampler, "values", None)  # core.LengthSampler's range
        most = max(values) if length_sampler is not None and values else generation_kwargs.get("max_new_tokens")
        name = "query_tensor" if single else "query_tensor[{i}]"
        if isinstance(most, int):
            source = "length_sampler's longest" if length_sampler is not None else "max_new_tokens"
            inputs.check_lengths(f"{name} + {source} ({most})", [len(q) + most for q in queries], limit)
        elif isinstance(generation_kwargs.get("max_length"), int):
            inputs.check_lengths("max_length", [generation_kwargs["max_length"]], limit)

    def _reference_model(self):
        return self.model if self.is_peft_model else self.ref_model

    # ------------------------------------------------------------------ step

    def step(self, queries: list, responses: list, scores, response_masks: Optional[list] = None,
             rollout_logprobs: Optional[list] = None) -> dict:
        """One PPO optimisation step on a batch of `config.batch_size` (query, response, score) triples.

        queries, responses: lists of 1-D token-id tensors (any lengths ≥ 1); scores: a list of
        scalar tensors (or numbers) or a 1-D tensor; response_masks: optional lists of 0/1
        per response token (0 = not trained on); rollout_logprobs: optional per-response float
        log-probs of the engine that sampled them (`generate(..., return_logprobs=True)`): the
        training-vs-rollout mismatch is then reported under `rollout/*`, and with
        `config.rollout_correction="tis"` each token's policy loss is weighted by
        min(exp(old_logprob − rollout_logprob), rollout_is_cap). Returns TRL's statistics dict plus
        `fastppo/*` entries.

        Raises TypeError/ValueError on bad input before changing anything. An optimizer step whose
        gradients (or loss, log-probs, values) hold NaN/inf is skipped (`fastppo/skipped_nonfinite`,
        with a warning naming the first non-finite tensor); a step where every one is skipped raises
        FloatingPointError saying where the non-finite values started. If `step` raises once training
        began, the optimizer steps already taken stay applied (weights, optimizer state); everything else
        is as before the call: gradients cleared, train/eval mode, running score moments, the
        gradient-accumulation phase, KL coefficient, scheduler and counters.
        """
        self._require_pad_token("step")
        self._check_config_unchanged()
        batch = inputs.check_step_inputs(queries, responses, scores, response_masks, self.config.batch_size,
                                         self.vocab_size, self.current_device, rollout_logprobs,
                                         max_length=checks.max_positions(self.unwrapped_model))
        if self.config.rollout_correction is not None and batch.rollout_logprobs is None:
            raise ValueError(f"rollout_logprobs: config.rollout_correction={self.config.rollout_correction!r} needs "
                             "the rollout engine's log-probs; pass those of generate(..., return_logprobs=True)")
        with self._restored_on_error():
            return self._step(batch)

    def _check_config_unchanged(self) -> None:
        now = self.config.to_dict()
        changed = sorted(k for k, v in self._config_at_start.items() if now.get(k) != v)
        if changed:
            raise ValueError(f"config fields {changed} changed after the PPOTrainer was built, which it does not "
                             "follow (the optimizer, accelerator and controllers were set up from them); build a new "
                             "trainer, or set them back")

    @contextlib.contextmanager
    def _restored_on_error(self):
        """On an exception inside step: clear gradients, restore modes, running moments and the accumulation phase."""
        was_training = self.model.training
        running = self.running.state_dict()
        accumulation_phase = self.accelerator.step
        try:
            yield
        except BaseException:
            for parameter in self.model.parameters():
                parameter.grad = None
            self.model.train(was_training)
            self.running.load_state_dict(running)
            self.accelerator.step = accumulation_phase
            self.accelerator.gradient_state._set_sync_gradients(True)
            self._accumulated_flags = None
            raise

    def _step(self, batch: inputs.StepInputs) -> dict:
        timing = {}
        start = time.time()
        scores = self._prepare_scores(batch.scores)
        self._push_if_best(scores)

        t = time.time()
        input_ids, attention_mask, mask = self._pad_batch(batch.queries, batch.responses, batch.response_masks)
        rollout = self._rollout(input_ids, attention_mask, mask)
        engine_logprobs = None
        if batch.rollout_logprobs is not None:
            engine_logprobs = padding.place_responses(attention_mask, [len(q) for q in batch.queries],
                                                      batch.rollout_logprobs)
        timing["time/ppo/forward_pass"] = time.time() - t

        t = time.time()
        kl_coef = self.kl_ctl.value
        full_kl = {} if rollout.full_kl is None else {"kl": rollout.full_kl}
        rewards, non_score_reward, kls = self.compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                                              **full_kl)
        timing["time/ppo/compute_rewards"] = time.time() - t

        t = time.time()
        values, advantages, returns = self.compute_advantages(rollout.values, rewards, mask)
        timing["time/ppo/compute_advantages"] = time.time() - t

        t = time.time()
        self.rollout_engine.weights_changed()  # from here on the policy may move
        correction = engine_logprobs if self.config.rollout_correction == "tis" else None
        train_stats, optimisation = self._optimize(input_ids, attention_mask, rollout.logprobs, values, advantages,
                                                   returns, mask, correction)
        timing["time/ppo/optimize_step"] = time.time() - t
        if optimisation["fastppo/skipped_nonfinite"] and not optimisation["fastppo/optimizer_steps"]:
            raise FloatingPointError(self._nonfinite_origin(rollout, rewards, advantages, mask))

        t = time.time()
        stats = self.record_step_stats(
            kl_coef, scores=scores, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs,
            non_score_reward=non_score_reward, train_stats=train_stats, kls=kls, masks=mask,
            queries=batch.queries, responses=batch.responses,
        )
        if engine_logprobs is not None:
            stats.update(step_statistics.rollout_mismatch_stats(rollout.logprobs, engine_logprobs, mask))
        if self.is_distributed:
            stats = self.gather_stats(stats)
        stats = step_statistics.to_python(stats)
        timing["time/ppo/calc_stats"] = time.time() - t
        stats["ppo/learning_rate"] = self.optimizer.param_groups[0]["lr"]

        if math.isfinite(stats["objective/kl"]):
            self.kl_ctl.update(stats["objective/kl"], self.config.batch_size * self.config.world_size)
        else:
            warnings.warn(f"objective/kl is {stats['objective/kl']}: the KL coefficient was not updated")
        timing["time/ppo/total"] = time.time() - start
        stats.update(timing)
        stats.update(optimisation)
        stats["fastppo/tokens_per_s"] = float(attention_mask.sum()) / max(timing["time/ppo/total"], 1e-9)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return stats

    def _prepare_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Running-moment scaling/normalisation, then clipping, as configured."""
        if self.config.use_score_scaling:
            self.running.update(scores, self.accelerator)
            scale = self.running.std + torch.finfo(scores.dtype).eps
            if self.config.use_score_norm:
                scores = (scores - self.running.mean) / scale
            else:
                scores = scores / scale
        if self.config.score_clip is not None:
            scores = torch.clamp(scores, -self.config.score_clip, self.config.score_clip)
        return scores

    def _push_if_best(self, scores: torch.Tensor) -> None:
        """TRL's `push_to_hub_if_best_kwargs`: every `compare_steps` steps, push the policy that produced
        these responses when their mean (prepared) score beats every one compared before."""
        if not self.config.push_to_hub_if_best_kwargs:
            return
        if self._compare_step % self.config.compare_steps == 0:
            mean_score = float(scores.float().mean())
            if mean_score > self.highest_reward:
                self.highest_reward = mean_score
                self.push_to_hub(**self.config.push_to_hub_if_best_kwargs)
        self._compare_step += 1

    def _pad_batch(self, queries, responses, response_masks):
        """`input_ids`/`attention_mask` `[B, L]` (`prepare_model_inputs`; with padding_free always right-padded,
        as packing drops the pads) and the response-token mask `[B, L-1]` (see fastppo.padding).
        Every process pads to the widest row of all."""
        if self.config.padding_free:
            sequences = [torch.cat([q, r]) for q, r in zip(queries, responses)]
            input_ids, attention_mask = padding.pad_rows(sequences, max(len(x) for x in sequences),
                                                         self.tokenizer.pad_token_id, "right", self.current_device)
        else:
            model_inputs = self.prepare_model_inputs(queries, responses)
            input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        if self.config.world_size > 1:
            width = int(self.accelerator.gather(torch.tensor([input_ids.shape[1]], device=self.current_device)).max())
            left = not self.config.padding_free and padding.padding_side(self.tokenizer) == "left"
            input_ids, attention_mask = padding.widen(input_ids, attention_mask, width, self.tokenizer.pad_token_id,
                                                      "left" if left else "right")
        mask = padding.response_mask(attention_mask, [len(q) for q in queries], [len(r) for r in responses],
                                     response_masks)
        return input_ids, attention_mask, mask

    def _forward(self, model, input_ids, attention_mask, mask, return_entropy: bool = False,
                 packed: Optional[packing.Packed] = None) -> heads.TokenOutputs:
        """Next-token log-probs (and entropies) and values `[b, L-1]`, through the configured LM-head path;
        with `packed`, of the packed row `[1, N-1]` instead (see fastppo.packing)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if packed is None:
            return heads.token_outputs(model, unwrapped, input_ids, attention_mask, mask, self.head_mode,
                                       self.config.backend, return_entropy=return_entropy)
        return heads.token_outputs(model, unwrapped, packed.input_ids, None, packed.mask, self.head_mode,
                                   self.config.backend, return_entropy=return_entropy,
                                   position_ids=packed.position_ids, use_cache=False)

    def _pack(self, input_ids, attention_mask, mask) -> Optional[packing.Packed]:
        return packing.pack(input_ids, attention_mask, mask) if self.config.padding_free else None

    def _rollout_chunks(self, attention_mask) -> list:
        """Row slices of the rollout's forward passes: `rollout_batch_size` rows, or by token count."""
        if self.config.max_tokens_per_microbatch is None:
            chunk = self.config.rollout_batch_size or self.config.mini_batch_size
            return [slice(start, start + chunk) for start in range(0, attention_mask.shape[0], chunk)]
        return self._token_budget_chunks(attention_mask)

    def _token_budget_chunks(self, attention_mask) -> list:
        """Consecutive row slices of at most `max_tokens_per_microbatch` tokens each (a longer row alone).

        A slice's tokens are what it sends through the model: its real tokens when packed, rows ×
        width when padded. Every process makes as many slices as the process with most (splitting its
        largest ones), so forward and backward passes stay in step across processes.
        """
        if self.config.padding_free:
            costs = attention_mask.sum(1).tolist()
        else:
            costs = [attention_mask.shape[1]] * attention_mask.shape[0]
        slices = microbatch.token_budget_slices(costs, self.config.max_tokens_per_microbatch)
        if self.config.world_size > 1:
            count = torch.tensor([len(slices)], device=self.current_device)
            slices = microbatch.split_to_count(slices, int(self.accelerator.gather(count).max()))
        return slices

    @torch.no_grad()
    def _rollout(self, input_ids, attention_mask, mask) -> Rollout:
        """Policy and reference forward passes over the batch, `rollout_batch_size` rows at a time."""
        full = self.config.kl_penalty == "full"
        self.model.eval()
        if self.ref_model is not None:
            self.ref_model.eval()  # whatever mode it was left in: the reference's log-probs never get dropout
        parts = {"logprobs": [], "ref_logprobs": [], "values": [], "full_kl": []}
        for rows in self._rollout_chunks(attention_mask):
            packed = self._pack(input_ids[rows], attention_mask[rows], mask[rows])
            policy = self._forward(self.model, input_ids[rows], attention_mask[rows], mask[rows], packed=packed)
            with self._reference_context():
                reference = self._forward(self._reference_model(), input_ids[rows], attention_mask[rows], mask[rows],
                                          packed=packed)
            grid = (lambda values: values) if packed is None else (lambda values: packing.unpack(values, packed))
            parts["logprobs"].append(grid(policy.logprobs))
            parts["ref_logprobs"].append(grid(reference.logprobs))
            parts["values"].append(grid(policy.values.float()))
            if full:
                kl_mask = mask[rows] if packed is None else packed.mask
                parts["full_kl"].append(grid(heads.full_kl(policy, reference, kl_mask, self.config.backend)))
            del policy, reference
            self._maybe_clear_cache()
        return Rollout(
            logprobs=torch.cat(parts["logprobs"]),
            ref_logprobs=torch.cat(parts["ref_logprobs"]),
            values=torch.cat(parts["values"]),
            full_kl=torch.cat(parts["full_kl"]) if full else None,
        )

    def _reference_context(self):
        if self.is_peft_model:
            return self.unwrapped_model.pretrained_model.disable_adapter()
        return contextlib.nullcontext()

    def _optimize(self, input_ids, attention_mask, old_logprobs, old_values, advantages, returns, mask,
                  rollout_logprobs=None):
        """`ppo_epochs` passes over shuffled mini-batches; returns the mini-batches' stats stacked (TRL's
        `train_stats` layout, see `record_step_stats`) and counters.
        `rollout_logprobs` `[B, L-1]`: the engine's log-probs, for the "tis" correction (else None)."""
        config = self.config
        per_minibatch, skipped = [], []
        optimizer_steps, early_stopped = 0, False
        self._nonfinite = []  # (mini-batch indices, first non-finite source) of each skipped optimizer step
        self._deferred_flags = []  # (mini-batch indices, flags) of optimizer steps skipped (or not) on the device
        self._accumulated_flags = None
        for _ in range(config.ppo_epochs):
            order = np.random.permutation(config.batch_size)
            for start in range(0, config.batch_size, config.mini_batch_size):
                idx = torch.as_tensor(order[start:start + config.mini_batch_size], device=self.current_device)
                self._minibatch_index = len(per_minibatch)
                with self.accelerator.accumulate(self.model):
                    stats, skip, stepped = self._train_minibatch(
                        input_ids[idx], attention_mask[idx], old_logprobs[idx], old_values[idx], advantages[idx],
                        returns[idx], mask[idx], rollout_logprobs[idx] if rollout_logprobs is not None else None,
                    )
                    optimizer_steps += int(stepped)
                per_minibatch.append(stats)
                skipped.append(skip)
                self._maybe_clear_cache()
            if config.early_stopping and self._should_stop_early(per_minibatch[-1]["policy/policykl"]):
                early_stopped = True
                break
        # one host read for the ratio guard's count and the device-skipped steps' flags
        rows = [torch.stack(skipped).reshape(-1, 1).expand(-1, len(guards.SOURCES))]
        rows += [raised.reshape(1, -1) for _, raised in self._deferred_flags]
        read = torch.cat([row.to(self.current_device) for row in rows]).tolist()
        n_skipped = sum(row[0] for row in read[:len(skipped)])
        for (accumulated, _), raised in zip(self._deferred_flags, read[len(skipped):]):
            source = guards.first_source(raised)
            if source is not None:
                self._nonfinite.append((accumulated, source))
                optimizer_steps -= 1
        if n_skipped:
            warnings.warn(f"{n_skipped} mini-batch(es) had a mean ratio above ratio_threshold="
                          f"{config.ratio_threshold}; their loss was zeroed")
        if self._nonfinite and optimizer_steps:
            warnings.warn(f"{len(self._nonfinite)} optimizer step(s) skipped for non-finite values (first: "
                          f"{guards.describe(*self._nonfinite[0])}); the weights and optimizer state did not take "
                          "them, and the ppo/* statistics leave those mini-batches out")
            skipped_minibatches = {index for indices, _ in self._nonfinite for index in indices}
            per_minibatch = [stats for index, stats in enumerate(per_minibatch) if index not in skipped_minibatches]
        counters = {
            "fastppo/optimizer_steps": float(optimizer_steps),
            "fastppo/skipped_minibatches": float(n_skipped),
            "fastppo/skipped_nonfinite": float(len(self._nonfinite)),
            "fastppo/early_stopped": float(early_stopped),
        }
        return step_statistics.stack_minibatch_stats(per_minibatch), counters

    def _loss(self, input_ids, attention_mask, old_logprobs, old_values, advantages, returns, mask,
              rollout_logprobs=None):
        """The training forward and the PPO loss of some rows: (PPOLossOutput, entropy `[b, L-1]`)."""
        config = self.config
        packed = self._pack(input_ids, attention_mask, mask)
        logprobs, entropy, values, _ = self._forward(self.model, input_ids, attention_mask, mask, return_entropy=True,
                                                     packed=packed)
        if packed is not None:  # back to the [b, L-1] grid: the loss and its statistics run as on padded rows
            logprobs, entropy, values = (packing.unpack(x, packed) for x in (logprobs, entropy, values))
        out = ops.ppo_loss(logprobs, old_logprobs, values.float(), old_values, advantages, returns, mask,
                           config.cliprange, config.cliprange_value, config.vf_coef, backend=config.backend,
                           dual_clip=config.dual_clip, rollout_logprobs=rollout_logprobs,
                           rollout_is_cap=config.rollout_is_cap)
        return out, entropy, guards.output_flags(logprobs, values, mask, out.loss)

    def _train_minibatch(self, input_ids, attention_mask, old_logprobs, old_values, advantages, returns, mask,
                         rollout_logprobs=None):
        """Forward (eval mode, as TRL), loss, backward, optimizer step for one mini-batch:
        (stats, ratio-guard skip tensor, whether the optimizer stepped)."""
        config = self.config
        # Dropout never applies (TRL runs this in eval mode); gradient checkpointing needs train
        # mode, so with it dropout was disabled at construction instead.
        self.model.train(config.gradient_checkpointing)
        tensors = (input_ids, attention_mask, old_logprobs, old_values, advantages, returns, mask, rollout_logprobs)
        micro = self._token_budget_chunks(attention_mask) if config.max_tokens_per_microbatch is not None else []
        if len(micro) > 1:  # (refused under DeepSpeed)
            out, entropy, skip, flags = self._backward_microbatches(micro, tensors)
            stepped = self._guarded_optimizer_step(flags)
        else:
            out, entropy, flags = self._loss(*tensors)
            # TRL's loss-spike guard: zero the loss of a mini-batch whose mean ratio is too high
            # (as a tensor op, so no host sync per mini-batch).
            skip = out.ratio_mean > config.ratio_threshold
            keep = (~skip).float()
            out = out._replace(loss=out.loss * keep, pg_loss=out.pg_loss * keep, vf_loss=out.vf_loss * keep)
            stepped = False
            if not self._deepspeed_skips(flags):
                self.accelerator.backward(out.loss)
                stepped = self._guarded_optimizer_step(flags)
        with torch.no_grad():
            stats = step_statistics.minibatch_stats(out, entropy, advantages, returns, old_values, mask,
                                                    config.vf_coef)
        return stats, skip, stepped

    def _guarded_optimizer_step(self, flags: torch.Tensor) -> bool:
        """Clip and step unless this optimizer step's gradients, loss or outputs are non-finite; True if it stepped.

        `flags` (logits, values, loss) are OR-ed over the mini-batches one optimizer step accumulates; the
        gradient norm joins them at the step (on several processes one tiny all-reduce, so every process
        decides alike). A fused optimizer skips on the device, without a host read; another one needs one
        read per optimizer step. DeepSpeed steps inside backward: there the check runs before it
        (`_deepspeed_skips`) and the gradient norm is DeepSpeed's own business.
        """
        config = self.config
        if config.nonfinite_guard:
            self._accumulated_flags = flags if self._accumulated_flags is None else self._accumulated_flags | flags
        if not self.accelerator.sync_gradients:
            self.optimizer.step()  # accelerate: a no-op until the accumulation's last mini-batch
            self.optimizer.zero_grad()
            return False
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        accumulated = range(self._minibatch_index - config.gradient_accumulation_steps + 1, self._minibatch_index + 1)
        source, skip_on_device = None, contextlib.nullcontext()
        if config.nonfinite_guard and not sharding.is_deepspeed(self.accelerator):
            if grad_norm is None:
                grad_norm = guards.total_grad_norm(trainable)
            raised = torch.cat([self._accumulated_flags, ~torch.isfinite(grad_norm.to(flags.device)).reshape(1)])
            if config.world_size > 1:
                raised = self.accelerator.reduce(raised.int(), "max").bool()  # a device collective: every process alike
            skipping_optimizer = guards.device_skipping_optimizer(self.optimizer, self.accelerator)
            if skipping_optimizer is not None:  # skipped on the device; _optimize reads the flags at the step's end
                self._deferred_flags.append((accumulated, raised))
                skip_on_device = guards.skip_if(skipping_optimizer, raised.any())
            else:
                source = guards.first_source(raised.tolist())  # another optimizer: decided on the host
        self._accumulated_flags = None
        if source is not None:
            self._nonfinite.append((accumulated, source))
        else:
            with skip_on_device:
                self.optimizer.step()
        self.optimizer.zero_grad()
        return source is None  # a step skipped on the device counts until _optimize takes it back

    def _deepspeed_skips(self, flags: torch.Tensor) -> bool:
        """Under DeepSpeed (whose engine steps inside backward): True, and the step recorded as skipped, when
        any process's logits, values or loss are non-finite, so that no process runs this backward."""
        if not (self.config.nonfinite_guard and sharding.is_deepspeed(self.accelerator)):
            return False
        raised = flags.int()
        if self.config.world_size > 1:
            raised = self.accelerator.reduce(raised, "max")
        source = guards.first_source(raised.tolist())
        if source is not None:
            self._nonfinite.append((range(self._minibatch_index, self._minibatch_index + 1), source))
        return source is not None

    def _backward_microbatches(self, micro: list, tensors: tuple):
        """One mini-batch's gradient from token-budget micro-batches: (PPOLossOutput, entropy, skip, non-finite
        flags of all micro-batches).

        Every term of the PPO loss is a masked mean over the mini-batch's response tokens, so the
        micro-batch with n_i of its N tokens contributes its own loss × n_i / N: the accumulated
        gradient is the unsplit mini-batch's. TRL's ratio guard needs the whole mini-batch's mean
        ratio before any backward: a no-grad pass over the micro-batches finds it first.
        """
        mask = tensors[6]
        total = mask.sum().float()
        weights = [mask[rows].sum().float() / total for rows in micro]
        part = lambda rows: [t[rows] if t is not None else None for t in tensors]  # noqa: E731
        with torch.no_grad():
            ratio_mean = sum(w * self._loss(*part(rows))[0].ratio_mean for rows, w in zip(micro, weights))
        skip = ratio_mean > self.config.ratio_threshold
        keep = (~skip).float()
        outs, entropies, flags = [], [], None
        for index, (rows, weight) in enumerate(zip(micro, weights)):
            last = index == len(micro) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
            with sync:  # one gradient all-reduce per mini-batch, after its last micro-batch
                out, entropy, micro_flags = self._loss(*part(rows))
                flags = micro_flags if flags is None else flags | micro_flags
                self.accelerator.backward(out.loss * weight * keep)
            outs.append(out)
            entropies.append(entropy.detach())
        out = microbatch.combine_loss_outputs(outs, weights)
        out = out._replace(loss=out.loss * keep, pg_loss=out.pg_loss * keep, vf_loss=out.vf_loss * keep)
        return out, torch.cat(entropies), skip, flags

    def _nonfinite_origin(self, rollout: Rollout, rewards, advantages, mask) -> str:
        """Where a step whose every optimizer step was non-finite went wrong (the failure path only: it syncs)."""
        message = (f"step: all {len(self._nonfinite)} optimizer steps had non-finite values (first: "
                   f"{guards.describe(*self._nonfinite[0])}); nothing was applied. ")
        weight = guards.first_nonfinite(self.unwrapped_model.state_dict().items())  # the checkpoint's names
        if weight is not None:
            return message + f"The policy's weight {weight} already holds NaN/inf (load a good checkpoint)"
        trained = mask.bool()
        for name, tensor in (("policy log-probs (logits)", rollout.logprobs), ("values", rollout.values),
                             ("reference log-probs", rollout.ref_logprobs), ("rewards", rewards),
                             ("advantages", advantages)):
            if not bool(torch.isfinite(tensor[trained]).all()):
                return message + f"They started in the rollout's {name}, before any update"
        return message + "They started in the training forward or backward (e.g. an overflow in low precision)"

    def _maybe_clear_cache(self) -> None:
        """TRL's `optimize_device_cache`: hand cached accelerator memory back after each pass."""
        if self.config.optimize_device_cache:
            clear_device_cache(garbage_collection=True)

    def _should_stop_early(self, policykl: torch.Tensor) -> bool:
        policykl = policykl.detach().float()
        if self.config.world_size > 1:
            policykl = self.accelerator.reduce(policykl.to(self.current_device), "mean")
        if float(policykl) > 1.5 * self.config.target_kl:
            self.optimizer.zero_grad()
            return True
        return False

    # ------------------------------------------------------------------ logging and saving

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> None:
        """Send `stats` plus `env/reward_*` to accelerate's trackers (when `config.log_with` is set)."""
        if not isinstance(rewards, torch.Tensor):
            rewards = torch.tensor([float(r) for r in rewards])
        rewards = self.accelerator.gather(rewards.float().to(self.current_device)).flatten()
        if not self.accelerator.is_main_process:
            return
        logs = dict(stats)
        if self.config.log_with == "wandb" and all(column in batch for column in columns_to_log):
            import wandb

            rows = [list(row) for row in zip(*[batch[c] for c in columns_to_log], rewards.cpu().tolist())]
            logs["game_log"] = wandb.Table(columns=[*columns_to_log, "reward"], rows=rows)
        logs["env/reward_mean"] = rewards.mean().item()
        logs["env/reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
        logs["env/reward_dist"] = rewards.cpu().numpy()
        if self.config.log_with == "tensorboard":
            self.current_step += 1
        self.accelerator.log(logs, step=self.current_step if self.config.log_with == "tensorboard" else None)

    def save_pretrained(self, save_directory: str) -> None:
        """Save the policy (value head included) and the tokenizer to `save_directory`, from the main process.

        Call it on every process: under ZeRO-3 the weights are gathered (one module at a time)
        into one consolidated checkpoint that plain transformers loads.
        """
        if self.is_peft_model:  # PEFT saves the adapter itself; under ZeRO-3 from fully gathered weights
            with sharding.gathered(self.accelerator, self.model):
                if self.accelerator.is_main_process:
                    checks.refuse_nonfinite(self.unwrapped_model.named_parameters())
                    self._save_pretrained(save_directory)
        else:
            state = sharding.full_state_dict(self.accelerator, self.model)
            if self.accelerator.is_main_process:
                checks.refuse_nonfinite(state.items())
                self._state_to_save = state
                try:
                    self._save_pretrained(save_directory)
                finally:
                    self._state_to_save = None
        self.accelerator.wait_for_everyone()

    def save_state(self, output_dir: str) -> None:
        """Save everything needed to resume: weights, optimizer, scheduler, RNGs (accelerate) and trainer counters.

        Atomic: all of it goes to a sibling directory, is listed (sizes, sha256) in `fastppo_manifest.json`
        and flushed to disk, and only then replaces `output_dir`. A save killed at any moment leaves the
        previous checkpoint or the new one, both complete, never a mix (`fastppo.checkpointing` lists the
        states). Call it on every process. `output_dir` is the checkpoint's own: it is replaced whole, and
        an existing directory that is neither empty nor a fastppo checkpoint is refused.
        """
        state = {"kl_coef": self.kl_ctl.value, "running": self.running.state_dict(),
                 "current_step": self.current_step, "highest_reward": self.highest_reward,
                 "compare_step": self._compare_step}
        with self._checkpoint_layout():
            checkpointing.save(self.accelerator, output_dir, state, step=self.current_step)

    def _checkpoint_layout(self):
        """FSDP2's sharded checkpoints address weights by module path, not by the value-head model's own keys."""
        stack = contextlib.ExitStack()
        if sharding.is_fsdp(self.accelerator):
            for model in (self.model, self.ref_model):  # accelerate saves every model it prepared
                if model is not None:
                    stack.enter_context(self.accelerator.unwrap_model(model).module_key_layout())
        return stack

    def load_state(self, input_dir: str) -> None:
        """Resume from a `save_state` directory.

        Every file is checked against the checkpoint's manifest (present, size, sha256, nothing unlisted)
        before anything is loaded: a damaged checkpoint raises `fastppo.checkpointing.CheckpointError` (a
        ValueError naming the directory and the first bad file) and leaves the trainer as it was. A checkpoint
        without a manifest (fastppo before atomic saves) is refused the same way; `checkpointing.seal` vouches
        for one. If a save was cut between its renames, the complete checkpoint beside `input_dir` is loaded,
        with a warning. Call it on every process. (A sound checkpoint of another model or optimizer can still
        fail partway through accelerate's loading: the check is of the files, not of their fit.)
        """
        directory = checkpointing.verified_directory(self.accelerator, input_dir)
        with open(os.path.join(directory, checkpointing.TRAINER_STATE)) as handle:
            state = json.load(handle)
        # read before any loading, so that a missing entry cannot leave a half-loaded trainer
        kl_coef, running, current_step = float(state["kl_coef"]), dict(state["running"]), int(state["current_step"])
        highest_reward = float(state.get("highest_reward", -math.inf))
        compare_step = int(state.get("compare_step", 0))
        with self._checkpoint_layout():
            self.accelerator.load_state(directory)
        self.rollout_engine.weights_changed()
        self.kl_ctl.value = kl_coef
        self.running.load_state_dict(running)
        self.current_step = current_step
        self.highest_reward, self._compare_step = highest_reward, compare_step
