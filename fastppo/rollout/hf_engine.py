"""`rollout_engine="hf"` (the default): the model's own `generate`, `batch_size` queries at a time,
left-padded — TRL's behaviour and numbers."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import ops, sharding
from ..training import padding
from .outputs import Sample

# Kwargs that change the type or shape of HF's output; fastppo returns tensors as TRL does.
HF_OUTPUT_KWARGS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                    "output_hidden_states")


class HFEngine:
    """Hugging Face `generate` on the (unwrapped) value-head model, as TRL's trainer calls it."""

    gathers_own_weights = False  # under ZeRO-3/FSDP2 the trainer gathers the whole model around `generate`

    def __init__(self, accelerator, tokenizer, backend: str = "auto"):
        self.accelerator = accelerator
        self.tokenizer = tokenizer  # its pad token fills the left padding (read at each call)
        self.backend = backend  # of the log-probs of sampled tokens (fastppo.ops)

    def weights_changed(self) -> None:
        """Nothing to do: HF generates from the live policy."""

    def check_kwargs(self, model, generation_kwargs: dict) -> None:
        """Raise before anything is sampled (or any RNG drawn from) if the kwargs cannot be honoured."""
        for name in HF_OUTPUT_KWARGS:
            if generation_kwargs.get(name):
                raise ValueError(f"generation kwarg {name} changes what generate returns; fastppo returns token "
                                 "tensors as TRL does (use return_logprobs=True for per-token log-probs)")

    def generate(self, model, queries: list, max_new_tokens: Optional[list], batch_size: int,
                 generation_kwargs: dict, return_logprobs: bool = False) -> list:
        """Per query, a list of `Sample`s. queries: 1-D int64 tensors on the trainer's device;
        max_new_tokens: one per query (equal within a `batch_size` chunk) or None. `model` samples as it
        is: the caller holds a PEFT policy's adapter disabled to sample its reference."""
        self.check_kwargs(model, generation_kwargs)
        kwargs = dict(generation_kwargs)
        seed = kwargs.pop("seed", None)
        if return_logprobs:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        device = self.accelerator.device
        samples = []
        pad_token_id = self.tokenizer.pad_token_id  # None only for one query alone (the trainer checks)
        with self._for_generation(model) as unwrapped, _seeded(seed, device):
            # left padding: the prompt ends where generation starts (an encoder's input: the tokenizer's side, and
            # everything generate returns is new, from the decoder's start token on, as TRL returns it)
            encoder_decoder = getattr(unwrapped, "is_encoder_decoder", False)
            side = padding.padding_side(self.tokenizer) if encoder_decoder else "left"
            for start in range(0, len(queries), batch_size):
                batch = queries[start:start + batch_size]
                if max_new_tokens is not None:
                    kwargs["max_new_tokens"] = max_new_tokens[start]
                width = max(len(q) for q in batch)
                input_ids, attention_mask = padding.pad_rows(batch, width, 0 if pad_token_id is None else pad_token_id,
                                                             side, device)
                out = unwrapped.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                sequences = out.sequences if return_logprobs else out
                new_tokens = sequences if encoder_decoder else sequences[:, width:]
                logprobs = self._sampled_logprobs(out.logits, new_tokens) if return_logprobs else None
                per_query = new_tokens.shape[0] // len(batch)  # num_return_sequences rows per query, in order
                for row in range(len(batch)):
                    rows = range(row * per_query, (row + 1) * per_query)
                    samples.append([Sample(new_tokens[r], logprobs[r] if logprobs is not None else None)
                                    for r in rows])
        return samples

    @contextlib.contextmanager
    def _for_generation(self, model):
        """The unwrapped model, in eval mode (no dropout while sampling)."""
        unwrapped = sharding.unwrap(self.accelerator, model)
        modes = [(module, module.training) for module in unwrapped.modules()]  # restored module by module
        unwrapped.eval()
        try:
            with torch.no_grad():
                yield unwrapped
        finally:
            for module, training in modes:
                module.training = training

    def _sampled_logprobs(self, step_logits: tuple, new_tokens: torch.Tensor) -> torch.Tensor:
        """`[rows, steps]` float32 log-probs of the generated tokens from HF's raw per-step logits
        (one `[rows, V]` step at a time, not a `[rows, steps, V]` tensor)."""
        columns = [ops.logprobs_from_logits(logits, new_tokens[:, step], backend=self.backend)
                   for step, logits in enumerate(step_logits)]
        return torch.stack(columns, dim=1) if columns else new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device):
    """`seed` for this generation only: the global RNG streams continue as if it never ran."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"generation kwarg seed must be a non-negative integer, got {seed!r}")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
