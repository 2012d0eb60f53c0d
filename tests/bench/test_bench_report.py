"""bench/report.py on a GPU run: the CUDA header, DESIGN.md §6 bars, step rows, OOM rows, merged --part JSON.

Only CPU runs have ever produced bench JSON, and CI has no GPU, so the report's GPU path would
first execute on the one GPU session that matters. This builds the JSON a CUDA run writes
(extra_info as bench/suites/harness.py::run_case and bench/suites/bench_step.py fill it,
machine_info as bench/suites/machine.py + bench/suites/conftest.py do), split in two parts as
`bench/run.sh --part` leaves it, with numbers chosen so every value in the report can be worked
out by hand. Also the layout of the committed reports: the GPU page in bench/ naming its figure
and JSON in bench/results/gpu/, and each kind's hand-kept measurements.md appended.
"""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

MODULE_OF_OP = {
    "logprobs_fwd": "bench_logprobs", "logprobs_fwd_bwd": "bench_logprobs", "full_kl": "bench_full_kl",
    "kl_reward": "bench_kl_reward", "gae": "bench_gae", "ppo_loss_fwd_bwd": "bench_ppo_loss",
    "linear_logprobs": "bench_linear_logprobs",
}
COPY_GBPS, MATMUL_TFLOPS = 2500.0, 625.0


def test_bars_name_shapes_and_groups_the_gpu_suite_runs(bench):
    report, harness, bench_step = bench("report"), bench("harness"), bench("bench_step")
    for op, shape, dtype, *_ in report.BARS:
        module = bench(MODULE_OF_OP[op])
        assert shape in [harness.shape_id(module.DIMS, s) for s in module.SHAPES["gpu"]], (op, shape)
        assert dtype in [harness.dtype_name(d) for d in module.DTYPES["gpu"]], (op, dtype)
    assert 2048 in bench_step.SETTINGS["gpu"]["lengths"]  # the step bar's response length
    # conftest names a skip's group after the function, run_case's rows after `group=`: they must agree
    for name in set(MODULE_OF_OP.values()) | {"bench_step"}:
        for fn_name, fn in inspect.getmembers(bench(name), inspect.isfunction):
            if fn_name.startswith("bench_"):
                group = fn_name.removeprefix("bench_")
                assert group in report.OP_ORDER and f'"{group}"' in inspect.getsource(fn), fn_name


# --------------------------------------------------------------------------- a synthetic CUDA run


def op_row(harness, op, provider, shape, dtype, ms, peak=2**20):
    """One op benchmark as run_case leaves it on CUDA (do_bench median; host rounds in `stats`)."""
    dims = {"linear_logprobs": "BTHV", "gae": "BT", "kl_reward": "BT", "ppo_loss_fwd_bwd": "BT"}.get(op, "BTV")
    size = {"bf16": 2, "fp32": 4}[dtype]
    tokens = shape[0] * shape[1]
    flops = 0.0
    if op == "logprobs_fwd":
        moved = tokens * shape[2] * size + tokens * 12
    elif op == "logprobs_fwd_bwd":
        moved = 3 * tokens * shape[2] * size + tokens * 16
    elif op == "full_kl":
        moved = 2 * tokens * shape[2] * size + tokens * 4
    elif op in ("gae", "kl_reward"):
        moved = tokens * 17 + (shape[0] * 4 if op == "kl_reward" else 0)
    elif op == "ppo_loss_fwd_bwd":
        moved = tokens * 37
    else:
        n_hidden, vocab = shape[2], shape[3]
        moved = 2 * (tokens * n_hidden + vocab * n_hidden) * size + tokens * 12
        flops = 8.0 * tokens * n_hidden * vocab
    info = dict(op=op, provider=provider, dims=dims, shape=list(shape), shape_id=harness.shape_id(dims, shape),
                dtype=dtype, seq_len=shape[1], device="cuda:0", mode="gpu", bytes=float(moved), flops=flops,
                input_copies=1, warmup_s=0.5, peak_bytes=peak, peak_kind="cuda_max_allocated",
                median_ms=ms, q1_ms=0.98 * ms, q3_ms=1.02 * ms, timer="cuda_do_bench",
                gbps=moved / (ms / 1e3) / 1e9, pct_floor=100.0 * (moved / (COPY_GBPS * 1e9)) / (ms / 1e3))
    if flops:
        info.update(tflops=flops / (ms / 1e3) / 1e12,
                    pct_matmul=100.0 * (flops / (MATMUL_TFLOPS * 1e12)) / (ms / 1e3))
    return pytest_benchmark_entry(op, f"{provider}-{info['shape_id']}-{dtype}", info)


