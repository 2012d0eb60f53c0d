"""Atomic, verified trainer checkpoints: what `PPOTrainer.save_state` / `load_state` build on.

A save goes to a sibling staging directory, `<dir>.fastppo-saving` (same parent: the renames stay on one
filesystem, so they are atomic). Every process writes its part there (accelerate, DeepSpeed and FSDP save
from several ranks); then the main process lists every file with its size and sha256 in
`fastppo_manifest.json`, written last and atomically, flushes files and directories to disk and swaps:
`<dir>` → `<dir>.fastppo-old`, staging → `<dir>`, then deletes the old one. A save killed at any point
leaves one of these states, and `load_state` reads:

  1. `<dir>` (previous) + staging without a manifest (cut while writing): `<dir>`.
  2. `<dir>` (previous) + complete staging (cut before the first rename): `<dir>`.
  3. no `<dir>`, `<dir>.fastppo-old` + complete staging (cut between the renames): the staging directory
     (complete and newer), else the old one, with a warning.
  4. `<dir>` (new) + `<dir>.fastppo-old`, maybe half deleted (cut before the deletion ended): `<dir>`.

`load_state` moves nothing (every process calls it); the next save to `<dir>` first finishes an interrupted
swap (state 3) and clears what is left over. Loading checks the manifest (every file listed, present, of its
size and hash, none unlisted) before anything is read. The checkpoint directory must be on a filesystem all
processes share, as accelerate's sharded saves already need.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import warnings
from typing import Optional

import torch

MANIFEST = "fastppo_manifest.json"
TRAINER_STATE = "fastppo_trainer_state.json"
FORMAT, VERSION = "fastppo-checkpoint", 1
STAGING_SUFFIX, RETIRED_SUFFIX = ".fastppo-saving", ".fastppo-old"
_NOT_OURS = (".nfs",)  # NFS's stand-ins for deleted files still open somewhere: nothing reads them
_HASH_THREADS = 8  # hashlib releases the GIL: files hash in parallel (DeepSpeed/FSDP write one per rank)


class CheckpointError(ValueError):
    """A checkpoint directory that fails verification; nothing has been loaded from it."""


# ------------------------------------------------------------------ save


def save(accelerator, output_dir, trainer_state: dict, step: int) -> None:
    """Write accelerate's state and `trainer_state` (as TRAINER_STATE) to `output_dir` atomically.

    Every process calls it; `step` is recorded in the manifest."""
    target = _target(output_dir)
    staging, main = target + STAGING_SUFFIX, is_main(accelerator)
    _agree(accelerator, error=_attempt(_begin, target) if main else None)  # staging exists before anyone writes
    try:
        _agree(accelerator, error=_attempt(_write, accelerator, staging, trainer_state if main else None))
        _agree(accelerator, error=_attempt(_finish, staging, target, step) if main else None)
    except Exception:
        if main:
            _remove(staging)
        raise


def _begin(target: str) -> None:
    recover(target)
    if os.path.lexists(target) and not _replaceable(target):
        raise ValueError(f"save_state: {target} exists and is not a fastppo checkpoint (it has neither {MANIFEST} "
                         f"nor {TRAINER_STATE}); save_state replaces the whole directory, so give it a new or "
                         "empty one")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    os.mkdir(target + STAGING_SUFFIX)
    _fsync_dir(parent)


def _write(accelerator, staging: str, trainer_state: Optional[dict]) -> None:
    project = accelerator.project_configuration
    automatic, project.automatic_checkpoint_naming = project.automatic_checkpoint_naming, False
    try:  # automatic naming would send accelerate's files under project_dir, outside the staging directory
        accelerator.save_state(staging)
    finally:
        project.automatic_checkpoint_naming = automatic
    if trainer_state is not None:
        with open(os.path.join(staging, TRAINER_STATE), "w") as handle:
            json.dump(trainer_state, handle, indent=2)


def _finish(staging: str, target: str, step: int) -> None:
    write_manifest(staging, step)
    parent, retired = os.path.dirname(target), target + RETIRED_SUFFIX
    if os.path.lexists(target):
        os.rename(target, retired)
        _fsync_dir(parent)
    os.rename(staging, target)
    _fsync_dir(parent)
    try:
        _remove(retired)
    except OSError as error:  # the new checkpoint is in place; the next save clears the rest
        warnings.warn(f"save_state: could not delete the previous checkpoint {retired}: {error}")


def write_manifest(directory: str, step: int) -> dict:
    """List every file of `directory` (size, sha256) in its manifest; files, then directories, flushed to disk."""
    files = _files(directory)
    digests = _map(lambda rel: _digest(os.path.join(directory, rel), sync=True), files)
    manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "hash": "sha256",
                "files": {rel: {"size": size, "sha256": digest} for rel, (size, digest) in zip(files, digests)}}
    temporary = os.path.join(directory, MANIFEST + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(directory, MANIFEST))  # a manifest is there whole or not at all
    for root, _, _ in os.walk(directory, topdown=False):
        _fsync_dir(root)
    return manifest


def seal(directory) -> dict:
    """Add a manifest to a checkpoint written before fastppo had them, vouching that it is complete."""
    directory = os.fspath(directory)
    with open(os.path.join(directory, TRAINER_STATE)) as handle:
        step = json.load(handle).get("current_step", 0)
    return write_manifest(directory, step)


def recover(target: str) -> None:
    """Before a save: finish a swap cut between its renames (state 3 of the module docstring), clear leftovers."""
    target = _target(target)
    staging, retired = target + STAGING_SUFFIX, target + RETIRED_SUFFIX
    if not os.path.lexists(target):
        try:
            found = interrupted_swap(target)
        except CheckpointError:
            found = None
        if found is None and os.path.isdir(retired):
            found = retired  # the previous checkpoint, even one without a manifest: as it was before the save
        if found is not None:
            os.rename(found, target)
            _fsync_dir(os.path.dirname(target))
    _remove(staging)
    _remove(retired)


def _replaceable(target: str) -> bool:
    if not os.path.isdir(target):
        return False
    entries = os.listdir(target)
    return not entries or MANIFEST in entries or TRAINER_STATE in entries


# ------------------------------------------------------------------ load


def verified_directory(accelerator, input_dir) -> str:
    """The directory to load `input_dir` from, verified whole by the main process; every process calls it.

    Raises CheckpointError (a ValueError) or FileNotFoundError on every process, before anything is read.
    """
    if not is_main(accelerator):
        return _agree(accelerator)
    found, error = None, None
    try:
        found = locate(input_dir)
    except Exception as caught:
        error = caught
    return _agree(accelerator, value=found, error=error)


def read_trainer_state(directory: str) -> dict:
    """The trainer's counters of a verified checkpoint, every entry parsed before anything is loaded (so a missing
    one cannot leave a half-loaded trainer): kl_coef, running, current_step, highest_reward, compare_step."""
    with open(os.path.join(directory, TRAINER_STATE)) as handle:
        state = json.load(handle)
    return {"kl_coef": float(state["kl_coef"]), "running": dict(state["running"]),
            "current_step": int(state["current_step"]),
            "highest_reward": float(state.get("highest_reward", float("-inf"))),
            "compare_step": int(state.get("compare_step", 0))}


def locate(target: str) -> str:
    """`target` if it verifies; where an interrupted swap left the checkpoint if `target` is missing."""
    target = _target(target)
    if os.path.lexists(target):
        verify(target)
        return target
    found = interrupted_swap(target)
    if found is None:
        raise FileNotFoundError(f"load_state: no checkpoint at {target}")
    warnings.warn(f"load_state: {target} is missing, a save_state to it was cut between its two renames; loading "
                  f"{found} ({'the new, complete' if found.endswith(STAGING_SUFFIX) else 'the previous'} checkpoint). "
                  "The next save_state to that directory puts things back in place.")
    return found


def interrupted_swap(target: str) -> Optional[str]:
    """With `target` missing: the complete new checkpoint, else the previous one, that verifies; None if neither
    exists; the first one's CheckpointError if both fail."""
    errors = []
    for candidate in (target + STAGING_SUFFIX, target + RETIRED_SUFFIX):
        if os.path.isfile(os.path.join(candidate, MANIFEST)):
            try:
                verify(candidate)
                return candidate
            except CheckpointError as error:
                errors.append(error)
    if errors:
        raise errors[0]
    return None


