"""`PreTrainedModelWrapper`: TRL 0.11's base class of models that wrap a transformers model.

It loads the wrapped model (`from_pretrained`: a path, a hub id or a built model; a saved PEFT
adapter; a new LoRA from `peft_config`; a reward-model adapter; TRL's bitsandbytes flags), hands
the wrapper's own saved tensors to `post_init`, saves them where TRL 0.11 reads them, and scores
with the reward adapter (`compute_reward_score`). Subclasses add the modules (`v_head`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import os
import tempfile

import torch
from torch import nn

from . import checkpoint_files
from .reward_adapter import adapter_active, load_reward_adapter

logger = logging.getLogger(__name__)

_HUB_KWARGS = ("revision", "cache_dir", "token", "subfolder")  # also locate adapter files, not only the base


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def current_device():
    """This process's device as TRL 0.11 names it: the local rank (an int) on CUDA, `"xpu:<rank>"` /
    `"npu:<rank>"` on those accelerators, else `"cpu"`."""
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        return rank
    for kind in ("xpu", "npu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            return f"{kind}:{rank}"
    return "cpu"


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


# A tokenizer's outputs (BatchEncoding keys) besides input_ids and attention_mask. TRL hands them all to the causal
# LM, whose `**loss_kwargs` (transformers 4.46) or `**kwargs` (5.x) swallow the ones it does not use; a bare
# backbone may take no `**kwargs` (LlamaModel on 4.46 raises), so they are dropped unless its forward names them.
TOKENIZER_EXTRA_KEYS = frozenset({"token_type_ids", "special_tokens_mask", "offset_mapping", "length",
                                  "overflow_to_sample_mapping", "num_truncated_tokens", "overflowing_tokens"})


@functools.lru_cache(maxsize=None)
def _named_forward_arguments(module_type: type) -> frozenset:
    try:
        return frozenset(inspect.signature(module_type.forward).parameters)
    except (TypeError, ValueError):  # no signature to read: it names none
        return frozenset()


def drop_unused_tokenizer_outputs(module: nn.Module, kwargs: dict) -> dict:
    """`kwargs` less the tokenizer outputs (TOKENIZER_EXTRA_KEYS: `token_type_ids`, ...) that `module`'s forward
    does not name, so a tokenizer's whole output can be passed on any transformers version. GPT-2 names
    `token_type_ids` and uses them, as under TRL; other keywords pass unchanged."""
    unused = TOKENIZER_EXTRA_KEYS.intersection(kwargs) - _named_forward_arguments(type(module))
    return {k: v for k, v in kwargs.items() if k not in unused} if unused else kwargs


class _SupportedArchitectures:
    """TRL's `supported_pretrained_model_architectures`, read from the class: peft is imported on first use."""

    def __get__(self, instance, owner) -> tuple:
        from transformers import PreTrainedModel

        if importlib.util.find_spec("peft") is None:
            return (PreTrainedModel,)
        from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM

        return PreTrainedModel, PeftModelForCausalLM, PeftModelForSeq2SeqLM


