"""Where one `PPOTrainer.step` spends its time, phase by phase, and how far it is from its compute floor.

    python bench/tools/profile_step.py                                   # GPU: bench_step's Llama, R512 and R2048
    python bench/tools/profile_step.py --mode cpu --lengths 32,128 --steps 3
    python bench/tools/profile_step.py --mode smoke --steps 1 --json /tmp/profile.json

Builds bench_step's value-head Llama and batch (bench/suites/bench_step.py) per response length,
runs one warm-up step, `--steps` timed steps (synchronised perf_counter, no profiler: the wall time
and MFU come from these) and `--steps` more under torch.profiler. Per range the trainer opens with
torch.profiler.record_function (PHASES) it prints the count, host time and device time per step,
and the host time of `fastppo/step` outside every other phase. Device time on CUDA is the time of the
kernels (and copies) launched inside the range, from any thread (see phase_times); on CPU device = host.
MFU = flops.step_flops (bench/suites/flops.py) / median wall / an n³ matmul's measured rate.
"""

from __future__ import annotations

import os

# The Triton interpreter (the triton backend on CPU) is read when triton is first imported, through
# `import fastppo`: set it first, as bench/suites/conftest.py does, and drop it again on a CUDA machine.
_interpret_set_here = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import bisect  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

if torch.cuda.is_available() and _interpret_set_here:
    del os.environ["TRITON_INTERPRET"]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "suites"))  # the suites' modules
import bench_step  # noqa: E402
import harness  # noqa: E402
from flops import step_flops  # noqa: E402

STEP = "fastppo/step"
PHASES = ("fastppo/check_inputs", "fastppo/rollout_forward", "fastppo/rewards", "fastppo/advantages",
          "fastppo/minibatch_forward", "fastppo/minibatch_backward", "fastppo/optimizer_step", "fastppo/stats")
