"""PPOTrainer: TRL's classic `generate` → score → `step` API on accelerate, with fastppo's ops.

`step` reads as its phases: check inputs → scores → padded batch → rollout forward (policy and
reference log-probs, values) → per-token rewards → advantages → PPO epochs over shuffled
mini-batches → statistics → KL-coefficient update. Each phase's machinery sits behind one seam
the trainer calls: the `ForwardPlan` (which rows go through the model together, packed or padded),
the `PPOEpochs` (mini-batches, loss, backward, optimizer steps) with its `StepGuard` (the
non-finite guard), the rollout engines (`fastppo.rollout`), and `fastppo.sharding` for what
DeepSpeed and FSDP2 change. The per-token math goes through `fastppo.ops`, which picks the Triton
kernels or the PyTorch reference. TRL's public per-phase methods come from `TRLMethods`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from transformers import PreTrainedTokenizerBase, set_seed

from . import checkpointing, sharding
from .config import PPOConfig
from .models import heads, policy
from .models.value_head import AutoModelForCausalLMWithValueHead, create_reference_model, disable_dropout
from .rollout import build_engines
from .rollout.outputs import draw_lengths, list_output, single_output
from .training import agreement, checks, estimators, inputs, padding, step_guard
from .training import stats as step_statistics
from .training.controllers import AdaptiveKLController, FixedKLController, RunningMoments, prepare_scores
from .training.experience import Experience, PaddedBatch, Rollout, RowLayout
from .training.forward_plan import ForwardPlan
from .training.ppo_epochs import PPOEpochs
from .training.profiling import profiler_range
from .training.trl_methods import TRLMethods


class PPOTrainer(TRLMethods):
    """PPO for a causal LM with a value head, TRL 0.11 classic math by default.

    Args:
        config: a `PPOConfig`.
        model: the policy, an `AutoModelForCausalLMWithValueHead`; with a critic-free `advantage_estimator` also a
            plain transformers causal LM (or a PEFT model of one), trained and saved as it is.
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
        model, ref_model = policy.wrap_plain_models(config, model, ref_model)  # critic-free: a causal LM as it is
        checks.check_constructor_args(config, model, ref_model, tokenizer, optimizer, num_shared_layers, lr_scheduler)
        self.config, self.tokenizer, self.data_collator = config, tokenizer, training_data_collator
        self._warn_unreached_overrides()
        if dataset is None:
            warnings.warn("PPOTrainer has no dataset: each step trains on the batch you pass, which must hold "
                          f"config.batch_size={config.batch_size} rows (per process)")
        set_seed(config.seed)
        self.accelerator = Accelerator(log_with=config.log_with, project_config=ProjectConfiguration(
            **config.project_kwargs), gradient_accumulation_steps=config.gradient_accumulation_steps,
            **config.accelerator_kwargs)
        self.is_peft_model = model.is_peft_model
        self.head_mode = heads.head_mode(config)
        checks.check_environment(config, self.accelerator, model, ref_model, num_shared_layers, self.head_mode)
        # TRL's derived fields, for code that reads them
        config.world_size = sharding.world_size(self.accelerator)  # DeepSpeed on CPU: accelerate may say 1
        config.global_backward_batch_size = config.backward_batch_size * config.world_size
        config.global_batch_size = config.batch_size * config.world_size
        config.is_encoder_decoder = getattr(model, "is_encoder_decoder", False)  # TRL's test of the model
        config.is_peft_model = model.is_peft_model

        ref_model = checks.drop_unneeded_reference(config, ref_model, num_shared_layers)
        if ref_model is None and not self.is_peft_model and config.needs_reference:  # PEFT: the adapter-free base
            ref_model = create_reference_model(model, num_shared_layers=num_shared_layers)
        if not config.uses_critic and model.v_head is not None:  # critic-free: the value head is neither run nor
            model.v_head.requires_grad_(False)  # trained (nor held by Adam)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            disable_dropout(model)  # the training forward then runs in train mode (see training.ppo_epochs)
        if optimizer is None:
            optimizer = step_guard.default_adam([p for p in model.parameters() if p.requires_grad],
                                                config.learning_rate, fused=not sharding.is_deepspeed(self.accelerator)
                                                and not sharding.shards_parameters(self.accelerator))
        checks.check_model_pairing(model, ref_model, optimizer)
        checks.warn_low_precision_training(model, self.accelerator)
        self.dataset = dataset
        dataloader = self.prepare_dataloader(dataset, data_collator, model) if dataset is not None else None

        sharding.configure_deepspeed(self.accelerator, config)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.dataloader = self.accelerator.prepare(dataloader) if dataloader is not None else None
        self.lr_scheduler = self.accelerator.prepare(lr_scheduler) if lr_scheduler is not None else None
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = sharding.prepare_reference(self.accelerator, ref_model, config.mini_batch_size)
        self.current_device = self.accelerator.device

        self.forward_plan = ForwardPlan(config, self.accelerator, self.head_mode)
        self.forward_plan.install_attention(self.model, self.ref_model)
        self.forward_plan.check_models_pack(self.model, self.ref_model, self.vocab_size)
        self.rollout_engine, self.hf_engine = build_engines(config, self.accelerator, tokenizer)
        guard = step_guard.StepGuard(config, self.accelerator, self.model, self.optimizer)
        self.ppo_epochs = PPOEpochs(config, self.accelerator, self.model, self.optimizer, self.forward_plan, guard)
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon) if config.adap_kl_ctrl
                       else FixedKLController(config.init_kl_coef))
        self.running = RunningMoments()
        self.current_step = 0
        self._config_at_start = copy.deepcopy(config.to_dict())  # step refuses a config changed since
        self.highest_reward, self._compare_step = -math.inf, 0  # push_to_hub_if_best_kwargs
        self.accelerator.init_trackers(config.tracker_project_name, config=config.to_dict(),
                                       init_kwargs=config.tracker_kwargs)

    @property
    def unwrapped_model(self) -> AutoModelForCausalLMWithValueHead:
        return sharding.unwrap(self.accelerator, self.model)

    @property
    def vocab_size(self) -> int:
        return sharding.vocab_size(self.unwrapped_model.lm_head.weight)

    def _reference_model(self):
        """The model the KL penalty compares with: a PEFT policy itself (run in `optional_peft_ctx`), else ref_model;
        None when nothing compares with one (`config.needs_reference` False)."""
        if not self.config.needs_reference:
            return None
        return self.model if self.is_peft_model else self.ref_model

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
        single = isinstance(query_tensor, torch.Tensor)

        def check(agree):  # on every process together (agreement): the host's checks, then the ids' one read
            inputs.check_generate_options(batch_size, return_logprobs, self.is_encoder_decoder)
            if not single or generation_kwargs.get("num_return_sequences", 1) != 1:
                self._require_pad_token("generate")  # batched queries are left-padded, samples right-padded
            if self.tokenizer.pad_token_id is not None:
                generation_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            names, queries = inputs.check_queries(query_tensor, self.current_device)
            inputs.check_generation_lengths(queries, single, length_sampler, generation_kwargs,
                                            checks.max_positions(self.unwrapped_model), self.is_encoder_decoder)
            self.rollout_engine.check_kwargs(self.model, generation_kwargs)
            if generate_ref_response:
                if self._reference_model() is None:
                    raise ValueError("generate_ref_response=True: this run has no reference model (init_kl_coef "
                                     "and kl_loss_coef are 0)")
                self.hf_engine.check_kwargs(self._reference_model(), generation_kwargs)
            inputs.check_query_ids(names, queries, self.vocab_size, agree)
            return queries

        queries = agreement.decided_together(self.accelerator, check)
        return_prompt = return_prompt and not self.is_encoder_decoder  # (TRL: a decoder's sequence has no prompt)

        def sample(engine, model):
            lengths = draw_lengths(length_sampler, len(queries), batch_size)
            with contextlib.nullcontext() if engine.gathers_own_weights else sharding.gathered(self.accelerator,
                                                                                                model):
                samples = engine.generate(model, queries, lengths, batch_size, generation_kwargs, return_logprobs)
            if single:
                return single_output(queries[0], samples[0], self.tokenizer.pad_token_id, return_prompt,
                                     return_logprobs)
            return list_output(queries, samples, self.tokenizer.eos_token_id, return_prompt, remove_padding,
                               return_logprobs)

        responses = sample(self.rollout_engine, self.model)
        if not generate_ref_response:
            return responses
        with self.optional_peft_ctx():
            return responses, sample(self.hf_engine, self._reference_model())

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
        with profiler_range("fastppo/step"):
            with profiler_range("fastppo/check_inputs"):  # on every process together (training.agreement)
                batch = agreement.decided_together(self.accelerator, lambda agree: self._check_step_inputs(
                    queries, responses, scores, response_masks, rollout_logprobs, agree))
            with self._restored_on_error():
                return self._step(batch)

    def _check_step_inputs(self, queries, responses, scores, response_masks, rollout_logprobs, agree):
        self._require_pad_token("step")
        checks.check_config_unchanged(self.config, self._config_at_start)
        return inputs.check_step_inputs(queries, responses, scores, response_masks, self.config.batch_size,
                                        self.vocab_size, self.current_device, rollout_logprobs,
                                        max_length=checks.max_positions(self.unwrapped_model),
                                        rollout_correction=self.config.rollout_correction,
                                        encoder_decoder=self.is_encoder_decoder, group_size=self.config.group_size,
                                        agree=agree)

    @contextlib.contextmanager
    def _restored_on_error(self):
        """On an exception inside step: clear gradients, restore modes, running moments and the accumulation phase."""
        was_training = self.unwrapped_model.training  # a DeepSpeed engine's own flag does not follow train()/eval()
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
            self.ppo_epochs.guard.reset()
            raise

    def _step(self, batch: inputs.StepInputs) -> dict:
        timing, start = {}, time.time()
        scores = prepare_scores(batch.scores, self.config, self.running, self.accelerator)
        self._push_if_best(scores)

        with step_statistics.timed(timing, "time/ppo/forward_pass", "fastppo/rollout_forward"):
            padded = self._pad_batch(batch.queries, batch.responses, batch.response_masks)
            rollout = self._rollout(padded)
            engine_logprobs = None
            if batch.rollout_logprobs is not None:
                engine_logprobs = padding.place_responses(padded.attention_mask, [len(q) for q in batch.queries],
                                                          batch.rollout_logprobs,
                                                          None if padded.layout is None else padded.layout.starts)
        with step_statistics.timed(timing, "time/ppo/compute_rewards", "fastppo/rewards"):
            kl_coef = self.kl_ctl.value
            full_kl = {} if rollout.full_kl is None else {"kl": rollout.full_kl}
            rewards, non_score_reward, kls = self.compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs,
                                                                  padded.mask, **full_kl)
        with step_statistics.timed(timing, "time/ppo/compute_advantages", "fastppo/advantages"):
            if self.config.uses_critic:
                (values, advantages, returns), group_stats = self.compute_advantages(rollout.values, rewards,
                                                                                     padded.mask), {}
            else:  # no critic: zeros for the values and returns
                values, advantages, returns, group_stats = estimators.advantages(self.config, rewards, padded.mask)
        with step_statistics.timed(timing, "time/ppo/optimize_step", "fastppo/optimize"):
            self.rollout_engine.weights_changed()  # from here on the policy may move
            experience = Experience(padded.input_ids, padded.attention_mask, padded.mask, old_logprobs=rollout.logprobs,
                                    old_values=values, advantages=advantages, returns=returns,
                                    rollout_logprobs=engine_logprobs if self.config.rollout_correction == "tis"
                                    else None, layout=padded.layout, encoder_input_ids=padded.encoder_input_ids,
                                    ref_logprobs=rollout.ref_logprobs if self.config.kl_loss_coef > 0 else None,
                                    encoder_attention_mask=padded.encoder_attention_mask)
            train_stats, optimisation = self.ppo_epochs.run(experience)
        if optimisation["fastppo/skipped_nonfinite"] and not optimisation["fastppo/optimizer_steps"]:
            raise FloatingPointError(self.ppo_epochs.guard.failure_message(self.unwrapped_model, [
                ("policy log-probs (logits)", rollout.logprobs), ("values", rollout.values),
                ("reference log-probs", rollout.ref_logprobs), ("rewards", rewards), ("advantages", advantages)],
                padded.mask))

        with step_statistics.timed(timing, "time/ppo/calc_stats", "fastppo/stats"):
            overridden = type(self).record_step_stats is not TRLMethods.record_step_stats
            record = (lambda coef, data: self.record_step_stats(coef, **data)) if overridden else self._step_stats
            stats = record(kl_coef, dict(
                scores=scores, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs,
                non_score_reward=non_score_reward, train_stats=train_stats, kls=kls, masks=padded.mask,
                queries=batch.queries, responses=batch.responses,
            ))
            stats.update(group_stats)
            if engine_logprobs is not None:
                stats.update(step_statistics.rollout_mismatch_stats(rollout.logprobs, engine_logprobs, padded.mask))
            if self.is_distributed:
                stats = self.gather_stats(stats)
            stats = step_statistics.to_python(stats)  # the step's one read of its statistics
            step_statistics.warn_if_negative_kl(stats["objective/kl"])
        stats["ppo/learning_rate"] = self.optimizer.param_groups[0]["lr"]

        if math.isfinite(stats["objective/kl"]):
            self.kl_ctl.update(stats["objective/kl"], self.config.batch_size * sharding.world_size(self.accelerator))
        else:
            warnings.warn(f"objective/kl is {stats['objective/kl']}: the KL coefficient was not updated")
        timing["time/ppo/total"] = time.time() - start
        stats.update(timing)
        stats.update(optimisation)
        tokens = sum(padded.layout.lengths) if padded.layout is not None else float(padded.attention_mask.sum())
        stats["fastppo/tokens_per_s"] = tokens / max(timing["time/ppo/total"], 1e-9)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return stats

    def _pad_batch(self, queries, responses, response_masks) -> PaddedBatch:
        """The step's rows, padded (`prepare_model_inputs`; with padding_free always right-padded, as packing drops
        the pads), and their response mask (see fastppo.training.padding). Every process pads to the widest row.
        Each row's start and length stay on the host (unless a `training_data_collator` padded the rows).
        An encoder-decoder model's rows are its responses (the decoder's), its queries the encoder's."""
        encoder, pad = None, self.tokenizer.pad_token_id
        side = "right" if self.config.padding_free else padding.padding_side(self.tokenizer)
        lengths, prefixes, trained, response_masks = padding.row_parts(queries, responses, self.is_encoder_decoder,
                                                                       response_masks)
        if self.config.padding_free:
            sequences = [torch.cat([q, r]) for q, r in zip(queries, responses)]
            input_ids, attention_mask = padding.pad_rows(sequences, max(lengths), pad, "right", self.current_device)
        else:
            model_inputs = self.prepare_model_inputs(queries, responses)
            input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
            if self.is_encoder_decoder:
                encoder = (input_ids, attention_mask)
                input_ids, attention_mask = model_inputs["decoder_input_ids"], model_inputs["decoder_attention_mask"]
        if self.is_distributed:  # one gather of the widths (the encoder's too)
            local = [input_ids.shape[1]] + ([encoder[0].shape[1]] if encoder is not None else [])
            widths = self.accelerator.gather(torch.tensor([local], device=self.current_device)).max(0).values.tolist()
            input_ids, attention_mask = padding.widen(input_ids, attention_mask, widths[0], pad, side)
            if encoder is not None:
                encoder = padding.widen(*encoder, widths[1], pad, side)
        known = self.config.padding_free or self.data_collator is None
        starts = padding.row_starts(lengths, input_ids.shape[1], side) if known else None
        mask = padding.response_mask(attention_mask, prefixes, trained, response_masks, starts)
        layout = RowLayout(tuple(starts), tuple(lengths), tuple(prefixes)) if known else None
        return PaddedBatch(input_ids, attention_mask, mask, layout, *(encoder or (None, None)))

    @torch.no_grad()
    def _rollout(self, padded: PaddedBatch) -> Rollout:
        """Policy and reference forward passes over the batch, in the forward plan's groups of rows."""
        plan, full, reference_model = self.forward_plan, self.config.kl_penalty == "full", self._reference_model()
        self.model.eval()
        if self.ref_model is not None:
            self.ref_model.eval()  # whatever mode it was left in: the reference's log-probs never get dropout
        parts = {"logprobs": [], "ref_logprobs": [], "values": [], "full_kl": []}
        layout = padded.layout
        for rows in plan.rollout_slices(padded.attention_mask, None if layout is None else layout.lengths):
            batch = plan.prepare(padded.input_ids[rows], padded.attention_mask[rows], padded.mask[rows],
                                 layout=None if layout is None else layout.select(rows), encoder=padded.encoder(rows))
            policy = reference = plan.forward(self.model, batch)  # without a reference the policy is its own: KL 0
            if reference_model is not None:
                with self.optional_peft_ctx():
                    reference = plan.forward(reference_model, batch)
            parts["logprobs"].append(policy.logprobs)
            parts["ref_logprobs"].append(reference.logprobs)
            parts["values"].append(policy.values.float())
            if full:
                parts["full_kl"].append(plan.full_kl(batch, policy, reference) if reference_model is not None
                                        else torch.zeros_like(policy.logprobs))
            del policy, reference
            plan.release_cache()
        return Rollout(logprobs=torch.cat(parts["logprobs"]), ref_logprobs=torch.cat(parts["ref_logprobs"]),
                       values=torch.cat(parts["values"]), full_kl=torch.cat(parts["full_kl"]) if full else None)

    # ------------------------------------------------------------------ resuming

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
        with sharding.checkpoint_layout(self.accelerator, (self.model, self.ref_model)):
            checkpointing.save(self.accelerator, output_dir, state, step=self.current_step)

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
        state = checkpointing.read_trainer_state(directory)
        with sharding.checkpoint_layout(self.accelerator, (self.model, self.ref_model)):
            self.accelerator.load_state(directory)
        self.rollout_engine.weights_changed()
        self.kl_ctl.value, self.current_step = state["kl_coef"], state["current_step"]
        self.running.load_state_dict(state["running"])
        self.highest_reward, self._compare_step = state["highest_reward"], state["compare_step"]
