#!/usr/bin/env bash
# Set up a virtual environment (.venv, or $FASTPPO_VENV) from scratch if needed and run the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k trainer`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTPPO_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
# torch first, pinned: on the project's CPU machines this is a local CPU build; an unpinned torch
# pulled in by a dependency would download several GB of CUDA wheels instead.
python -m pip install -q --disable-pip-version-check torch==2.13.0
# DeepSpeed builds against the installed torch, so without build isolation (tests/distributed/test_sharded.py)
python -m pip install -q --disable-pip-version-check --no-build-isolation deepspeed==0.19.8
python -m pip install -q --disable-pip-version-check -e ".[test]"
python -m pytest "$@"
