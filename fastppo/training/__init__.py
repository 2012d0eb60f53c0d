"""The step's machinery: inputs and padding, the forward plan, the PPO epochs, the non-finite guard, statistics."""