def verify(directory) -> dict:
    """`directory`'s manifest, after checking that its files are exactly those listed, with their sizes and hashes."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, TRAINER_STATE)):
            raise CheckpointError(
                f"checkpoint {directory} has no {MANIFEST}: it was written by a fastppo version before checkpoints "
                "were atomic (or by one whose save was cut short), so its completeness cannot be checked and it is "
                f"refused. If you know it is complete, fastppo.checkpointing.seal({directory!r}) adds the manifest.")
        raise CheckpointError(f"{directory} is not a fastppo checkpoint: it has no {MANIFEST}")
    try:
        with open(path) as handle:
            manifest = json.load(handle)
        listed = {rel: (int(entry["size"]), str(entry["sha256"])) for rel, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} is unreadable ({error!r})") from error
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} is of format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r}; this fastppo reads {FORMAT!r} version {VERSION}")
    names = sorted(listed)
    for rel in names:  # cheap checks on every file before any hashing
        full = os.path.join(directory, rel)
        if os.path.isabs(rel) or os.path.normpath(rel) != rel or rel.startswith(".."):
            raise _damaged(directory, rel, "not a plain relative path")
        if not os.path.isfile(full):
            raise _damaged(directory, rel, "missing")
        size = os.path.getsize(full)
        if size != listed[rel][0]:
            raise _damaged(directory, rel,
                           f"{size} bytes where the manifest says {listed[rel][0]} (truncated or rewritten)")
    # accelerate, DeepSpeed and torch.distributed.checkpoint pick files up by pattern: any unlisted one may be read
    extra = [rel for rel in _files(directory) if rel not in listed and not os.path.basename(rel).startswith(_NOT_OURS)]
    if extra:
        raise _damaged(directory, extra[0], "not in the manifest (not written by this save)")
    for rel, (_, digest) in zip(names, _map(lambda rel: _digest(os.path.join(directory, rel)), names)):
        if digest != listed[rel][1]:
            raise _damaged(directory, rel, "its sha256 differs from the manifest's (corrupted or rewritten)")
    return manifest


def _damaged(directory: str, rel: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {directory} is damaged, nothing was loaded: {rel}: {why}")


# ------------------------------------------------------------------ processes


def is_main(accelerator) -> bool:
    """torch.distributed's rank 0 where it is up (accelerate's index can be 0 on every rank of DeepSpeed on CPU)."""
    if _distributed():
        return torch.distributed.get_rank() == 0
    return accelerator.is_main_process


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _agree(accelerator, value=None, error: Optional[BaseException] = None):
    """A barrier that also shares each process's outcome: rank 0's value on every process, or the first error
    (any process's) raised on every process, so that no process waits on one that has given up."""
    if _distributed():
        if error is not None:
            try:
                pickle.dumps(error)
            except Exception:
                error = RuntimeError(repr(error))
        outcomes = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(outcomes, (value, error))
    else:
        outcomes = [(value, error)]
    if error is not None:
        raise error
    for _, other in outcomes:
        if other is not None:
            raise other
    return outcomes[0][0]


def _attempt(function, *args) -> Optional[Exception]:
    try:
        function(*args)
    except Exception as error:
        return error
    return None


# ------------------------------------------------------------------ files


def _target(path) -> str:
    return os.path.abspath(os.fspath(path))  # no trailing separator: the siblings' names append to it


def _files(directory: str) -> list:
    """Every file under `directory` as a sorted relative path, the manifest (and its temporary) aside."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel not in (MANIFEST, MANIFEST + ".tmp"):
                found.append(rel)
    return sorted(found)


def _digest(path: str, sync: bool = False) -> tuple:
    """(size, sha256) of the file's bytes as read (hashlib.file_digest is Python >= 3.11 only)."""
    digest, size, buffer = hashlib.sha256(), 0, bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
        if sync:  # written by this save: on disk before the manifest vouches for it
            os.fsync(handle.fileno())
    return size, digest.hexdigest()


def _map(function, items: list) -> list:
    if len(items) <= 1:
        return [function(item) for item in items]
    workers = min(len(items), _HASH_THREADS, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def _fsync_dir(path: str) -> None:
    """Make `path`'s entries (files created, renamed) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not sync directories (EINVAL)
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """Delete a checkpoint directory, its manifest first: a half-deleted one never looks complete."""
    if os.path.isdir(path) and not os.path.islink(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, MANIFEST))
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
