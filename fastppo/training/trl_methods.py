"""TRL 0.11's public `PPOTrainer` methods and attributes, for scripts and subclasses written against TRL.

`step` calls `prepare_model_inputs`, `compute_rewards`, `compute_advantages`, `record_step_stats`
and `gather_stats` (on several processes), so overriding one of them changes what `step` does,
as in TRL. `batched_forward_pass`, `loss` and `train_minibatch` take and return what TRL's do,
but `step` trains through its own fused path (no `[B, T, V]` logits), so overriding them does
not reach `step`: PPOTrainer warns at construction when a subclass does. Each is a thin layer over
what `step` runs: `batched_forward_pass` goes through the trainer's `ForwardPlan`, `loss` through
the same loss and ratio guard as the PPO epochs, `train_minibatch` and `_early_stop` through its
`PPOEpochs` (so through the non-finite guard), the math through `fastppo.ops`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Callable, Optional

import torch

from .. import core, ops, sharding
from . import checks, inputs, padding, ppo_epochs, step_guard
from . import stats as step_statistics

# What step does not call: a subclass overriding one of these gets a warning at construction.
NOT_CALLED_BY_STEP = ("batched_forward_pass", "loss", "train_minibatch")


class TRLMethods:
    """Mixed into PPOTrainer: TRL's public per-phase methods, backed by fastppo's ops."""

    # ------------------------------------------------------------------ attributes TRL code reads

    @property
    def is_distributed(self) -> bool:
        return sharding.world_size(self.accelerator) > 1

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the policy is an encoder-decoder model (TRL's test: the model has `is_encoder_decoder`)."""
        return bool(self.config.is_encoder_decoder)

    @property
    def model_params(self) -> list:
        """The trainable parameters (a list: TRL's one-shot iterator clipped only the first step's gradients)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def optional_peft_ctx(self):
        """A callable giving the context that turns the policy into the reference (PEFT: adapter disabled);
        `step` and `generate(generate_ref_response=True)` use it too."""
        if self.is_peft_model:
            return self.unwrapped_model.pretrained_model.disable_adapter
        return contextlib.nullcontext

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

    def _warn_unreached_overrides(self) -> None:
        for name in NOT_CALLED_BY_STEP:
            if getattr(type(self), name) is not getattr(TRLMethods, name):
                warnings.warn(f"{type(self).__name__} overrides {name}, which fastppo's step does not call (it "
                              "trains through fused log-probs without [B, T, V] logits); the override only applies "
                              "where you call it yourself")

    def _require_pad_token(self, where: str) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer has no pad token, which {where} needs to pad the batch; set one first, "
                             "e.g. tokenizer.pad_token = tokenizer.eos_token")

    # ------------------------------------------------------------------ the step's phases

    def prepare_model_inputs(self, queries: list, responses: list) -> dict:
        """`{"input_ids", "attention_mask"}` `[B, L]` of query+response rows, padded on the tokenizer's side
        to the longest row (by `training_data_collator` when one was given), on the trainer's device. For an
        encoder-decoder model, the queries padded so and the responses as `decoder_input_ids` and
        `decoder_attention_mask`, as TRL's."""
        self._require_pad_token("prepare_model_inputs")
        if not self.is_encoder_decoder:
            return self._padded([torch.cat([q, r]) for q, r in zip(queries, responses)])
        decoder = self._padded(responses)
        return {**self._padded(queries), "decoder_input_ids": decoder["input_ids"],
                "decoder_attention_mask": decoder["attention_mask"]}

    def _padded(self, sequences: list) -> dict:
        sequences = [s.to(self.current_device) for s in sequences]
        if self.data_collator is not None:
            batch = self.data_collator([{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in sequences])
            return {key: value.to(self.current_device) for key, value in batch.items() if key != "labels"}
        input_ids, attention_mask = padding.pad_rows(
            sequences, max(len(s) for s in sequences), self.tokenizer.pad_token_id,
            padding.padding_side(self.tokenizer), self.current_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def batched_forward_pass(self, model, queries: list, responses: list, model_inputs: dict,
                             return_logits: bool = False, response_masks: Optional[list] = None):
        """`(logprobs, logits or None, values, masks)`, all `[B, L-1]` (logits `[B, L-1, V]`), `mini_batch_size`
        rows at a time, in eval mode; position t scores token t+1. `masks` marks each row's response tokens
        (times `response_masks`). Without `return_logits`, the configured LM-head path runs: with
        response_only_logits/fused_lm_head, log-probs off the response are 0."""
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        encoder = None
        if self.is_encoder_decoder:  # the rows scored are the decoder's (see fastppo.training.padding)
            encoder = (input_ids, attention_mask)
            input_ids, attention_mask = model_inputs["decoder_input_ids"], model_inputs["decoder_attention_mask"]
        _, prefixes, trained, response_masks = padding.row_parts(queries, responses, self.is_encoder_decoder,
                                                                 response_masks)
        masks = padding.response_mask(attention_mask, prefixes, trained, response_masks)
        model.eval()
        parts = {"logprobs": [], "logits": [], "values": []}
        chunk = self.config.mini_batch_size
        for start in range(0, input_ids.shape[0], chunk):
            rows = slice(start, start + chunk)
            batch = self.forward_plan.prepare(input_ids[rows], attention_mask[rows], masks[rows], pack=False,
                                              encoder=None if encoder is None else (encoder[0][rows], encoder[1][rows]))
            out = self.forward_plan.forward(model, batch, keep_logits=return_logits)
            parts["logprobs"].append(out.logprobs)
            parts["values"].append(out.values)
            if return_logits:  # otherwise each pass's logits go as soon as its log-probs are taken
                parts["logits"].append(out.logits)
        logits = torch.cat(parts["logits"]) if return_logits else None
        return torch.cat(parts["logprobs"]), logits, torch.cat(parts["values"]).float(), masks

    def compute_rewards(self, scores, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, masks: torch.Tensor,
                        kl: Optional[torch.Tensor] = None):
        """Per-token rewards from scores and the KL penalty at the current `kl_ctl.value`:
        `(rewards, non_score_rewards, kls)`, each `[B, T]`.

        scores `[B]` (or a list of scalars); logprobs/ref_logprobs `[B, T]`, or with kl_penalty="full"
        the whole log-distributions `[B, T, V]` as TRL passes them (or `kl` `[B, T]`, the exact KL
        already computed). The score goes on each row's last masked token; rewards are 0 off the mask.
        """
        if not isinstance(scores, torch.Tensor):
            scores = torch.stack([torch.as_tensor(s) for s in scores])
        kl_coef = self.kl_ctl.value
        if self.config.kl_penalty == "full" and kl is None:
            if logprobs.dim() != 3:
                raise ValueError("logprobs: kl_penalty='full' needs the whole log-distributions [B, T, V] "
                                 "(core.logprobs_from_logits(logits, None, gather=False)), got "
                                 f"{tuple(logprobs.shape)}")
            kl = ops.full_kl(logprobs, ref_logprobs, backend=self.config.backend)
        if kl is not None:
            logprobs = ref_logprobs = kl  # only their shape is read for the exact KL
        rewards, kls = ops.kl_penalty_rewards(logprobs, ref_logprobs, masks, scores.float().to(masks.device),
                                              kl_coef, estimator=self.config.kl_penalty, kl=kl,
                                              backend=self.config.backend)
        return rewards, -kl_coef * kls, kls

    def _kl_penalty(self, logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
        """The configured per-token KL estimate (kl_penalty="full": from `[..., V]` log-distributions)."""
        if self.config.kl_penalty == "full":
            return ops.full_kl(logprob, ref_logprob, backend=self.config.backend)
        ones = torch.ones(logprob.shape, dtype=torch.long, device=logprob.device)
        zeros = torch.zeros(logprob.shape[0], device=logprob.device)
        return ops.kl_penalty_rewards(logprob, ref_logprob, ones, zeros, 0.0, estimator=self.config.kl_penalty,
                                      backend=self.config.backend)[1]

    def compute_advantages(self, values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor):
        """`(masked values, whitened GAE advantages, returns)`, each `[B, T]`, TRL's classic math."""
        if self.config.whiten_rewards:
            # TRL whitens pad positions too and GAE carries them into the response; re-mask.
            rewards = ops.masked_whiten(rewards * mask, mask, shift_mean=False, backend=self.config.backend) * mask
        advantages, returns = ops.gae(rewards, values, mask, self.config.gamma, self.config.lam,
                                      backend=self.config.backend)
        advantages = ops.masked_whiten(advantages, mask, backend=self.config.backend)
        return values * mask, advantages, returns

    _compute_advantages = compute_advantages  # its name before it was public (tests use it)

    def loss(self, old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
        """TRL's `loss`: `(pg_loss, vf_coef · vf_loss, stats)` with stats flat under TRL's keys
        ("loss/policy", "policy/ratio", "val/error", ...). A mini-batch whose mean ratio exceeds
        `ratio_threshold` has its losses zeroed, with a warning. `logits` `[B, T, V]` give the entropy."""
        config = self.config
        weights = ppo_epochs.loss_weights_for(config, mask, mask.sum(-1).amax())  # these rows are the mini-batch
        out = ppo_epochs.ppo_loss_for(config, logprobs, old_logprobs, vpreds, values, advantages, returns, mask,
                                      loss_weights=weights)
        skip = ppo_epochs.ratio_spikes(out.ratio_mean, config.ratio_threshold)
        if bool(skip):  # TRL warns per mini-batch: a host read `step` itself does not make
            warnings.warn(f"mean ratio {float(out.ratio_mean):.2f} of this mini-batch exceeds ratio_threshold="
                          f"{config.ratio_threshold:.2f}; its loss is zeroed")
        out = ppo_epochs.zero_losses(out, skip)
        with torch.no_grad():
            entropy = core.entropy_from_logits(logits)
            stats = step_statistics.minibatch_stats(out, entropy, advantages, returns, values, mask, config.vf_coef)
        stats["policy/advantages"] = advantages.detach()
        stats["policy/ratio"] = out.ratio
        return out.pg_loss, config.vf_coef * out.vf_loss, stats

    def train_minibatch(self, old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns) -> dict:
        """One optimizer step on `loss` of outputs the caller computed with gradient; returns its stats. The step
        goes through the non-finite guard, as inside `step`: non-finite log-probs, values, loss or gradients
        skip it (weights and optimizer state untouched) with a warning."""
        self.model.train()
        loss_p, loss_v, train_stats = self.loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages,
                                                returns)
        loss = loss_p + loss_v
        self.ppo_epochs.apply(loss, step_guard.output_flags(logprobs, vpreds, mask, loss))
        return train_stats

    def record_step_stats(self, kl_coef: float, **data) -> dict:
        """The step's `objective/*`, `ppo/*` and `tokens/*` statistics (tensors; `step` converts them).

        data: scores, logprobs, ref_logprobs, non_score_reward, kls, masks, queries, responses, and
        train_stats (each key's values over mini-batches stacked along the first dim: its mean is kept).
        """
        stats = self._step_stats(kl_coef, data)
        step_statistics.warn_if_negative_kl(float(stats["objective/kl"]))
        return stats

    def _step_stats(self, kl_coef: float, data: dict) -> dict:
        """`record_step_stats` without its warning, which `step` gives after its one read of the statistics."""
        train_stats = {key: torch.mean(value, dim=0) for key, value in data["train_stats"].items()}
        return step_statistics.step_stats(
            scores=data["scores"], logprobs=data["logprobs"], ref_logprobs=data["ref_logprobs"], kls=data["kls"],
            kl_coef=kl_coef, mask=data["masks"], query_lengths=[len(q) for q in data["queries"]],
            response_lengths=[len(r) for r in data["responses"]], train_stats=train_stats,
            non_score_reward=data["non_score_reward"])

    def gather_stats(self, stats: dict) -> dict:
        """Every scalar tensor statistic averaged over processes (distributions stay per process)."""
        return step_statistics.reduce_across_processes(stats, self.accelerator)

    def _early_stop(self, policykl: torch.Tensor) -> bool:
        """True (and gradients zeroed) when early_stopping is on and the policy KL passed 1.5 × target_kl."""
        return bool(self.config.early_stopping) and self.ppo_epochs.should_stop_early(policykl)

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

    def _step_safety_checker(self, batch_size: int, queries: list, responses: list, scores, masks=None):
        """Check and move the step's inputs as `step` does: `(queries, responses, scores, masks)` on the device."""
        batch = inputs.check_step_inputs(queries, responses, scores, masks, batch_size, self.vocab_size,
                                         self.current_device, encoder_decoder=self.is_encoder_decoder)
        return batch.queries, batch.responses, list(batch.scores), batch.response_masks

    # ------------------------------------------------------------------ saving and logging

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> None:
        """Send `stats` plus `env/reward_*` to accelerate's trackers (when `config.log_with` is set); with wandb,
        also the `game_log` table of `columns_to_log` (gathered from every process) and the rewards. Raises
        ValueError, on every process, when one of `columns_to_log` is not in `batch` (TRL's behaviour)."""
        table = self.config.log_with == "wandb"
        if table:
            missing = [column for column in columns_to_log if column not in batch]
            if missing:
                raise ValueError(f"columns_to_log: {missing} not in the batch (its keys: {sorted(batch)}); pass "
                                 "columns_to_log naming only the batch's keys")
        if not isinstance(rewards, torch.Tensor):
            rewards = torch.tensor([float(r) for r in rewards])
        rewards = self.accelerator.gather(rewards.float().to(self.current_device)).flatten()
        columns = [list(batch[column]) for column in columns_to_log] if table else []
        if table and self.is_distributed:
            from accelerate.utils import gather_object

            columns = [gather_object(column) for column in columns]
        if not self.accelerator.is_main_process:
            return
        logs = dict(stats)
        if table:
            import wandb

            rows = [list(row) for row in zip(*columns, rewards.cpu().tolist())]
            logs["game_log"] = wandb.Table(columns=[*columns_to_log, "reward"], rows=rows)
        logs["env/reward_mean"] = rewards.mean().item()
        logs["env/reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
        logs["env/reward_dist"] = rewards.cpu().numpy()
        if self.config.log_with == "tensorboard":
            self.current_step += 1
        self.accelerator.log(logs, step=self.current_step if self.config.log_with == "tensorboard" else None)

    def save_pretrained(self, save_directory: str) -> None:
        """Save the policy (value head included) and the tokenizer to `save_directory`, from the main process.

        Call it on every process: under ZeRO-3/FSDP2 the weights are gathered (one module at a time)
        into one consolidated checkpoint that plain transformers loads. Refuses NaN/inf weights.
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
                self._consolidated_state = state  # what _save_pretrained writes, whoever overrides it
                try:
                    self._save_pretrained(save_directory)
                finally:
                    self._consolidated_state = None
        self.accelerator.wait_for_everyone()

    def _save_pretrained(self, save_directory: str) -> None:
        """Write the policy (value head included) and the tokenizer: what `save_pretrained` runs on the main
        process once the weights are gathered. Override it to save more."""
        self.unwrapped_model.save_pretrained(save_directory, state_dict=getattr(self, "_consolidated_state", None))
        self.tokenizer.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, commit_message: str = "Push model using huggingface_hub.",
                    private: Optional[bool] = None, token: Optional[str] = None, branch: Optional[str] = None,
                    create_pr: Optional[bool] = None, allow_patterns=None, ignore_patterns=None,
                    delete_patterns=None) -> Optional[str]:
        """Upload the policy (value head included), the tokenizer and a model card to `repo_id` in one commit,
        creating the repository if needed, as TRL's trainer does; returns the commit URL (None off the main
        process, which alone pushes)."""
        if not self.accelerator.is_main_process:
            return None
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self._save_pretrained(folder)
            self.create_model_card(folder, model_name=repo_id)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=branch, create_pr=create_pr, allow_patterns=allow_patterns,
                                     ignore_patterns=ignore_patterns, delete_patterns=delete_patterns)

    def create_model_card(self, path: str, model_name: Optional[str] = "fastppo model") -> None:
        """Write a short model card (README.md) into `path`, saying how the model was trained."""
        os.makedirs(path, exist_ok=True)
        base = getattr(self.unwrapped_model.config, "_name_or_path", "") or "a causal LM"
        with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(f"---\nlibrary_name: fastppo\ntags:\n- ppo\n- rlhf\n---\n\n# {model_name}\n\n"
                         f"{base} fine-tuned with PPO (fastppo, TRL 0.11's classic PPOTrainer math), with a value "
                         "head (`v_head.summary.*`). Load it with `fastppo.AutoModelForCausalLMWithValueHead."
                         "from_pretrained(path)` or `trl.AutoModelForCausalLMWithValueHead.from_pretrained(path)`; "
                         "plain `transformers.AutoModelForCausalLM.from_pretrained(path)` loads the LM.\n")
