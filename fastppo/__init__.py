"""fastppo: PPO fine-tuning of language models with TRL's classic API and math, on fused kernels."""

from .config import PPOConfig
from .model import AutoModelForCausalLMWithValueHead, ValueHead, create_reference_model
from .trainer import PPOTrainer

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLMWithValueHead", "PPOConfig", "PPOTrainer", "ValueHead", "create_reference_model"]
