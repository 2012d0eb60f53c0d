"""PPOConfig: TRL-classic (v0.11) field names and defaults, plus fastppo's own switches.

Every field keeps TRL's name and default so a TRL script's `PPOConfig(...)` call works
unchanged. Invalid values raise `ValueError` at construction, naming the field (`ImportError` for a
`log_with` tracker that is not installed). Each field's type is checked from its annotation.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

KL_PENALTIES = ("kl", "abs", "mse", "full", "k3")
KL_LOSS_TYPES = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")  # each response against the others of its group
SCALE_REWARDS = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
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
    cliprange_low: Optional[float] = None
    """The ratio's lower clip bound is 1 − cliprange_low; None: cliprange (TRL)."""
    cliprange_high: Optional[float] = None
    """The ratio's upper clip bound is 1 + cliprange_high (DAPO's clip-higher: above cliprange_low); None: cliprange."""
    kl_loss_coef: float = 0.0
    """Weight of a KL(policy ‖ reference) term in the loss, as GRPO's; 0: none. With init_kl_coef also 0, no reference runs."""
    kl_loss_type: str = "k3"
    """The loss's per-token KL: "k1" (logp − ref), "k2" (½(logp − ref)²) or "k3" (e^(ref − logp) − (ref − logp) − 1)."""
    advantage_estimator: str = "gae"
    """Advantages from "gae" (the critic, TRL's) or critic-free: "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"."""
    group_size: int = 1
    """Responses per query: consecutive rows of `step`'s batch, each query repeated (generate's num_return_sequences)."""
    scale_rewards: str = "group"
    """GRPO's divisor of the centred rewards: the std of the "group", of the "batch", or "none" (Dr. GRPO)."""
    loss_aggregation: str = "token-mean"
    """How token losses add up: "token-mean" (TRL's, over the mini-batch), "seq-mean-token-mean", "seq-mean-token-sum" or "seq-mean-token-sum-norm" (Dr. GRPO)."""
    loss_aggregation_length: Optional[int] = None
    """The constant length of "seq-mean-token-sum-norm"; None: the longest response of the step's batch."""
    importance_sampling_level: str = "token"
    """The policy ratio per "token" (PPO's) or per "sequence" (GSPO: exp of the response's mean token log-ratio)."""
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
    """Filled in by the trainer: whether the policy is an encoder-decoder (seq2seq) model."""
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
    nonfinite_guard: bool = True
    """Skip an optimizer step whose gradients, loss, log-probs or values hold NaN/inf (counted in fastppo/skipped_nonfinite); on the device with a fused optimizer (the default), else one host sync per optimizer step."""

    def __post_init__(self) -> None:
        for f in fields(self):  # every field against its annotation and range, before any is used
            _check_field(self, f.name)
        if self.optimize_cuda_cache is not None:
            self.optimize_device_cache = self.optimize_cuda_cache
        if self.forward_batch_size is not None:
            self.mini_batch_size = self.forward_batch_size
        self._validate()
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        self.total_ppo_epochs = int(math.ceil(self.steps / self.batch_size))

    def _validate(self) -> None:
        """Checks across fields (each field's own type and range: `_check_field`)."""
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % backward != 0:
            raise ValueError(
                "PPOConfig.batch_size must be a multiple of mini_batch_size * gradient_accumulation_steps, "
                f"got batch_size={self.batch_size}, mini_batch_size={self.mini_batch_size}, "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}"
            )
        if self.push_to_hub_if_best_kwargs:
            repo_id = self.push_to_hub_if_best_kwargs.get("repo_id")
            if not isinstance(repo_id, str) or not repo_id:
                raise ValueError("PPOConfig.push_to_hub_if_best_kwargs must name the repository: add 'repo_id' "
                                 f"(a non-empty string), got {repo_id!r}")
        _check_accelerate_arguments(self)
        if self.advantage_estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(f"PPOConfig.advantage_estimator={self.advantage_estimator!r} compares each response with "
                             f"the others of its group: set group_size >= 2, got {self.group_size}")
        if self.batch_size % self.group_size:
            raise ValueError(f"PPOConfig.batch_size={self.batch_size} is not a whole number of groups of "
                             f"group_size={self.group_size}")
        if self.fused_lm_head and self.kl_penalty == "full":
            raise ValueError("PPOConfig.fused_lm_head=True cannot compute kl_penalty='full' (it needs full logits); "
                             "use response_only_logits=True instead")
        reserved = [name for name in VLLM_RESERVED if name in self.vllm_kwargs]
        if reserved:
            raise ValueError(f"PPOConfig.vllm_kwargs must not set {reserved[0]!r}: fastppo builds the engine from the "
                             "policy it trains and feeds it the policy's weights")
        if self.vllm_kwargs and self.rollout_engine != "vllm":
            raise ValueError(f"PPOConfig.vllm_kwargs is set but rollout_engine={self.rollout_engine!r} builds no vLLM "
                             "engine: set rollout_engine='vllm', or drop vllm_kwargs")
        if self.loss_aggregation_length is not None and self.loss_aggregation != "seq-mean-token-sum-norm":
            raise ValueError("PPOConfig.loss_aggregation_length is the length of loss_aggregation="
                             f"'seq-mean-token-sum-norm', but loss_aggregation={self.loss_aggregation!r}")
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("PPOConfig.use_score_norm=True needs use_score_scaling=True")

    @property
    def uses_critic(self) -> bool:
        """Whether advantages come from the value head (GAE); the critic-free estimators neither run nor train it."""
        return self.advantage_estimator == "gae"

    @property
    def needs_reference(self) -> bool:
        """Whether a step compares the policy with a reference: a reward KL (`init_kl_coef` > 0; the adaptive
        controller never moves a 0) or a KL loss (`kl_loss_coef` > 0). Without either none is built or run."""
        return self.init_kl_coef > 0 or self.kl_loss_coef > 0

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


