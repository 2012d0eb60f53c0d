"""The models: the value-head wrapper around a transformers causal LM, its checkpoints, and its LM-head paths."""