def pytest_benchmark_entry(group, param, info):
    host_s = 1.1 * info.get("median_ms", 1.0) / 1e3  # pytest-benchmark's own rounds: not what the report shows
    stats = dict(min=host_s, max=host_s, mean=host_s, stddev=0.0, rounds=3, median=host_s, iqr=0.0, q1=host_s,
                 q3=host_s, iqr_outliers=0, stddev_outliers=0, outliers="0;0", ld15iqr=host_s, hd15iqr=host_s,
                 ops=1 / host_s, total=3 * host_s, iterations=1)
    return {"group": group, "name": f"bench_{group}[{param}]", "fullname": f"bench/x.py::bench_{group}[{param}]",
            "params": {}, "param": param, "extra_info": info, "options": {}, "stats": stats}


def step_row(provider, response_length, ms, peak):
    tokens = 4 * (32 + response_length)
    info = dict(op="step", provider=provider, dims="BT", shape=[4, 32 + response_length],
                shape_id=f"B4xQ32xR{response_length}", dtype="bf16", seq_len=response_length, device="cuda:0",
                mode="gpu", tokens_per_step=tokens, ppo_epochs=1,
                model=dict(hidden=896, layers=24, heads=14, vocab=151936), parameters=494_032_768, warmup_s=2.0,
                peak_bytes=peak, peak_kind="cuda_max_allocated_total", median_ms=ms,
                tokens_per_s=tokens / (ms / 1e3), timer="host_rounds", rounds=3)
    return pytest_benchmark_entry("step", f"{provider}-{response_length}", info)


def longest_row(provider, tried, first_oom):
    info = dict(op="step_longest", provider=provider, device="cuda:0", mode="gpu", dtype="bf16", batch_size=4,
                mini_batch_size=2, query_length=32, max_response_length=max(k for k, ok in tried.items() if ok),
                first_oom_length=first_oom, search_limit=1 << 17,
                tried={str(k): ok for k, ok in sorted(tried.items())}, timer="search_duration",
                model=dict(hidden=896, layers=24, heads=14, vocab=151936))
    return pytest_benchmark_entry("step_longest", provider, info)


def skip(harness, group, provider, shape, dtype, dims, reason):
    """A conftest.SKIPPED entry for a skipped op case."""
    return {"group": group, "params": {"provider": provider, "shape": list(shape), "dtype": dtype},
            "reason": reason, "shape_id": harness.shape_id(dims, shape), "seq_len": shape[dims.index("T")]}


def results_json(harness, benchmarks, skipped):
    fastppo = {"mode": "gpu", "device_type": "cuda", "torch": "2.5.1+cu124", "triton": "3.1.0",
               "transformers": "4.46.0", "liger_kernel": "0.4.2", "python": "3.11.2",
               "ceilings": {"copy_GBps": COPY_GBPS, "matmul_TFLOPs": MATMUL_TFLOPS, "matmul_dtype": "bf16",
                            "method": "triton do_bench median: 1024 MiB copy_, 8192³ bf16 matmul"},
               "device_name": "NVIDIA H100 80GB HBM3", "device_memory_GiB": 79.1, "cuda": "12.4",
               "driver": "550.54.15", "skipped": skipped, "providers": harness.PROVIDER_DOC}
    return {"machine_info": {"node": "gpu-host", "system": "Linux", "python_version": "3.11.2", "fastppo": fastppo},
            "commit_info": {"id": "0123456789abcdef0123456789abcdef01234567", "dirty": False, "project": "fastppo",
                            "branch": "main"},
            "benchmarks": benchmarks, "datetime": "2026-12-01T10:00:00+00:00", "version": "5.3.1"}


def table_row(report_text, *first_cells):
    """{column: cell} of the table row starting with `first_cells`, keyed by that table's header."""
    lines = report_text.splitlines()
    prefix = "| " + " | ".join(first_cells) + " |"
    index = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    header = next(lines[i] for i in range(index, -1, -1) if lines[i + 1].startswith("|---"))
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return dict(zip(split(header), split(lines[index])))


