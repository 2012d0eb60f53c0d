"""PPOConfig: TRL-classic (v0.11) field names and defaults, plus fastppo's own switches.

Every field keeps TRL's name and default so a TRL script's `PPOConfig(...)` call works
unchanged. Invalid values raise `ValueError` at construction, naming the field.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

KL_PENALTIES = ("kl", "abs", "mse", "full", "k3")
BACKENDS = ("auto", "torch", "triton")
ROLLOUT_ENGINES = ("hf", "vllm")
ROLLOUT_CORRECTIONS = (None, "tis")
# vllm.LLM arguments fastppo sets itself: the engine is built from the policy, not from a checkpoint.
VLLM_RESERVED = ("model", "tokenizer", "load_format", "skip_tokenizer_init", "generation_config")


def _default_exp_name() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0] or "fastppo"))[0] or "fastppo"


@dataclass
class PPOConfig:
    """Hyper-parameters of `PPOTrainer`; defaults reproduce TRL 0.11's classic PPOTrainer."""

    exp_name: str = field(default_factory=_default_exp_name)
    """Name of the experiment (tracking only)."""
    seed: int = 0
    """Seed for `random`, `numpy` and `torch`, set when the trainer is built (fixes mini-batch order)."""
    log_with: Optional[str] = None
    """Tracker for `log_stats` through accelerate: "wandb", "tensorboard", ... or None."""
    task_name: Optional[str] = None
    """Task name (tracking only)."""
    model_name: str = "gpt2"
    """Model name (tracking only)."""
    query_dataset: str = "stanfordnlp/imdb"
    """Query dataset name (tracking only)."""
    reward_model: str = "sentiment-analysis:lvwerra/distilbert-imdb"
    """Reward model name (tracking only)."""
    remove_unused_columns: bool = True
    """Drop a `datasets.Dataset`'s columns the model's forward does not take (label/query/response stay)."""
    tracker_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for the tracker's init (`Accelerator.init_trackers(init_kwargs=...)`)."""
    accelerator_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for `accelerate.Accelerator` (e.g. mixed_precision)."""
    project_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for `accelerate.utils.ProjectConfiguration` (e.g. logging_dir)."""
    tracker_project_name: str = "trl"
    """Project name the trackers log under."""
    push_to_hub_if_best_kwargs: dict = field(default_factory=dict)
    """`push_to_hub` kwargs (`repo_id` required): push policy and tokenizer when a step's mean score beats all before."""
    steps: int = 20000
    """Number of training samples planned (tracking only, as in TRL)."""
    learning_rate: float = 1.41e-5
    """Adam learning rate of the default optimizer."""
    adap_kl_ctrl: bool = True
    """Adapt the KL coefficient toward `target` (True) or keep it fixed at `init_kl_coef` (False)."""
    init_kl_coef: float = 0.2
    """Initial KL penalty coefficient."""
    kl_penalty: str = "kl"
    """Per-token KL estimate: "kl" (logp - ref), "abs", "mse" (0.5·kl²), "full" (exact over the vocabulary), "k3" (low-variance, non-negative)."""
    target: float = 6.0
    """Target KL (summed over a response) of the adaptive controller."""
    horizon: float = 10000.0
    """Horizon of the adaptive KL controller, in samples."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """Lambda of GAE."""
    cliprange: float = 0.2
    """PPO policy ratio clip range."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction around the rollout value."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    batch_size: int = 128
    """Samples per `step` call."""
    forward_batch_size: Optional[int] = None
    """Deprecated in TRL: if set, overrides `mini_batch_size`."""
    mini_batch_size: int = 128
    """Samples per optimisation mini-batch (also the forward-pass batch of the rollout)."""
    gradient_accumulation_steps: int = 1
    """Mini-batches accumulated per optimizer step."""
    world_size: Optional[int] = None
    """Filled in by the trainer: number of processes."""
    ppo_epochs: int = 4
    """Optimisation epochs over each batch."""
    max_grad_norm: Optional[float] = None
    """Clip the gradient norm to this value (None: no clipping)."""
    optimize_cuda_cache: Optional[bool] = None
    """Deprecated alias of `optimize_device_cache`."""
    optimize_device_cache: bool = False
    """Empty the accelerator's cache after each rollout chunk and mini-batch (less memory, slower)."""
    early_stopping: bool = False
    """Stop the epochs of a step once the policy KL exceeds 1.5 × `target_kl`."""
    target_kl: float = 1.0
    """Policy KL threshold of early stopping."""
    compare_steps: int = 1
    """Check for a best mean score (`push_to_hub_if_best_kwargs`) every this many steps."""
    ratio_threshold: float = 10.0
    """Zero a mini-batch's loss when its mean ratio exceeds this (TRL's loss-spike guard)."""
    dual_clip: Optional[float] = None
    """Dual-clip PPO: bound negative-advantage tokens' policy loss at −A·dual_clip (> 1, e.g. 3.0); None = TRL."""
    use_score_scaling: bool = False
    """Divide scores by their running standard deviation."""
    use_score_norm: bool = False
    """With `use_score_scaling`: also subtract the running mean."""
    score_clip: Optional[float] = None
    """Clip scores to [-score_clip, score_clip] (after scaling)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over response tokens before GAE (pad positions stay zero, unlike TRL)."""
    gradient_checkpointing: bool = False
    """Enable gradient checkpointing of the wrapped model."""
    is_encoder_decoder: Optional[bool] = None
    """Filled in by the trainer; fastppo supports decoder-only models."""
    is_peft_model: Optional[bool] = None
    """Filled in by the trainer: whether the model is a PEFT model."""
    backward_batch_size: Optional[int] = None
    """Derived: mini_batch_size × gradient_accumulation_steps."""
    global_backward_batch_size: Optional[int] = None
    """Derived: backward_batch_size × world_size."""
    global_batch_size: Optional[int] = None
    """Derived: batch_size × world_size."""
    dataset_num_proc: Optional[int] = None
    """Accepted for TRL compatibility; not used."""
    backend: str = "auto"
    """Kernel backend of `fastppo.ops`: "auto" (Triton where it runs), "triton" or "torch"; env FASTPPO_BACKEND overrides "auto"."""
    response_only_logits: bool = False
    """Apply the LM head only at response positions (not prompt or padding); same training math, less memory."""
    fused_lm_head: bool = False
    """Log-probs straight from hidden states and the LM head weight (`ops.linear_logprobs`), never holding [N, V] logits; implies response_only_logits."""
    rollout_batch_size: Optional[int] = None
    """Rows per forward pass of the no-grad rollout (policy and reference); None: mini_batch_size, as TRL."""
    padding_free: bool = False
    """Pack each forward pass's sequences into one row (position ids restart per sequence): no pad token reaches the model; same math."""
    max_tokens_per_microbatch: Optional[int] = None
    """Forward passes grouped by token count (rows in order, at most this many tokens each; a longer row alone): the rollout's instead of rollout_batch_size rows, and each mini-batch's, gradients accumulated token-weighted."""
    rollout_engine: str = "hf"
    """Engine that samples `generate`'s responses: "hf" (the model's own generate, as TRL) or "vllm" (colocated vLLM, synced with the policy)."""
    vllm_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for `vllm.LLM` with rollout_engine="vllm" (e.g. gpu_memory_utilization, max_model_len, enable_sleep_mode)."""
    rollout_correction: Optional[str] = None
    """With `step(..., rollout_logprobs=...)`: None (TRL's loss) or "tis" (scale each token's policy loss by a truncated importance weight)."""
    rollout_is_cap: float = 2.0
    """Cap of rollout_correction="tis"'s weight min(exp(old_logprob - rollout_logprob), rollout_is_cap)."""

    def __post_init__(self) -> None:
        if self.optimize_cuda_cache is not None:
            self.optimize_device_cache = bool(self.optimize_cuda_cache)
        if self.forward_batch_size is not None:
            self.mini_batch_size = self.forward_batch_size
        self._validate()
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        self.total_ppo_epochs = int(math.ceil(self.steps / self.batch_size))

    def _validate(self) -> None:
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "compare_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}")
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % backward != 0:
            raise ValueError(
                "PPOConfig.batch_size must be a multiple of mini_batch_size * gradient_accumulation_steps, "
                f"got batch_size={self.batch_size}, mini_batch_size={self.mini_batch_size}, "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}"
            )
        if self.push_to_hub_if_best_kwargs and "repo_id" not in self.push_to_hub_if_best_kwargs:
            raise ValueError("PPOConfig.push_to_hub_if_best_kwargs must name the repository: add 'repo_id'")
        if self.kl_penalty not in KL_PENALTIES:
            raise ValueError(f"PPOConfig.kl_penalty must be one of {KL_PENALTIES}, got {self.kl_penalty!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"PPOConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        _require(self, "learning_rate", lambda v: v >= 0, "a non-negative number")
        _require(self, "init_kl_coef", lambda v: v >= 0, "a non-negative number")
        _require(self, "target", lambda v: v > 0, "a positive number")
        _require(self, "horizon", lambda v: v > 0, "a positive number")
        _require(self, "gamma", lambda v: 0 <= v <= 1, "in [0, 1]")
        _require(self, "lam", lambda v: 0 <= v <= 1, "in [0, 1]")
        _require(self, "cliprange", lambda v: v >= 0, "a non-negative number")
        _require(self, "cliprange_value", lambda v: v >= 0, "a non-negative number")
        _require(self, "vf_coef", lambda v: v >= 0, "a non-negative number")
        _require(self, "target_kl", lambda v: v > 0, "a positive number")
        _require(self, "ratio_threshold", lambda v: v > 0, "a positive number")
        if self.max_grad_norm is not None:
            _require(self, "max_grad_norm", lambda v: v > 0, "a positive number or None")
        if self.dual_clip is not None:
            _require(self, "dual_clip", lambda v: v > 1, "a number > 1 or None")
        if self.score_clip is not None:
            _require(self, "score_clip", lambda v: v > 0, "a positive number or None")
        if self.rollout_batch_size is not None and (
            isinstance(self.rollout_batch_size, bool) or not isinstance(self.rollout_batch_size, int)
            or self.rollout_batch_size < 1
        ):
            raise ValueError(f"PPOConfig.rollout_batch_size must be a positive integer or None, got {self.rollout_batch_size!r}")
        if self.max_tokens_per_microbatch is not None and (
            isinstance(self.max_tokens_per_microbatch, bool) or not isinstance(self.max_tokens_per_microbatch, int)
            or self.max_tokens_per_microbatch < 1
        ):
            raise ValueError("PPOConfig.max_tokens_per_microbatch must be a positive integer or None, "
                             f"got {self.max_tokens_per_microbatch!r}")
        if not isinstance(self.padding_free, bool):
            raise ValueError(f"PPOConfig.padding_free must be True or False, got {self.padding_free!r}")
        if self.fused_lm_head and self.kl_penalty == "full":
            raise ValueError("PPOConfig.fused_lm_head=True cannot compute kl_penalty='full' (it needs full logits); "
                             "use response_only_logits=True instead")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(f"PPOConfig.rollout_engine must be one of {ROLLOUT_ENGINES}, got {self.rollout_engine!r}")
        if not isinstance(self.vllm_kwargs, dict):
            raise ValueError(f"PPOConfig.vllm_kwargs must be a dict, got {type(self.vllm_kwargs).__name__}")
        reserved = [name for name in VLLM_RESERVED if name in self.vllm_kwargs]
        if reserved:
            raise ValueError(f"PPOConfig.vllm_kwargs must not set {reserved[0]!r}: fastppo builds the engine from the "
                             "policy it trains and feeds it the policy's weights")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"PPOConfig.rollout_correction must be one of {ROLLOUT_CORRECTIONS}, "
                             f"got {self.rollout_correction!r}")
        _require(self, "rollout_is_cap", lambda v: v > 0, "a positive number")
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("PPOConfig.use_score_norm=True needs use_score_scaling=True")

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every field (nested dicts joined with '/'), for trackers."""
        flat: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    flat[f"{key}/{sub_key}"] = sub_value
            else:
                flat[key] = value
        return flat


def _require(config: PPOConfig, name: str, check, expected: str) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and check(value)
    if not ok:
        raise ValueError(f"PPOConfig.{name} must be {expected}, got {value!r}")