class PreTrainedModelWrapper(nn.Module):
    """Wraps a transformers model (`pretrained_model`), as TRL 0.11's class of that name.

    Attributes as TRL's: `config`, `is_peft_model`, `is_loaded_in_8bit`, `is_loaded_in_4bit`,
    `is_sequential_parallel` (dispatched with a `device_map`), `current_device`,
    `supports_rm_adapter`, `rm_adapter_name`, `policy_adapter_name`, and `score` (the reward
    adapter's head) when a reward adapter is loaded.
    """

    transformers_parent_class = None
    supported_args = ()
    supported_modules = ("v_head",)  # the wrapper's own modules, saved beside the wrapped model's weights
    supported_rm_modules = ("score",)  # a reward adapter's head, among the adapter's tensors
    # the model types TRL accepts as a built model; fastppo accepts any transformers-style causal LM module
    supported_pretrained_model_architectures = _SupportedArchitectures()

    def __init__(self, pretrained_model=None, score_module=None, supports_rm_adapter=False, rm_adapter_name=None,
                 **kwargs):
        super().__init__()
        if not isinstance(pretrained_model, nn.Module) or getattr(pretrained_model, "config", None) is None:
            raise TypeError(f"pretrained_model must be a transformers model, got {type(pretrained_model).__name__}")
        self.pretrained_model = pretrained_model
        self.is_peft_model = is_peft_model(pretrained_model)
        if self.is_peft_model and pretrained_model.active_peft_config.is_prompt_learning:
            raise ValueError("peft_config: prompt-learning methods (prefix/prompt tuning) are not supported for PPO "
                             "training, as in TRL; use an adapter method such as LoRA")
        self.is_loaded_in_8bit = bool(getattr(pretrained_model, "is_loaded_in_8bit", False))
        self.is_loaded_in_4bit = bool(getattr(pretrained_model, "is_loaded_in_4bit", False))
        self.is_sequential_parallel = _dispatched_with_device_map(pretrained_model)
        self.current_device = current_device()
        self.supports_rm_adapter = supports_rm_adapter
        self.rm_adapter_name = rm_adapter_name
        self.policy_adapter_name = pretrained_model.active_adapter if self.is_peft_model else "default"
        if score_module is not None:
            self.score = score_module

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load the wrapped model and the wrapper's saved modules, as TRL 0.11's `from_pretrained`.

        `pretrained_model_name_or_path`: a directory or hub id (of a model, or of a PEFT adapter:
        then its base model and the adapter, frozen unless `is_trainable=True`), or a built model.
        `peft_config` adds a new adapter (ignored, with a warning, for a saved adapter);
        `reward_adapter` (+ `reward_adapter_name`) loads a reward model's adapter for
        `compute_reward_score`; `load_in_8bit` / `load_in_4bit` become a `BitsAndBytesConfig`
        (and `device_map={"": current_device}` unless given), with PEFT's
        `prepare_model_for_kbit_training` (`use_gradient_checkpointing`, ...) before a new adapter.
        `supported_args` go to the wrapper; the rest to `transformers_parent_class.from_pretrained`.
        Raises ValueError naming the argument for a bad `peft_config`, `reward_adapter`, or source.
        """
        peft_config = kwargs.pop("peft_config", None)
        reward_adapter = kwargs.pop("reward_adapter", None)
        reward_adapter_name = kwargs.pop("reward_adapter_name", "reward_adapter")
        is_trainable = kwargs.pop("is_trainable", False)
        wrapper_kwargs, pretrained_kwargs, kbit_kwargs = cls._split_kwargs(kwargs)
        cls._check_wrapper_kwargs(wrapper_kwargs, pretrained_kwargs)
        _check_peft_arguments(peft_config, reward_adapter)
        hub_kwargs = {k: pretrained_kwargs[k] for k in _HUB_KWARGS if k in pretrained_kwargs}

        if isinstance(pretrained_model_name_or_path, nn.Module):
            source, base = None, pretrained_model_name_or_path
            quantized = bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))
        elif isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            source = os.fspath(pretrained_model_name_or_path)
            if os.path.isfile(source):  # transformers would read it as a malformed hub id
                raise ValueError(f"pretrained_model_name_or_path must be a checkpoint directory or a hub id, got the "
                                 f"file {source!r}: pass the directory that holds it")
            quantized = _route_quantization(pretrained_kwargs)
            base, peft_config = cls._load_base(source, model_args, pretrained_kwargs, hub_kwargs, peft_config,
                                               is_trainable)
        else:
            raise ValueError("pretrained_model_name_or_path must be a path, a hub id or a transformers model, "
                             f"got {type(pretrained_model_name_or_path).__name__}")

        if peft_config is not None:
            if is_peft_model(base):  # TRL adds no second adapter to a PEFT model passed in
                logger.warning("peft_config ignored: the model passed in is already a PeftModel")
            else:
                from peft import get_peft_model, prepare_model_for_kbit_training

                if quantized:
                    base = prepare_model_for_kbit_training(base, **kbit_kwargs)
                base = get_peft_model(base, peft_config)

        adapter_kwargs = {"supports_rm_adapter": False}
        if reward_adapter is not None:
            if not is_peft_model(base):
                raise ValueError("reward_adapter needs a PEFT policy (the reward adapter is loaded beside the "
                                 "policy's): pass peft_config=LoraConfig(...) or a saved PEFT adapter")
            # not through add_and_load_reward_modeling_adapter: its (TRL's) signature carries `token` only
            score = load_reward_adapter(base, os.fspath(reward_adapter), reward_adapter_name, hub_kwargs,
                                        cls.supported_rm_modules)
            adapter_kwargs = {"score_module": score, "supports_rm_adapter": True,
                              "rm_adapter_name": reward_adapter_name}

        model = cls(base, **adapter_kwargs, **wrapper_kwargs)
        markers = tuple(f"{module}." for module in cls.supported_modules)
        if source is None:  # a built model may carry the modules (TRL's push_to_hub leaves v_head attached)
            state = {k: v for k, v in base.state_dict().items() if any(m in k for m in markers)}
        else:
            state = checkpoint_files.load_module_state(source, hub_kwargs, cls.supported_modules)
        if state:
            try:
                model.post_init(state_dict=state)
            except RuntimeError as error:  # torch's size mismatch names neither the checkpoint nor the file
                where = "the model passed in" if source is None else source
                raise ValueError(f"the {'/'.join(cls.supported_modules)} weights saved with {where} do not fit this "
                                 f"model: {error}") from error
        return model

    @classmethod
    def _load_base(cls, source, model_args, pretrained_kwargs, hub_kwargs, peft_config, is_trainable):
        """`(model, peft_config)`: the model at `source`, or for a saved PEFT adapter its base with the adapter."""
        if checkpoint_files.resolve_file(source, "adapter_config.json", hub_kwargs) is None:
            with _naming_unreadable_file(source, hub_kwargs):
                base = cls.transformers_parent_class.from_pretrained(source, *model_args, **pretrained_kwargs)
            return base, peft_config
        from peft import PeftConfig, PeftModel

        if peft_config is not None:
            logger.warning("peft_config ignored: %s holds a trained PEFT adapter, which is loaded instead", source)
        with _naming_unreadable_file(source, hub_kwargs):
            base_path = PeftConfig.from_pretrained(source, **hub_kwargs).base_model_name_or_path
        try:
            with _naming_unreadable_file(base_path, hub_kwargs):
                base = cls.transformers_parent_class.from_pretrained(base_path, *model_args, **pretrained_kwargs)
        except checkpoint_files.UnreadableFileError:
            raise
        except OSError as error:  # e.g. a checkpoint moved from the machine whose absolute path it names
            raise OSError(f"{source}: adapter_config.json names the base model {base_path!r}, which could not be "
                          f"loaded ({error}); load that model yourself and pass it in, or fix the path") from error
        with _naming_unreadable_file(source, hub_kwargs):
            return PeftModel.from_pretrained(base, source, is_trainable=is_trainable, **hub_kwargs), None

    @classmethod
    def _check_wrapper_kwargs(cls, wrapper_kwargs: dict, pretrained_kwargs: dict) -> None:
        """Refuse, before anything is loaded, a keyword that looks like the wrapper's (`<module>_...`) but is not in
        `supported_args` (transformers would take it silently as a config attribute); subclasses check values."""
        for name in pretrained_kwargs:
            if any(name.startswith(f"{module}_") for module in cls.supported_modules):
                raise TypeError(f"unexpected value-head argument {name!r}; supported: {cls.supported_args}")

    @classmethod
    def _split_kwargs(cls, kwargs):
        """`(wrapper kwargs, transformers kwargs, prepare_model_for_kbit_training kwargs)`, as TRL splits them."""
        kbit_names = ()
        if importlib.util.find_spec("peft") is not None:
            from peft import prepare_model_for_kbit_training

            kbit_names = tuple(inspect.signature(prepare_model_for_kbit_training).parameters)[1:]  # after `model`
        wrapper = {k: v for k, v in kwargs.items() if k in cls.supported_args}
        kbit = {k: v for k, v in kwargs.items() if k in kbit_names}
        pretrained = {k: v for k, v in kwargs.items() if k not in wrapper and k not in kbit}
        return wrapper, pretrained, kbit

    @classmethod
    def _get_current_device(cls):
        """This process's device, as TRL's method of that name: `current_device()`."""
        return current_device()

    @classmethod
    def add_and_load_reward_modeling_adapter(cls, pretrained_model, adapter_model_id,
                                             adapter_name: str = "reward_model_adapter", token=None) -> nn.Linear:
        """Load the reward model's adapter at `adapter_model_id` (a directory or hub id) into the PEFT model
        `pretrained_model` as the frozen adapter `adapter_name`; return its score head, a frozen
        `nn.Linear(hidden, num_labels)` (TRL 0.11's classmethod; `from_pretrained(reward_adapter=...)` does the
        same, with its hub options).

        The policy adapter stays active and the train/eval mode as it was. Raises TypeError when
        `pretrained_model` is not a PeftModel, ValueError naming `adapter_model_id` when it holds no
        reward-model adapter and naming `adapter_name` when the model already has an adapter of that name.
        """
        if not is_peft_model(pretrained_model):
            raise TypeError("pretrained_model must be a peft.PeftModel (the reward adapter is loaded beside the "
                            f"policy's), got {type(pretrained_model).__name__}")
        if not isinstance(adapter_model_id, (str, os.PathLike)):
            raise ValueError("adapter_model_id must be a local path or hub id of a reward-model adapter, "
                             f"got {type(adapter_model_id).__name__}")
        load_kwargs = {} if token is None else {"token": token}
        return load_reward_adapter(pretrained_model, os.fspath(adapter_model_id), adapter_name, load_kwargs,
                                   cls.supported_rm_modules, argument_names=("adapter_model_id", "adapter_name"))

    def post_init(self, state_dict):
        """Load the wrapper's own modules from `state_dict` (a subclass's job, as in TRL)."""
        raise NotImplementedError(f"{type(self).__name__} must implement post_init(state_dict)")

    # ------------------------------------------------------------------ delegation

    @property
    def config(self):
        return self.pretrained_model.config

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.pretrained_model.prepare_inputs_for_generation(*args, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.pretrained_model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.pretrained_model.gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        self.pretrained_model.enable_input_require_grads()

    # ------------------------------------------------------------------ reward adapter

    def compute_reward_score(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Reward-model scores `[B, T, num_labels]` at every position (the model's dtype), without gradients.

        Runs the model with the reward adapter active and applies its score head to the last
        hidden state, then makes the policy adapter active again (TRL 0.11's method; here the
        train/eval mode and every `requires_grad` flag are restored too). Raises ValueError when
        the model was loaded without `reward_adapter`.
        """
        if not self.supports_rm_adapter:
            raise ValueError("compute_reward_score needs a reward adapter: load the model with "
                             "from_pretrained(..., peft_config=..., reward_adapter=<adapter dir or hub id>)")
        with adapter_active(self.pretrained_model, self.rm_adapter_name, self.policy_adapter_name), torch.no_grad():
            hidden = self._last_hidden_state(input_ids, attention_mask, **kwargs)
            return self.score(hidden.to(self.score.weight.device))

    def _last_hidden_state(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        model = self.pretrained_model.get_base_model() if self.is_peft_model else self.pretrained_model
        kwargs = drop_unused_tokenizer_outputs(model, kwargs)
        output = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                       return_dict=True, **kwargs)
        return output.hidden_states[-1]

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as TRL 0.11 does: transformers' `save_pretrained` with `state_dict()` (the wrapper's modules'
        keys beside the base weights); for a PEFT model the policy adapter by PEFT and the wrapper's
        modules in `pytorch_model.bin` beside it (only their keys, from `state_dict` if given)."""
        state_dict = kwargs.pop("state_dict", None)
        if state_dict is None:
            state_dict = self.state_dict()
        if not self.is_peft_model:
            return self.pretrained_model.save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        if kwargs.get("is_main_process", True) and self.supported_modules:  # (a CausalLMPolicy has none)
            markers = tuple(f"{module}." for module in self.supported_modules)
            checkpoint_files.save_module_state({k: v for k, v in state_dict.items() if any(m in k for m in markers)},
                                               save_directory)
            legacy = os.path.join(save_directory, checkpoint_files.LEGACY_V_HEAD_FILE)
            if os.path.exists(legacy):  # an older fastppo save in the same place would otherwise be stale
                os.remove(legacy)
        # the reward adapter is not part of the policy (TRL also writes it, without its head, to a subfolder)
        adapters = kwargs.setdefault("selected_adapters", [self.policy_adapter_name])
        result = self.pretrained_model.save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for name in adapters:  # PEFT saves an adapter not named "default" in a subfolder of that name
                folder = save_directory if name == "default" else os.path.join(save_directory, name)
                checkpoint_files.drop_default_config_fields(folder, self.pretrained_model.peft_config[name])
        return result

    def push_to_hub(self, repo_id, *args, **kwargs):
        """Push what `save_pretrained` writes to the hub repo `repo_id`.

        Without PEFT: transformers' `push_to_hub`, with the wrapper's modules among the weights.
        With PEFT: the adapter and `pytorch_model.bin` in one commit (TRL pushes the adapter only,
        so its pushed PEFT policies lose the value head).
        """
        if not self.is_peft_model:
            with self._modules_attached():
                return self.pretrained_model.push_to_hub(repo_id, *args, **kwargs)
        from huggingface_hub import HfApi

        api = HfApi(token=kwargs.pop("token", None))
        repo_id = api.create_repo(repo_id, private=kwargs.pop("private", None), exist_ok=True).repo_id
        upload = {name: kwargs.pop(name) for name in ("commit_message", "commit_description", "revision", "create_pr")
                  if name in kwargs}
        for name in ("tags", "max_shard_size", "use_temp_dir"):  # transformers' push options with no meaning here
            kwargs.pop(name, None)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, *args, **kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, **upload)

    @contextlib.contextmanager
    def _modules_attached(self):
        # transformers serialises `pretrained_model.state_dict()`; registering the wrapper's modules as
        # its submodules for the duration puts their keys (`v_head.summary.*`) among the saved ones.
        names = [name for name in self.supported_modules if isinstance(getattr(self, name, None), nn.Module)]
        for name in names:
            self.pretrained_model.add_module(name, getattr(self, name))
        try:
            yield
        finally:
            for name in names:
                del self.pretrained_model._modules[name]


@contextlib.contextmanager
def _naming_unreadable_file(source, hub_kwargs: dict):
    """Re-raise a failed load as UnreadableFileError naming the checkpoint file that cannot be read (safetensors and
    torch errors name none), when `source` is a local directory holding one; other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        if isinstance(error, checkpoint_files.UnreadableFileError) or not isinstance(source, (str, os.PathLike)):
            raise
        unreadable = checkpoint_files.find_unreadable_file(os.fspath(source), hub_kwargs)
        if unreadable is None or unreadable.path in str(error):  # nothing to add
            raise
        raise unreadable from error


