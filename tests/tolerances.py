"""The one table of test tolerances, by the dtype of the inputs.

fp32 bounds sit a little above float32 rounding over the sizes the tests use; bf16/fp16
bounds are for results computed from inputs rounded to those formats (the kernels
accumulate in float32, so only input rounding remains).
"""

import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}

# Whole-trainer comparisons (stats and weights after optimizer steps, against TRL or between
# backends): Adam amplifies float32 rounding in the tiniest gradients, so a looser bound.
TRAINER = dict(atol=2e-5, rtol=2e-4)


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]

# Weights after several Adam steps at lr=1e-3: Adam divides each gradient by its own running
# magnitude, so parameters whose true gradient is zero (e.g. attention key biases, which
# softmax ignores) take steps of float noise up to ~lr in size. 1e-4 is a tenth of one step:
# any real gradient error moves whole tensors by ~lr and still fails.
WEIGHTS = dict(atol=1e-4, rtol=2e-4)