# Each field's type comes from its annotation (Optional[...] also accepts None; a `dict` field also
# accepts None, meaning {}, as TRL's Optional[dict]). Within the type: an int field must be >= 1 and a
# float field finite, unless _RANGES says otherwise; a field in _CHOICES must be one of them.
_TYPE_WORDS = {bool: "True or False", int: "a positive integer", float: "a finite number", str: "a string",
               dict: "a dict with string keys"}
_NON_NEGATIVE = (lambda v: v >= 0, "a non-negative number")
_POSITIVE = (lambda v: v > 0, "a positive number")
_FRACTION = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_RANGES = {
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),  # numpy's seed range
    "steps": (lambda v: v >= 0, "a non-negative integer"),
    "learning_rate": _NON_NEGATIVE, "init_kl_coef": _NON_NEGATIVE, "target": _POSITIVE, "horizon": _POSITIVE,
    "gamma": _FRACTION, "lam": _FRACTION, "cliprange": _NON_NEGATIVE, "cliprange_value": _NON_NEGATIVE,
    "cliprange_low": _NON_NEGATIVE, "cliprange_high": _NON_NEGATIVE, "kl_loss_coef": _NON_NEGATIVE,
    "vf_coef": _NON_NEGATIVE, "max_grad_norm": _POSITIVE, "target_kl": _POSITIVE, "ratio_threshold": _POSITIVE,
    "dual_clip": (lambda v: v > 1, "a number > 1"), "score_clip": _POSITIVE, "rollout_is_cap": _POSITIVE,
}
# Limits where +inf means "never" (no clipping, no ratio guard, no early stop), as TRL accepts them.
_MAY_BE_INFINITE = ("cliprange", "cliprange_low", "cliprange_high", "cliprange_value", "max_grad_norm", "target_kl",
                    "ratio_threshold", "score_clip", "rollout_is_cap")
_CHOICES = {"kl_penalty": KL_PENALTIES, "kl_loss_type": KL_LOSS_TYPES, "advantage_estimator": ADVANTAGE_ESTIMATORS,
            "scale_rewards": SCALE_REWARDS, "backend": BACKENDS, "loss_aggregation": LOSS_AGGREGATIONS,
            "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
            "rollout_engine": ROLLOUT_ENGINES, "rollout_correction": ROLLOUT_CORRECTIONS}