def _check_peft_arguments(peft_config, reward_adapter) -> None:
    if peft_config is not None:
        try:
            from peft import PeftConfig
        except ImportError as error:
            raise ImportError("peft_config needs the peft package: pip install peft") from error
        if not isinstance(peft_config, PeftConfig):
            raise ValueError("peft_config must be a peft.PeftConfig (e.g. LoraConfig), "
                             f"got {type(peft_config).__name__}")
    if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
        raise ValueError("reward_adapter must be a local path or hub id of a reward-model adapter, "
                         f"got {type(reward_adapter).__name__}")


def _route_quantization(pretrained_kwargs: dict) -> bool:
    """TRL's `load_in_8bit` / `load_in_4bit` flags → `quantization_config=BitsAndBytesConfig(...)` (transformers 5
    takes no such flags). Returns whether the model will be quantised that way."""
    chosen = [name for name in ("load_in_8bit", "load_in_4bit") if pretrained_kwargs.pop(name, False)]
    if not chosen:
        return False
    if len(chosen) == 2:
        raise ValueError("load_in_8bit and load_in_4bit are both True: pass one of them")
    flag = chosen[0]
    if pretrained_kwargs.get("quantization_config") is not None:
        raise ValueError(f"{flag}=True and quantization_config are both given: pass one of them "
                         f"({flag}=True means quantization_config=BitsAndBytesConfig({flag}=True))")
    if not _bitsandbytes_installed():
        raise ImportError(f"{flag}=True quantises the model with bitsandbytes, which is not installed "
                          "(pip install bitsandbytes; it needs a CUDA GPU)")
    from transformers import BitsAndBytesConfig

    pretrained_kwargs["quantization_config"] = BitsAndBytesConfig(**{flag: True})
    if "device_map" not in pretrained_kwargs:  # as TRL: the whole model on this process's device
        logger.warning("%s=True without device_map: placing the whole model on device %s", flag, current_device())
        pretrained_kwargs["device_map"] = {"": current_device()}
    return True


def _dispatched_with_device_map(model) -> bool:
    """Whether `model` was dispatched by a `device_map` (TRL's `is_sequential_parallel`): transformers records
    an `hf_device_map` (since transformers 5 only for a map over several devices). Raises ValueError for
    CPU or disk offloading, which a value head beside the LM head cannot follow."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return False
    devices = {str(device) for device in device_map.values()}
    if "disk" in devices or ("cpu" in devices and len(devices) > 1):
        raise ValueError(f"device_map offloads part of the model to CPU or disk ({sorted(devices)}); "
                         "offloading is not supported for value-head models, as in TRL")
    return True
