"""fastppo: PPO fine-tuning of language models with TRL's classic API and math, on fused kernels."""

from . import core
from .config import PPOConfig
from .core import set_seed
from .model import (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PreTrainedModelWrapper,
                    ValueHead, create_reference_model)
from .models.utils import SUPPORTED_ARCHITECTURES, setup_chat_format, unwrap_model_for_generation
from .trainer import PPOTrainer

__version__ = "0.1.0"

__all__ = ["SUPPORTED_ARCHITECTURES", "AutoModelForCausalLMWithValueHead", "AutoModelForSeq2SeqLMWithValueHead",
           "PPOConfig", "PPOTrainer", "PreTrainedModelWrapper", "ValueHead", "core", "create_reference_model",
           "set_seed", "setup_chat_format", "unwrap_model_for_generation"]
