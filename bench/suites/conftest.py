"""Benchmark-suite plumbing: the run's mode and device, shape × dtype × provider parametrisation,
skip records and the environment (device, driver, versions, measured ceilings) in the JSON.

Run it with `bash bench/run.sh` or `python -m pytest bench/suites --benchmark-json results.json`;
`--bench-smoke` (or FASTPPO_BENCH_SMOKE=1) for the tiny CI mode. See harness.py for the modes.
pytest puts this folder on sys.path (no __init__.py), so the suites import harness and machine as
top-level modules; the scripts in bench/tools/ add it themselves to import the same ones.
"""

from __future__ import annotations

import os

# Without a GPU the fastppo provider runs under the Triton interpreter, which triton reads when
# it is first imported (`import fastppo` imports it through transformers → torch._dynamo).
_interpret_set_here = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if torch.cuda.is_available() and _interpret_set_here:
    del os.environ["TRITON_INTERPRET"]

import harness  # noqa: E402
import machine  # noqa: E402

SKIPPED: list = []  # one dict per skipped case, for the report


def pytest_addoption(parser):
    parser.addoption("--bench-smoke", action="store_true", default=False,
                     help=f"tiny shapes and one round per benchmark (CI); same as {harness.SMOKE_ENV}=1")


def pytest_configure(config):
    mode = harness.run_mode(config)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # One thread by default: the CPU machines are small and shared; the number is in the report.
        torch.set_num_threads(int(os.environ.get(harness.THREADS_ENV, "1")))
    config._fastppo_bench_env = harness.BenchEnv(mode=mode, device=device)


@pytest.fixture(scope="session")
def bench_env(pytestconfig) -> harness.BenchEnv:
    return pytestconfig._fastppo_bench_env


def pytest_generate_tests(metafunc):
    """provider × shape × dtype from the module's PROVIDERS, SHAPES[mode], DTYPES[mode]."""
    module = metafunc.module
    if not hasattr(module, "SHAPES"):
        return
    mode = harness.run_mode(metafunc.config)
    names = metafunc.fixturenames
    if "provider" in names:
        metafunc.parametrize("provider", module.PROVIDERS)
    if "shape" in names:
        shapes = module.SHAPES[mode]
        metafunc.parametrize("shape", shapes, ids=[harness.shape_id(module.DIMS, s) for s in shapes])
    if "dtype" in names:
        dtypes = module.DTYPES[mode]
        metafunc.parametrize("dtype", dtypes, ids=[harness.dtype_name(d) for d in dtypes])


@pytest.fixture(autouse=True)
def _provider_runs(request, bench_env):
    """Skip a provider that cannot run in this mode, saying why."""
    callspec = getattr(request.node, "callspec", None)
    provider = callspec.params.get("provider") if callspec is not None else None
    reason = harness.provider_skip_reason(provider, bench_env) if provider else None
    if reason is not None:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or report.when not in ("setup", "call") or not hasattr(item, "callspec"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    params = {}
    for name, value in item.callspec.params.items():
        if isinstance(value, torch.dtype):
            value = harness.dtype_name(value)
        elif isinstance(value, tuple):
            value = list(value)
        params[name] = value
    entry = {"group": item.originalname.removeprefix("bench_"), "params": params,
             "reason": reason.removeprefix("Skipped: ")}
    dims = getattr(item.module, "DIMS", None)
    if dims and "shape" in params:
        entry["shape_id"] = harness.shape_id(dims, params["shape"])
        entry["seq_len"] = params["shape"][dims.index("T")]
    SKIPPED.append(entry)


def pytest_benchmark_update_machine_info(config, machine_info):
    info = machine.environment_info(config._fastppo_bench_env)
    info["skipped"] = SKIPPED
    info["providers"] = harness.PROVIDER_DOC
    machine_info["fastppo"] = info