def test_gpu_report_from_two_parts(bench, tmp_path):
    harness, report = bench("harness"), bench("report")
    lp, kl_shape, linear = (4, 4096, 151936), (4, 2048, 128256), (8, 4096, 4096, 128256)
    n_lp = 4 * 4096
    n_linear = 8 * 4096
    part_ops = [
        op_row(harness, "logprobs_fwd", "eager", lp, "bf16", 15.4),
        op_row(harness, "logprobs_fwd", "fastppo", lp, "bf16", 2.2),
        op_row(harness, "full_kl", "eager", kl_shape, "bf16", 9.0),  # fastppo's row is missing: bar "—"
        op_row(harness, "full_kl", "compile", kl_shape, "bf16", 5.0),
        op_row(harness, "gae", "eager", (64, 8192), "fp32", 8.0),
        op_row(harness, "gae", "fastppo", (64, 8192), "fp32", 0.04),
        op_row(harness, "kl_reward", "eager", (64, 16384), "fp32", 0.3),
        op_row(harness, "kl_reward", "compile", (64, 16384), "fp32", 0.15),
        op_row(harness, "kl_reward", "fastppo", (64, 16384), "fp32", 0.05, peak=8 * 2**20),
        op_row(harness, "ppo_loss_fwd_bwd", "eager", (64, 16384), "fp32", 1.0),
        op_row(harness, "ppo_loss_fwd_bwd", "compile", (64, 16384), "fp32", 0.3),
        op_row(harness, "ppo_loss_fwd_bwd", "fastppo", (64, 16384), "fp32", 0.25),
    ]
    gpu_env = harness.BenchEnv(mode="gpu", device=torch.device("cuda"))
    skips_ops = [skip(harness, "logprobs_fwd", "reference", lp, "bf16", "BTV",
                      harness.provider_skip_reason("reference", gpu_env))]
    part_step = [
        op_row(harness, "logprobs_fwd_bwd", "eager", lp, "bf16", 30.0, peak=7 * n_lp * 151936 * 2),
        # the gradient (one bf16 [N, V]) plus three float32 values a row (log-prob, row max, log-sum)
        op_row(harness, "logprobs_fwd_bwd", "fastppo", lp, "bf16", 6.0, peak=n_lp * 151936 * 2 + 12 * n_lp),
        op_row(harness, "logprobs_fwd_bwd", "fastppo", lp, "fp32", 11.0),
        op_row(harness, "linear_logprobs", "eager", linear, "bf16", 400.0, peak=30 * 10**9),
        # the hidden and weight gradients, (N + V)·H bf16, plus 2.5 GB
        op_row(harness, "linear_logprobs", "fastppo", linear, "bf16", 300.0,
               peak=(n_linear + 128256) * 4096 * 2 + 2_500_000_000),
        step_row("torch", 2048, 800.0, 20 * 2**30),
        step_row("triton", 2048, 320.0, 8 * 2**30),
        step_row("triton-fused", 2048, 500.0, 4 * 2**30),
        # what longest_fitting(start=4096, limit=2**17, granularity=256) tries when ≤ 6500 / ≤ 26000 / all fit
        longest_row("torch", {4096: True, 8192: False, 6144: True, 7168: False, 6656: False}, 6656),
        longest_row("triton", {4096: True, 8192: True, 16384: True, 32768: False, 24576: True, 28672: False,
                               26624: False}, 26624),
        longest_row("triton-fused", {2**k: True for k in range(12, 18)}, None),
    ]
    skips_step = [skip(harness, "logprobs_fwd_bwd", "eager", lp, "fp32", "BTV",
                       "OOM (CUDA out of memory. Tried to allocate 9.27 GiB. GPU 0 has a total capacity of 79.10 GiB)"),
                  # bench_step's own skip when a step runs out of memory (params: backend, response_length)
                  {"group": "step", "params": {"backend": "torch", "response_length": 8192},
                   "reason": "OOM (CUDA out of memory. Tried to allocate 37.10 GiB)"}]
    paths = []
    for part, benchmarks, skipped in (("ops", part_ops, skips_ops), ("step", part_step, skips_step)):
        paths.append(tmp_path / f"results-{part}.json")
        paths[-1].write_text(json.dumps(results_json(harness, benchmarks, skipped), indent=2))

    text = Path(report.write_report([str(p) for p in paths], str(tmp_path / "out"))).read_text()

    # header: the GPU, the merged count, no CPU banner
    assert "CPU run" not in text and "Not evaluated" not in text
    for line in ("| device | NVIDIA H100 80GB HBM3 — 79.1 GiB, CUDA 12.4 |", "| driver | 550.54.15 |",
                 "| torch / triton / transformers | 2.5.1+cu124 / 3.1.0 / 4.46.0 |", "| liger-kernel | 0.4.2 |",
                 "| git commit | 0123456789 |", f"| mode | gpu ({len(part_ops) + len(part_step)} benchmarks) |",
                 "| measured copy bandwidth | 2,500 GB/s (read + write) |",
                 "| measured matmul rate | 625 TFLOP/s bf16 |",
                 # named relative to the RESULTS.md (in out/, the JSON beside that folder)
                 "Raw pytest-benchmark JSON: `../results-ops.json`, `../results-step.json`."):
        assert line in text, line

    # every §6 bar: (measured, met), worked out by hand
    expected = {
        ("logprobs_fwd", "pct_floor"): ("90.5", "yes"),  # (16384·151936·2 + 16384·12) B / 2500 GB/s / 2.2 ms
        ("logprobs_fwd", "x_eager"): ("7", "**no**"),  # 15.4 / 2.2
        ("logprobs_fwd_bwd", "x_eager"): ("5", "yes"),  # 30 / 6
        ("logprobs_fwd_bwd", "peak_over_nv_bf16"): ("1", "yes"),  # 1 + 12 / (2·151936), to 0.01
        ("full_kl", "pct_floor"): ("—", "—"),  # no fastppo row
        ("gae", "x_eager"): ("200", "yes"),  # 8 / 0.04
        ("gae", "median_us"): ("40", "yes"),
        ("kl_reward", "x_eager"): ("6", "yes"),  # 0.3 / 0.05
        ("kl_reward", "x_compile"): ("3", "yes"),  # 0.15 / 0.05
        ("ppo_loss_fwd_bwd", "x_eager"): ("4", "yes"),  # 1 / 0.25
        ("ppo_loss_fwd_bwd", "x_compile"): ("1.2", "**no**"),  # 0.3 / 0.25
        ("linear_logprobs", "peak_extra_GB"): ("2.5", "**no**"),  # gradients taken off
        ("linear_logprobs", "eager_peak_GB"): ("30", "yes"),
        ("linear_logprobs", "pct_matmul"): ("73.4", "**no**"),  # 8·32768·4096·128256 / 625 TFLOP/s / 300 ms
    }
    assert set(expected) == {(op, metric) for op, _, _, _, metric, _, _ in report.BARS}
    bars = text[text.index("## DESIGN.md §6 bars"):text.index("## How to read this")]
    for op, shape, dtype, bar, metric, _, _ in report.BARS:
        measured, met = expected[(op, metric)]
        assert f"| {op} | {shape} | {dtype} | {bar} | {measured} | {met} |" in bars, (op, metric)
    for line in (  # tokens/s at response 2048: 8320 tokens / 0.8, 0.32, 0.5 s; longest 6144, 24576, 131072
            "| step, triton (0.49 B-parameter model) | response 2048 | — | ≥ 2× torch | 2.5 | yes |",
            "| step, triton-fused (0.49 B-parameter model) | response 2048 | — | ≥ 2× torch | 1.6 | **no** |",
            "| longest step, triton (0.49 B-parameter model) | — | — | longest fit ≥ 4× torch | 4 | yes |",
            "| longest step, triton-fused (0.49 B-parameter model) | — | — | longest fit ≥ 4× torch | 21.3 | yes |"):
        assert line in bars, line
    assert bars.count("\n| ") == 1 + len(report.BARS) + 4  # header + bars + step rows

    # step tables
    assert "batch 4, 1 PPO epoch(s)" in text and "494 M parameters" in text
    assert "| B4xQ32xR2048 | torch | 800 | 10,400 | 1 | 20,480 |" in text
    assert "| B4xQ32xR2048 | triton | 320 | 26,000 | 2.5 | 8,192 |" in text
    assert "| B4xQ32xR2048 | triton-fused | 500 | 16,640 | 1.6 | 4,096 |" in text
    assert "| R8192 | torch | OOM | — | — | — |" in text  # a step that ran out of memory is a row too
    assert "| torch | 6144 | 6656 | 1 | 4096, 6144, 6656 ✗, 7168 ✗, 8192 ✗ |" in text
    assert "| triton | 24576 | 26624 | 4 | 4096, 8192, 16384, 24576, 26624 ✗, 28672 ✗, 32768 ✗ |" in text
    assert ("| triton-fused | 131072 | none up to 131072 | 21.3 | 4096, 8192, 16384, 32768, 65536, 131072 |"
            in text)

    # op tables: the OOM skip (second part) is a row; × eager / × compile from do_bench medians
    assert "| B4xT4096xV151936 | fp32 | eager | OOM | — | — | — | — | — | — |" in text
    assert table_row(text, "B4xT4096xV151936", "fp32", "**fastppo**")["× eager"] == "—"
    assert "- reference (B4xT4096xV151936): reference = eager behind fastppo's argument checks" in text
    row = table_row(text, "B64xT16384", "fp32", "**fastppo**")
    assert row["median ms"] == "0.05" and row["IQR %"] == "4"  # (1.02 - 0.98)·0.05 / 0.05
    assert row["× eager"] == "6" and row["× compile"] == "3"  # 0.3 / 0.05, 0.15 / 0.05
    assert row["GB/s"] == "357" and row["% floor"] == "14.3" and row["peak MiB"] == "8"  # 17 B/token + 4 B/row
    assert table_row(text, "B8xT4096xH4096xV128256", "bf16", "**fastppo**")["% matmul"] == "73.4"
    assert (tmp_path / "out" / "results.png").stat().st_size > 10_000


