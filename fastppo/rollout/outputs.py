"""The rollout seam's record, `Sample`, and how samples become what TRL's `generate` returns.

Every engine's `generate` returns, per query, the `Sample`s it drew (several with
`num_return_sequences`); `single_output` / `list_output` shape them into TRL's return types, and
`draw_lengths` draws max_new_tokens as TRL draws them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Sample(NamedTuple):
    tokens: torch.Tensor  # [n] int64: new tokens as the engine returned them (HF rows may end in padding)
    logprobs: Optional[torch.Tensor]  # [n] float32: each token's log-prob, or None when not asked for


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
