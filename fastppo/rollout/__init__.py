"""Rollout engines: what samples the responses `PPOTrainer.generate` returns (HF generate or vLLM)."""
