"""Finding and reading the extra weights a value-head checkpoint carries, in TRL 0.11's file layout.

A value-head checkpoint is a transformers (or PEFT adapter) checkpoint plus extra modules' tensors
(`v_head.summary.*`): beside the base weights in `model.safetensors` / `pytorch_model.bin`
(sharded or not), or — for a PEFT policy, as TRL writes it — alone in `pytorch_model.bin` next
to the adapter's files. Older fastppo PEFT checkpoints kept them in `v_head.safetensors`.
A reward adapter's score head is in the adapter's own state (`adapter_model.*`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Iterable, Optional

import torch

V_HEAD_PREFIX = "v_head."
PEFT_HEAD_FILE = "pytorch_model.bin"  # TRL 0.11 reads a PEFT policy's value head from here
LEGACY_V_HEAD_FILE = "v_head.safetensors"  # what fastppo wrote before, still read
_MODULE_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin", LEGACY_V_HEAD_FILE)
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class UnreadableFileError(OSError):
    """A checkpoint file that exists but cannot be read (corrupt, truncated, not that format); names the file."""

    def __init__(self, path: str, error: BaseException):
        super().__init__(f"{path}: cannot be read, the file is corrupt or truncated "
                         f"(re-save or re-download it): {type(error).__name__}: {error}")
        self.path = path


def resolve_file(source: str, filename: str, load_kwargs: dict) -> Optional[str]:
    """The local path of `filename` in `source` (a directory or a hub repo id), or None if it has none."""
    subfolder = load_kwargs.get("subfolder") or ""
    if os.path.isdir(source):
        path = os.path.join(source, subfolder, filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(
            source, filename, subfolder=subfolder or None, revision=load_kwargs.get("revision"),
            cache_dir=load_kwargs.get("cache_dir"), token=load_kwargs.get("token"),
        )
    except Exception:  # absent file, offline, or no such repo
        return None


def load_module_state(source: str, load_kwargs: dict, modules: Iterable[str] = ("v_head",)) -> dict:
    """The tensors of `modules` (keys containing `<module>.`, unchanged) stored with a checkpoint, or {}.

    Reads only those keys (and only the shards holding them), from the first file that has any.
    """
    markers = tuple(f"{module}." for module in modules)
    for filename in _MODULE_FILES:
        path = resolve_file(source, filename, load_kwargs)
        if path is None:
            continue
        if filename.endswith(".index.json"):
            weight_map = _read_index(path)
            state = {}
            for shard in sorted({shard for key, shard in weight_map.items() if _matches(key, markers)}):
                shard_path = resolve_file(source, shard, load_kwargs)
                if shard_path is not None:
                    state.update(read_tensors(shard_path, markers))
        else:
            state = read_tensors(path, markers)
        if state:
            return state
    return {}


def load_adapter_state(source: str, load_kwargs: dict) -> Optional[dict]:
    """A PEFT adapter's saved tensors (`adapter_model.safetensors`, else `.bin`), or None if it has neither."""
    for filename in _ADAPTER_FILES:
        path = resolve_file(source, filename, load_kwargs)
        if path is not None:
            return read_tensors(path, markers=None)
    return None


def read_tensors(path: str, markers: Optional[tuple]) -> dict:
    """Tensors of a safetensors or torch file whose key contains one of `markers` (all if None), on CPU.
    Raises UnreadableFileError naming `path` when the file cannot be read."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys() if _matches(k, markers)}
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a dict of tensors")
        return {k: v for k, v in state.items() if _matches(k, markers)}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors, torch (zip, pickle) and OS errors do not name the file
        raise UnreadableFileError(path, error) from error


def _read_index(path: str) -> dict:
    """The `weight_map` of a sharded checkpoint's index file."""
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UnreadableFileError(path, ValueError(f"no 'weight_map' dict, got {weight_map!r}"))
    return weight_map


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise UnreadableFileError(path, error) from error
    if not isinstance(content, dict):
        raise UnreadableFileError(path, ValueError(f"holds a JSON {type(content).__name__}, not an object"))
    return content


def find_unreadable_file(source: str, load_kwargs: dict) -> Optional[UnreadableFileError]:
    """After a failed load: the error of the first weights or adapter file in the local directory `source` that
    cannot be read (index files and the shards they list included), or None. Reads headers, and .bin files memory-
    mapped as transformers does (a legacy non-zip .bin in full)."""
    if not os.path.isdir(source):  # a hub id: its files are downloaded and checked by huggingface_hub
        return None
    folder = os.path.join(source, load_kwargs.get("subfolder") or "")
    names = [name for name in _MODULE_FILES + _ADAPTER_FILES if not name.endswith(".json")]
    try:
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            _read_json(os.path.join(folder, "adapter_config.json"))
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.isfile(os.path.join(folder, index)):
                names += sorted(set(_read_index(os.path.join(folder, index)).values()))
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                _check_readable(path)
    except UnreadableFileError as error:
        return error
    return None


def _check_readable(path: str) -> None:
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:  # checks the header against the file's size
                handle.keys()
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise UnreadableFileError(path, error) from error


def save_module_state(state: dict, save_directory: str) -> None:
    """Write the extra modules' tensors of a PEFT policy where TRL 0.11 reads them (`pytorch_model.bin`)."""
    os.makedirs(save_directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    torch.save(tensors, os.path.join(save_directory, PEFT_HEAD_FILE))


def drop_default_config_fields(adapter_directory: str, config) -> None:
    """Rewrite the adapter_config.json PEFT saved in `adapter_directory` without the fields at their default
    value, nor the `peft_version` stamp (`config`: the adapter's PeftConfig, for the defaults).

    PEFT fills both back in on load; PEFT <= 0.13 (TRL 0.11's) rejects fields it does not know,
    and every later PEFT adds fields, so only the settings actually used are written.
    """
    path = os.path.join(adapter_directory, "adapter_config.json")
    with open(path) as handle:
        saved = json.load(handle)
    defaults = {field.name: _default(field) for field in dataclasses.fields(config)}
    kept = {key: value for key, value in saved.items()
            if key != "peft_version" and (key not in defaults or defaults[key] != value)}
    with open(path, "w") as handle:
        json.dump(kept, handle, indent=2, sort_keys=True)


def _default(field):
    """A dataclass field's default as json would read it back (or a marker no saved value equals)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return _NO_DEFAULT
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return _NO_DEFAULT


_NO_DEFAULT = object()


def _matches(key: str, markers: Optional[tuple]) -> bool:
    return markers is None or any(marker in key for marker in markers)
