"""Model FLOPs of one `PPOTrainer.step`: the compute floor the step benchmark's MFU and
bench/tools/profile_step.py divide by.

Counted, not measured: 2 FLOPs (multiply + add) per matmul weight per token, plus the attention
scores and their weighted sum. What the step runs beyond that (norms, softmaxes, the loss, Adam,
recomputation under gradient checkpointing) is not model FLOPs, so MFU stays comparable across
implementations that do more or less of it.
"""

from __future__ import annotations

from typing import Sequence, Union


def matmul_weights(config) -> int:
    """Weights of every matmul a token goes through in the value-head model (HF config names):
    per layer q and o (hidden²), k and v (hidden · kv_heads · head_dim), the gated MLP
    (3 · hidden · intermediate); then the LM head (vocab · hidden, counted even when tied to the
    embedding: it is a matmul, the embedding lookup is not) and the value head (hidden).
    Norm weights (2 · hidden a layer) are no matmul and left out."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    q_out = config.num_attention_heads * head_dim
    attention = hidden * q_out * 2 + hidden * kv * 2
    mlp = 3 * hidden * config.intermediate_size
    return layers * (attention + mlp) + config.vocab_size * hidden + hidden


def forward_flops(config, lengths: Sequence[int]) -> float:
    """One forward over rows of `lengths` tokens: 2 · weights · tokens + causal attention
    4 · layers · (heads · head_dim) · Σ L² / 2 (QKᵀ and AV, 2 FLOPs a multiply-add each, half
    the score matrix under the causal mask)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim  # = hidden for Llama/Qwen2
    tokens = sum(lengths)
    return 2.0 * matmul_weights(config) * tokens + 4.0 * config.num_hidden_layers * width * sum(
        n * n for n in lengths) / 2


def step_flops(model_config, batch_size: int, seq_len: Union[int, Sequence[int]], ppo_epochs: int) -> float:
    """Model FLOPs of one step on `batch_size` rows of `seq_len` tokens (query + response; or one
    length per row): the rollout's two no-grad forwards (policy and reference) plus, per PPO
    epoch, a training forward and its backward (≈ 2 × forward: gradients of activations and of
    weights) over every row: forward × (2 + 3 · ppo_epochs)."""
    lengths = [seq_len] * batch_size if isinstance(seq_len, int) else list(seq_len)
    if len(lengths) != batch_size:
        raise ValueError(f"{len(lengths)} row lengths for a batch of {batch_size}")
    return forward_flops(model_config, lengths) * (2 + 3 * ppo_epochs)