CPU = torch.autograd.DeviceType.CPU


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of an n³ matmul (2·n³ FLOPs): the median of `repeats` timings after a warm-up. CUDA: 8192³
    (large enough for cuBLAS's peak) timed with CUDA events over 10 back-to-back calls, so launch gaps
    do not count; CPU: 2048³ with perf_counter (as fast per FLOP as 4096³ here, at an eighth of the time)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    calls = 10 if cuda else 1
    times = []
    for _ in range(repeats + 1):  # the first is the warm-up (cuBLAS handle, heuristics, page faults)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            begin = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - begin)
    times = sorted(times[1:])
    return 2.0 * n**3 / times[len(times) // 2]


def _union_us(intervals, lo: float, hi: float) -> float:
    """Length of the union of (start, end) intervals clipped to [lo, hi]."""
    total, reach = 0.0, lo
    for start, end in sorted((max(s, lo), min(e, hi)) for s, e in intervals):
        if end > max(start, reach):  # skips what lies outside [lo, hi] (clipped to end before it starts)
            total += end - max(start, reach)
            reach = end
    return total


def phase_times(events, steps: int) -> dict:
    """Per name in (STEP,) + PHASES, from the profiler's FunctionEvents: count, host_ms and device_ms per
    step (device_ms None without device events); "outside": host ms per step of STEP outside the others;
    "device_method": how device time was attributed.

    Host time is the CPU-side range's duration. Device time ("launch") is the duration of every device op
    (kernel, copy, memset; not annotations) whose launch — the CUDA runtime or driver call with the same
    correlation id, on whichever thread — falls inside the range: the autograd engine launches backward
    kernels from its own thread, outside both the range's CPU children and its GPU-side annotation (see
    pytorch/kineto#1132). Where no launch can be matched, the ops that started inside the range's GPU-side
    annotation stand in ("annotation"). Ranges nest, so a phase's time includes the phases inside it."""
    names = (STEP,) + PHASES
    host = {name: [] for name in names}
    spans = {name: [] for name in names}
    launches, device_ops = {}, []
    for event in events:
        if event.device_type == CPU:
            if event.name in host:
                host[event.name].append(event)
            elif event.name.startswith("cu"):  # cudaLaunchKernel, cuLaunchKernel (Triton), cudaMemcpyAsync...
                launches[event.id] = event.time_range.start
        elif event.name in spans:
            spans[event.name].append(event)
        elif not getattr(event, "is_user_annotation", False):
            device_ops.append(event)
    timeline = [(launches[e.id], e.time_range.elapsed_us()) for e in device_ops if e.id in launches]
    method, windows = "launch", host
    if not timeline:
        timeline = [(e.time_range.start, e.time_range.elapsed_us()) for e in device_ops]
        method, windows = "annotation", spans
    timeline.sort()
    starts, sums = [start for start, _ in timeline], [0.0]
    for _, duration in timeline:
        sums.append(sums[-1] + duration)

    def within(window) -> float:  # prefix sums: a step has thousands of kernels and dozens of ranges
        lo, hi = (bisect.bisect_left(starts, t) for t in (window.time_range.start, window.time_range.end))
        return sums[hi] - sums[lo]

    result = {"device_method": method if device_ops else None}
    for name in names:
        device_us = sum(within(window) for window in windows[name]) if device_ops else None
        result[name] = dict(count=len(host[name]) / steps,
                            host_ms=sum(e.time_range.elapsed_us() for e in host[name]) / steps / 1e3,
                            device_ms=None if device_us is None else device_us / steps / 1e3)
    inner = [(e.time_range.start, e.time_range.end) for name in PHASES for e in host[name]]
    outside = [e.time_range.elapsed_us() - _union_us(inner, e.time_range.start, e.time_range.end)
               for e in host[STEP]]
    result["outside"] = sum(outside) / steps / 1e3 if outside else None
    return result

def profile_case(trainer, batch, device: torch.device, steps: int) -> dict:
    """One warm-up step, `steps` timed steps (median wall, no profiler), `steps` profiled ones."""
    cuda = device.type == "cuda"

    def step():
        start = time.perf_counter()
        trainer.step(*batch)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step()  # cuBLAS handles, Triton JIT, allocator growth
    walls = sorted(step() for _ in range(steps))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        profiled = sorted(step() for _ in range(steps))
    return dict(wall_ms=walls[len(walls) // 2] * 1e3, profiled_wall_ms=profiled[len(profiled) // 2] * 1e3,
                phases=phase_times(profile.events(), steps))


def _ms(value) -> str:
    return "—" if value is None else f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def format_table(result: dict) -> str:
    """One case as markdown: a heading line, then one row per phase and the host time outside them."""
    phases, step_host = result["phases"], result["phases"][STEP]["host_ms"] or None
    cuda = result["device"].startswith("cuda")
    lines = [f"### {result['backend']}, {result['shape_id']} ({result['device']}, {result['dtype']}): "
             f"wall {_ms(result['wall_ms'])} ms (median of {result['steps']}; {_ms(result['profiled_wall_ms'])} ms "
             f"profiled), {result['flops'] / 1e9:,.3g} GFLOP, matmul {result['matmul_flops'] / 1e12:.3g} TFLOP/s "
             f"→ MFU {100 * result['mfu']:.3g} %"
             + (f"; device time by {phases['device_method']}" if cuda and phases["device_method"] else ""), "",
             "| phase | count/step | host ms/step | device ms/step | % of step (host) |", "|---|---|---|---|---|"]
    for name in (STEP,) + PHASES:
        row = phases[name]
        device = _ms(row["device_ms"]) if cuda else "= host"
        share = _ms(100 * row["host_ms"] / step_host) if step_host and row["count"] else "—"
        lines.append(f"| {name} | {row['count']:g} | {_ms(row['host_ms']) if row['count'] else '—'} | "
                     f"{device if row['count'] else '—'} | {share} |")
    outside = phases["outside"]
    lines.append(f"| outside any phase (host) | — | {_ms(outside)} | — | "
                 f"{_ms(100 * outside / step_host) if outside is not None and step_host else '—'} |")
    if not any(phases[name]["count"] for name in (STEP,) + PHASES):
        lines.append(f"\n(no {STEP} ranges: this trainer opens no torch.profiler.record_function ranges)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("gpu", "cpu", "smoke"), default="gpu" if torch.cuda.is_available()
                        else "cpu", help="bench_step.SETTINGS to use (default: gpu with CUDA, else cpu)")
    parser.add_argument("--lengths", default=None, help="response lengths, comma-separated (default: the mode's "
                                                        "first two bench_step lengths)")
    parser.add_argument("--backend", choices=list(bench_step.VARIANTS), default=None,
                        help="bench_step variant (default: triton with CUDA, else torch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, and as many profiled, after one warm-up")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.mode == "gpu" and not torch.cuda.is_available():
        parser.error("--mode gpu needs CUDA")
    cuda = torch.cuda.is_available() and args.mode != "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:  # the suite's default: one thread (small shared machines); the MFU is per that many cores
        torch.set_num_threads(int(os.environ.get(harness.THREADS_ENV, "1")))
    backend = args.backend or ("triton" if cuda else "torch")
    settings = bench_step.SETTINGS[args.mode]
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else settings["lengths"][:2]
    rate = matmul_rate(device, settings["dtype"], n=None if args.mode != "smoke" else (1024 if cuda else 256))
    batch_size, query = settings["batch_size"], settings["query_length"]
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trainer's advice on tiny batches is noise here
        trainer = bench_step._build_trainer(settings, backend, query + max(lengths), device)
        for length in lengths:
            total = query + length
            flops = step_flops(bench_step.llama_config(settings, total), batch_size, total, bench_step.PPO_EPOCHS)
            result = dict(mode=args.mode, backend=backend, device=str(device), dtype=harness.dtype_name(
                settings["dtype"]), shape_id=f"B{batch_size}xQ{query}xR{length}", response_length=length,
                steps=args.steps, ppo_epochs=bench_step.PPO_EPOCHS, flops=flops, matmul_flops=rate,
                threads=torch.get_num_threads())
            result.update(profile_case(trainer, bench_step._batch(settings, length, device), device, args.steps))
            result["mfu"] = flops / (result["wall_ms"] / 1e3) / rate
            print(format_table(result), flush=True)
            results.append(result)
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