# accelerate.Accelerator arguments the trainer sets from other fields
_ACCELERATOR_RESERVED = {"log_with": "PPOConfig.log_with", "project_config": "PPOConfig.project_kwargs",
                         "gradient_accumulation_steps": "PPOConfig.gradient_accumulation_steps"}


def _field_types() -> dict:
    """{field name: (type, accepts None)} from PPOConfig's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(PPOConfig).items():
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = typing.get_origin(hint) is typing.Union
        kind = args[0] if optional else hint
        kind = typing.get_origin(kind) or kind  # dict[str, Any] -> dict
        out[name] = (kind, optional or kind is dict)
    return out


def _check_field(config: PPOConfig, name: str) -> None:
    """Raise ValueError naming `name` if its value is not of its annotated type and range."""
    kind, optional = _FIELD_TYPES[name]
    value = getattr(config, name)
    if value is None and optional:
        if kind is dict:
            setattr(config, name, {})
        return
    if name == "log_with":
        return _check_log_with(value)
    if name in _CHOICES:
        if not (value is None or isinstance(value, str)) or value not in _CHOICES[name]:
            raise ValueError(f"PPOConfig.{name} must be one of {_CHOICES[name]}, got {value!r}")
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = {bool: lambda: isinstance(value, bool), int: lambda: number and isinstance(value, numbers.Integral),
          float: lambda: number and (_finite(value) or (name in _MAY_BE_INFINITE and value == math.inf)),
          str: lambda: isinstance(value, str),
          dict: lambda: isinstance(value, dict) and all(isinstance(key, str) for key in value),
          }.get(kind, lambda: True)()  # a type not listed here: no check
    check, expected = _RANGES.get(name, ((lambda v: v >= 1) if kind is int else None, _TYPE_WORDS.get(kind, "")))
    if not ok or (check is not None and not check(value)):
        raise ValueError(f"PPOConfig.{name} must be {expected}{' or None' if optional else ''}, got {value!r}")


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_log_with(value) -> None:
    """None, a tracker name accelerate knows (installed), a GeneralTracker, or a list of those."""
    from accelerate.tracking import GeneralTracker, get_available_trackers
    from accelerate.utils import LoggerType

    names = [t.value for t in LoggerType]
    items = [item for item in (value if isinstance(value, (list, tuple)) else [value])
             if not isinstance(item, GeneralTracker)]
    for item in items:
        if not isinstance(item, str) or item not in names:
            raise ValueError(f"PPOConfig.log_with must be None, one of {names}, an accelerate GeneralTracker or a "
                             f"list of those, got {item!r}")
    for item in items:
        if item != "all" and LoggerType(item) not in get_available_trackers():
            raise ImportError(f"PPOConfig.log_with={item!r}: the {item} package is not installed "
                              f"(pip install {item}), so nothing would be logged")


def _check_accelerate_arguments(config: PPOConfig) -> None:
    """accelerator_kwargs / project_kwargs name arguments of accelerate.Accelerator / ProjectConfiguration that the
    trainer does not set itself; tracker_kwargs maps a tracker name to its init kwargs."""
    if config.accelerator_kwargs or config.project_kwargs:
        import dataclasses
        import inspect

        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        for key in config.accelerator_kwargs:
            if key in _ACCELERATOR_RESERVED:
                raise ValueError(f"PPOConfig.accelerator_kwargs must not set {key!r}: the trainer sets it from "
                                 f"{_ACCELERATOR_RESERVED[key]}")
            if key not in inspect.signature(Accelerator).parameters:
                raise ValueError(f"PPOConfig.accelerator_kwargs: {key!r} is not an argument of accelerate.Accelerator")
        known = {f.name for f in dataclasses.fields(ProjectConfiguration)}
        for key in config.project_kwargs:
            if key not in known:
                raise ValueError(f"PPOConfig.project_kwargs: {key!r} is not a field of accelerate's "
                                 f"ProjectConfiguration ({sorted(known)})")
    for key, value in config.tracker_kwargs.items():
        if not isinstance(value, dict):
            raise ValueError("PPOConfig.tracker_kwargs maps a tracker name to its init kwargs, e.g. "
                             f"{{'wandb': {{'entity': ...}}}}; got {key!r}: {value!r}")


_FIELD_TYPES = _field_types()
