"""Input refusals decided by every process together.

With several processes, a `step` or `generate` whose input is bad on one rank must be refused on every rank:
a rank that went on alone would pair its next collective with the others' current one and train on
mismatched data. So the checks of those calls run through `decided_together`: each process runs its own
checks up to the one read of their device-side verdicts, the verdicts of every process meet in one
all-reduce (the read itself: no extra host sync), and then either every process goes on, or every process
raises the same error naming the processes whose input was refused. Nothing has changed anywhere by then:
the checks come before any state of the step is touched. With one process this is the plain check.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import sharding

MAX_VERDICTS = 8  # verdict columns per process (a check reads fewer); column 0: refused before the read


def read_verdicts(flags: torch.Tensor) -> list:
    """One process's verdicts (a `[k]` bool tensor) read back: the single-process `agree`."""
    return [bool(flag) for flag in flags.tolist()]


def decided_together(accelerator, check: Callable):
    """`check(agree)`'s result on every process, or the same error raised on every process.

    `check` runs this process's checks: first everything decided on the host (raising at once on bad input),
    then `agree(flags)` exactly once with its `[k]` device verdicts (k < MAX_VERDICTS), whose returned list of
    bools it uses to raise its detailed message. Only those messages may come after `agree`: every other
    refusal must come before it, or the other processes would already have gone on. Any other exception a
    check raises on one process (a device error, a bug) is shared the same way, so no process waits for it.
    """
    world = sharding.world_size(accelerator)
    if world == 1:
        return check(read_verdicts)
    rank = torch.distributed.get_rank()
    table = {}

    def agree(flags: torch.Tensor) -> list:
        if table:
            raise RuntimeError("decided_together: a check called agree twice")
        table["rows"] = _all_verdicts(accelerator, rank, world, flags)
        return [bool(v) for v in table["rows"][rank][1:1 + flags.numel()]]

    error = None
    try:
        result = check(agree)
    except Exception as exc:  # (not KeyboardInterrupt and the like: those end the run anyway)
        error = exc
    if not table:  # refused before its read (or a check without one): the others wait in this all-reduce
        empty = torch.zeros(0, dtype=torch.bool, device=accelerator.device)
        table["rows"] = _all_verdicts(accelerator, rank, world, empty, refused_early=error is not None)
    refused = [r for r, row in enumerate(table["rows"]) if any(row)]
    if not refused:
        if error is not None:  # a refusal after agree on a clean table: the others went on (a fastppo bug)
            raise RuntimeError(f"process {rank} refused its input after every process had agreed to go on "
                               f"(the others may now wait): {error}") from error
        return result
    messages = [None] * world  # the error path only: every process knows from the table that it is taken
    local = None if error is None else (type(error).__name__, str(error))
    torch.distributed.all_gather_object(messages, local)
    raise _shared_error(refused, messages) from error


def _all_verdicts(accelerator, rank: int, world: int, flags: torch.Tensor, refused_early: bool = False) -> list:
    """Every process's verdict row, `[world][MAX_VERDICTS]` ints, from one all-reduce and one read."""
    if flags.numel() >= MAX_VERDICTS:
        raise RuntimeError(f"decided_together: {flags.numel()} verdicts, at most {MAX_VERDICTS - 1}")
    rows = torch.zeros(world, MAX_VERDICTS, dtype=torch.int32, device=accelerator.device)
    rows[rank, 0] = int(refused_early)
    rows[rank, 1:1 + flags.numel()] = flags.to(rows.device, torch.int32)
    torch.distributed.all_reduce(rows)
    return rows.tolist()


def _shared_error(refused: list, messages: list) -> Exception:
    """The one error every process raises: each refused process's own message, after its rank. A TypeError when
    every refused process raised one, a ValueError for input refusals, a RuntimeError when a check failed."""
    parts = [f"process {r}: {messages[r][1] if messages[r] else 'its input was refused'}" for r in refused]
    kinds = {messages[r][0] for r in refused if messages[r]}
    kind = TypeError if kinds == {"TypeError"} else ValueError if kinds <= {"TypeError", "ValueError"} else RuntimeError
    return kind(f"input refused on process(es) {refused} of {len(messages)}, so on every process (nothing "
                f"changed on any): " + "; ".join(parts))