def test_gpu_page_links_its_results_folder_and_keeps_each_kinds_measurements(bench, tmp_path):
    """bench/RESULTS.md names bench/results/gpu/'s figure and JSON; each kind's measurements.md is appended."""
    harness, report = bench("harness"), bench("report")
    page, gpu, cpu = tmp_path / "bench", tmp_path / "bench" / "results" / "gpu", tmp_path / "bench" / "results" / "cpu"
    gpu.mkdir(parents=True)
    cpu.mkdir()
    rows = [op_row(harness, "gae", "eager", (64, 8192), "fp32", 8.0),
            op_row(harness, "gae", "fastppo", (64, 8192), "fp32", 0.04)]
    paths = [gpu / "results-a.json", gpu / "results-b.json"]
    for path, row in zip(paths, rows):
        path.write_text(json.dumps(results_json(harness, [row], []), indent=2))
    (cpu / "results.json").write_text(json.dumps(results_json(harness, rows, []), indent=2))
    fragment = {kind: f"## Other measurements\n\n| what | figure |\n|---|---|\n| {kind} thing | 42 |\n"
                for kind in ("gpu", "cpu")}

    # no fragment yet: the report ends with its last section
    text = Path(report.write_report([str(p) for p in paths], str(page), results_dir=str(gpu))).read_text()
    assert "## Other measurements" not in text
    assert "Raw pytest-benchmark JSON: `results/gpu/results-a.json`, `results/gpu/results-b.json`." in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert "](results/gpu/results.png)" in text and (gpu / "results.png").stat().st_size > 10_000
        assert not (page / "results.png").exists()

    # the fragment of the page's kind, appended at the end, once, however often the page is regenerated
    (gpu / "measurements.md").write_text(fragment["gpu"])
    (cpu / "measurements.md").write_text(fragment["cpu"])
    for _ in range(2):
        report.main([*map(str, paths), "--out", str(page), "--results-dir", str(gpu), "--command", "made by hand"])
    text = (page / "RESULTS.md").read_text()
    assert text.endswith("\n\n" + fragment["gpu"]) and text.count("## Other measurements") == 1
    assert "gpu thing" in text and "cpu thing" not in text and "Command: `made by hand`." in text
    assert text.index("## gae") < text.index("## Other measurements")

    # the CPU page sits in its results folder: JSON and figure by bare name, its own fragment
    text = Path(report.write_report([str(cpu / "results.json")], str(cpu))).read_text()
    assert "Raw pytest-benchmark JSON: `results.json`." in text and text.endswith("\n\n" + fragment["cpu"])
    assert "gpu thing" not in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert "](results.png)" in text

    # an explicit fragment replaces the folder's; a named one that is missing is an error, not a silent loss
    other = tmp_path / "other.md"
    other.write_text("## Other measurements\n\nby hand\n")
    text = Path(report.write_report([str(cpu / "results.json")], str(cpu), measurements=str(other))).read_text()
    assert text.endswith("\n\n## Other measurements\n\nby hand\n") and "cpu thing" not in text
    with pytest.raises(FileNotFoundError):
        report.write_report([str(cpu / "results.json")], str(cpu), measurements=str(tmp_path / "missing.md"))
