"""Token-budget micro-batches (PPOConfig.max_tokens_per_microbatch): how rows are grouped into
forward passes, and how a split mini-batch's loss statistics add back up.

Rows stay in order and are grouped greedily: consecutive rows while their tokens fit the budget,
a row longer than the budget alone. Deterministic, and each group is a slice, so outputs
concatenate back in row order.
"""

from __future__ import annotations

import torch


def token_budget_slices(costs: list, budget: int) -> list:
    """Consecutive row slices whose `costs` (tokens each row sends through the model) sum to at most
    `budget`; a row costing more than `budget` gets a slice of its own."""
    slices, start, tokens = [], 0, 0
    for row, cost in enumerate(costs):
        if row > start and tokens + cost > budget:
            slices.append(slice(start, row))
            start, tokens = row, 0
        tokens += cost
    slices.append(slice(start, len(costs)))
    return slices


def split_to_count(slices: list, count: int) -> list:
    """`slices` with the widest ones halved until there are `count` (every process then makes as many
    passes as the one that needs most; smaller slices keep within the budget). Stops at one row each."""
    slices = list(slices)
    while len(slices) < count:
        widest = max(range(len(slices)), key=lambda i: slices[i].stop - slices[i].start)
        piece = slices[widest]
        if piece.stop - piece.start < 2:
            break
        middle = (piece.start + piece.stop) // 2
        slices[widest: widest + 1] = [slice(piece.start, middle), slice(middle, piece.stop)]
    return slices


LOSS_FIELDS = ("loss", "pg_loss", "vf_loss", "kl_loss")


def combine_loss_outputs(outs: list, weights: list, weighted: bool = False):
    """Micro-batches' PPOLossOutputs → the mini-batch's: every 0-d field is a masked mean over
    response tokens, so the mini-batch's is the mean weighted by each micro-batch's share of them
    (`weighted`: the losses were made with per-token loss weights of the whole mini-batch, so they add up
    as they are); the per-position `ratio` rows are concatenated in order. Detached: for statistics."""
    combined = {}
    for field, first in outs[0]._asdict().items():
        if first is None:
            combined[field] = None
        elif field == "ratio":
            combined[field] = torch.cat([out.ratio for out in outs])
        elif weighted and field in LOSS_FIELDS:
            combined[field] = sum(getattr(out, field).detach() for out in outs)
        else:
            combined[field] = sum(weight * getattr(out, field).detach() for out, weight in zip(outs, weights))
    return type(outs[0])(**combined)
