"""Rollout engines: what samples the responses `PPOTrainer.generate` returns.

One small seam: an engine's `generate(model, queries, max_new_tokens, batch_size,
generation_kwargs, return_logprobs)` returns, per query, the `Sample`s it drew (several with
`num_return_sequences`), `check_kwargs` refuses what it cannot honour before anything is
drawn, and `weights_changed()` tells it the policy moved. `single_output` / `list_output`
shape samples into TRL's return types. Two engines:

- `HFEngine` (`rollout_engine="hf"`, the default): the model's own `generate`, `batch_size`
  queries at a time, left-padded — TRL's behaviour and numbers.
- `fastppo.vllm_engine.VLLMEngine` (`rollout_engine="vllm"`): a colocated vLLM engine fed
  the policy's weights in memory.

Log-probs (`return_logprobs=True`) are those of the unmodified model distribution (raw
logits at temperature 1, before top-k/top-p), on both engines: the quantity `step`'s own
log-probs measure, so the two can be compared token for token.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

# Kwargs that change the type or shape of HF's output; fastppo returns tensors as TRL does.
HF_OUTPUT_KWARGS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                    "output_hidden_states")


class Sample(NamedTuple):
    tokens: torch.Tensor  # [n] int64: new tokens as the engine returned them (HF rows may end in padding)
    logprobs: Optional[torch.Tensor]  # [n] float32: each token's log-prob, or None when not asked for


class HFEngine:
    """Hugging Face `generate` on the (unwrapped) value-head model, as TRL's trainer calls it."""

    def __init__(self, accelerator, tokenizer):
        self.accelerator = accelerator
        self.tokenizer = tokenizer  # its pad token fills the left padding (read at each call)

    def weights_changed(self) -> None:
        """Nothing to do: HF generates from the live policy."""

    def check_kwargs(self, model, generation_kwargs: dict) -> None:
        """Raise before anything is sampled (or any RNG drawn from) if the kwargs cannot be honoured."""
        for name in HF_OUTPUT_KWARGS:
            if generation_kwargs.get(name):
                raise ValueError(f"generation kwarg {name} changes what generate returns; fastppo returns token "
                                 "tensors as TRL does (use return_logprobs=True for per-token log-probs)")

    def generate(self, model, queries: list, max_new_tokens: Optional[list], batch_size: int,
                 generation_kwargs: dict, return_logprobs: bool = False, disable_adapter: bool = False) -> list:
        """Per query, a list of `Sample`s. queries: 1-D int64 tensors on the trainer's device;
        max_new_tokens: one per query (equal within a `batch_size` chunk) or None."""
        self.check_kwargs(model, generation_kwargs)
        kwargs = dict(generation_kwargs)
        seed = kwargs.pop("seed", None)
        if return_logprobs:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        device = self.accelerator.device
        samples = []
        with self._for_generation(model, disable_adapter) as unwrapped, _seeded(seed, device):
            for start in range(0, len(queries), batch_size):
                batch = queries[start:start + batch_size]
                if max_new_tokens is not None:
                    kwargs["max_new_tokens"] = max_new_tokens[start]
                width = max(len(q) for q in batch)
                pad_token_id = self.tokenizer.pad_token_id  # None only for one query alone (the trainer checks)
                input_ids = torch.full((len(batch), width), 0 if pad_token_id is None else pad_token_id,
                                       dtype=torch.long, device=device)
                attention_mask = torch.zeros_like(input_ids)
                for row, query in enumerate(batch):  # left padding: the prompt ends where generation starts
                    input_ids[row, width - len(query):] = query
                    attention_mask[row, width - len(query):] = 1
                out = unwrapped.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                sequences = out.sequences if return_logprobs else out
                new_tokens = sequences[:, width:]
                logprobs = _sampled_logprobs(out.logits, new_tokens) if return_logprobs else None
                per_query = new_tokens.shape[0] // len(batch)  # num_return_sequences rows per query, in order
                for row in range(len(batch)):
                    rows = range(row * per_query, (row + 1) * per_query)
                    samples.append([Sample(new_tokens[r], logprobs[r] if logprobs is not None else None)
                                    for r in rows])
        return samples

    @contextlib.contextmanager
    def _for_generation(self, model, disable_adapter: bool):
        """The unwrapped model, in eval mode (no dropout while sampling), adapters off if asked."""
        unwrapped = self.accelerator.unwrap_model(model)
        modes = [(module, module.training) for module in unwrapped.modules()]  # restored module by module
        unwrapped.eval()
        adapter_ctx = unwrapped.pretrained_model.disable_adapter() if disable_adapter else contextlib.nullcontext()
        try:
            with adapter_ctx, torch.no_grad():
                yield unwrapped
        finally:
            for module, training in modes:
                module.training = training


def draw_lengths(length_sampler, n_queries: int, batch_size: int) -> Optional[list]:
    """max_new_tokens per query from `length_sampler`: one draw per `batch_size` chunk, as TRL draws them."""
    if length_sampler is None:
        return None
    lengths = []
    for start in range(0, n_queries, batch_size):
        lengths += [int(length_sampler())] * min(batch_size, n_queries - start)
    return lengths


def single_output(query: torch.Tensor, samples: list, pad_token_id: int, return_prompt: bool, return_logprobs: bool):
    """`[n, L]`, HF's output for one query (no EOS cut), right-padded where an engine's rows differ in
    length; with `return_logprobs`, also `[n, new]` log-probs (0 past a row's end)."""
    width = max(len(s.tokens) for s in samples)
    pad = torch.nn.functional.pad
    tokens = torch.stack([pad(s.tokens, (0, width - len(s.tokens)), value=pad_token_id) for s in samples])
    if return_prompt:
        tokens = torch.cat([query.expand(len(samples), -1), tokens], dim=1)
    if not return_logprobs:
        return tokens
    return tokens, torch.stack([pad(s.logprobs, (0, width - len(s.logprobs))) for s in samples])


def list_output(queries: list, samples: list, eos_token_id: Optional[int], return_prompt: bool,
                remove_padding: bool, return_logprobs: bool):
    """One 1-D response per sample (query-major), cut after its first EOS with `remove_padding`;
    with `return_logprobs`, `(responses, logprobs)`."""
    responses, logprobs = [], []
    for query, query_samples in zip(queries, samples):
        for new_tokens, sample_logprobs in query_samples:
            if remove_padding and eos_token_id is not None:
                eos_positions = (new_tokens == eos_token_id).nonzero()
                if len(eos_positions):
                    end = int(eos_positions[0, 0]) + 1
                    new_tokens = new_tokens[:end]
                    sample_logprobs = sample_logprobs[:end] if sample_logprobs is not None else None
            responses.append(torch.cat([query, new_tokens]) if return_prompt else new_tokens)
            logprobs.append(sample_logprobs)
    return (responses, logprobs) if return_logprobs else responses


def _sampled_logprobs(step_logits: tuple, new_tokens: torch.Tensor) -> torch.Tensor:
    """`[rows, steps]` float32 log-probs of the generated tokens from HF's raw per-step logits
    (one `[rows, V]` log-softmax at a time, not a `[rows, steps, V]` tensor)."""
    columns = [torch.log_softmax(logits.float(), dim=-1).gather(1, new_tokens[:, s:s + 1])
               for s, logits in enumerate(step_logits)]
    return torch.cat(columns, dim=1) if columns else new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)


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
