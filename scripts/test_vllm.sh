#!/usr/bin/env bash
# The tests that need vLLM, in their own virtual environment (scripts/vllm_env.sh); each starts its
# engine in a child process of its own. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/vllm_env.sh
FASTPPO_REQUIRE_VLLM=1 python -m pytest tests/rollout/test_vllm_rollouts.py "$@"
