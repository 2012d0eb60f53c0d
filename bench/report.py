"""Turn pytest-benchmark JSON from the bench/suites/ run into RESULTS.md and a PNG of speedup and memory.

    python bench/report.py results.json [more.json ...] [--out DIR] [--results-dir DIR] [--command TEXT]
    python bench/report.py bench/results/gpu/results-*.json --out bench --results-dir bench/results/gpu  # GPU page
    python bench/report.py bench/results/cpu/results.json --out bench/results/cpu                        # CPU page

Reads each benchmark's `extra_info` (median_ms, GB/s, % of floor, peak memory, shape, dtype,
provider: see bench/suites/harness.py) and `machine_info["fastppo"]` (device, driver, versions,
measured ceilings, skipped cases). Several JSON files (e.g. a suite split over runs) are merged.

RESULTS.md goes to --out; results.png to the results directory (--results-dir, default --out),
and the markdown names the figure and the JSON by their paths relative to itself. The results
directory's hand-kept `measurements.md` (a `## Other measurements` section of figures measured
outside the suites; --measurements names another file), when it exists, is appended verbatim, so
regenerating a report keeps it: bench/results/gpu/measurements.md for the GPU page, and
bench/results/cpu/measurements.md for the CPU one.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

PROVIDER_ORDER = ("eager", "reference", "compile", "fastppo", "fastppo-inplace", "liger", "torch", "triton",
                  "triton-fused", "triton-grpo", "padded", "padding-free", "padding-free+budget")
OP_ORDER = ("logprobs_fwd", "logprobs_fwd_bwd", "full_kl", "kl_reward", "gae", "ppo_loss_fwd_bwd",
            "ppo_loss_gspo_fwd_bwd", "linear_logprobs", "step", "step_longest", "ragged")
OP_TITLES = {
    "logprobs_fwd": "logprobs_from_logits — forward",
    "logprobs_fwd_bwd": "logprobs_from_logits — forward + backward",
    "full_kl": "full_kl — forward",
    "kl_reward": "kl_penalty_rewards",
    "gae": "gae",
    "ppo_loss_fwd_bwd": "ppo_loss — forward + backward",
    "ppo_loss_gspo_fwd_bwd": "ppo_loss with GSPO's sequence ratio and seq-mean-token-mean weights — forward + backward",
    "linear_logprobs": "linear_logprobs — forward + backward",
}
OP_FLOORS = {
    "logprobs_fwd": "one read of the logits, N·V·s",
    "logprobs_fwd_bwd": "logits read twice + gradient written once, 3·N·V·s",
    "full_kl": "one read of both logits, 2·N·V·s",
    "kl_reward": "17 B/token (read 2 fp32 + bool mask, write 2 fp32)",
    "gae": "17 B/token (read 2 fp32 + bool mask, write 2 fp32)",
    "ppo_loss_fwd_bwd": "37 B/token (read 6 fp32 + bool mask, write ratio + 2 gradients)",
    "ppo_loss_gspo_fwd_bwd": "41 B/token (read 7 fp32 + bool mask, write ratio + 2 gradients)",
    "linear_logprobs": "8·N·H·V FLOPs at the measured matmul rate (% matmul); bytes: read hidden and weight, "
                       "write their gradients",
}
TIMERS = {
    "cuda_do_bench": "CUDA: triton.testing.do_bench median (warm-up, L2 flushed before every call); "
                     "pytest-benchmark's own host-timed rounds are in the JSON",
    "host_rounds": "host: median of pytest-benchmark rounds (perf_counter; synchronised on CUDA)",
    "single_call": "one call timed with perf_counter (pytest-benchmark was disabled)",
}
PEAK_KINDS = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated during one call minus what was allocated before "
                          "it (the inputs)",
    "cuda_max_allocated_total": "torch.cuda.max_memory_allocated during one step, everything included "
                                "(weights, reference model, Adam state)",
    "cpu_rss_peak": "CPU: growth of the peak resident set (VmHWM) during one call — approximate",
}


def load(paths):
    benchmarks, skipped = [], []
    machine, commit, when = None, None, None
    for path in paths:
        with open(path) as handle:
            data = json.load(handle)
        benchmarks.extend(data.get("benchmarks", []))
        info = data.get("machine_info", {}).get("fastppo", {})
        skipped.extend(info.get("skipped", []))
        if machine is None:
            machine, commit, when = info, data.get("commit_info", {}), data.get("datetime")
    return machine or {}, commit or {}, when, benchmarks, skipped


def median_ms(bench) -> float:
    info = bench.get("extra_info", {})
    if info.get("median_ms") is not None:
        return float(info["median_ms"])
    return float(bench["stats"]["median"]) * 1e3


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def mib(value) -> str:
    return "—" if value is None else fmt(value / 2**20)


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def provider_key(name: str):
    return PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER)


def op_key(name: str):
    return OP_ORDER.index(name) if name in OP_ORDER else len(OP_ORDER)


# --------------------------------------------------------------------------- markdown


def header(machine, commit, when, benchmarks) -> list:
    mode = machine.get("mode", "?")
    lines = ["# fastppo benchmark results", ""]
    if machine.get("device_type") == "cpu":
        lines += ["> **CPU run — these numbers come from a CPU and are not comparable with GPU numbers.** "
                  "GPU figures are pending a GPU session (`bash scripts/gpu_session.sh` slices on a CUDA machine, or "
                  "`bash bench/run.sh` there).", ""]
    if mode == "smoke":
        lines += ["> **Smoke run: tiny shapes, one round. It proves the suite runs; its numbers mean nothing.**",
                  ""]
    ceilings = machine.get("ceilings", {})
    device = machine.get("device_name", "?")
    if machine.get("device_type") == "cpu":
        device += f" — {machine.get('cpu_count', '?')} CPUs, torch threads {machine.get('torch_threads', '?')}"
    elif machine.get("device_memory_GiB"):
        device += f" — {machine['device_memory_GiB']} GiB, CUDA {machine.get('cuda', '?')}"
    commit_id = commit.get("id", "unknown")[:10]
    if commit.get("dirty"):
        commit_id += " (with uncommitted changes)"
    lines += [
        "| | |", "| --- | --- |",
        f"| device | {cell(device)} |",
        f"| driver | {cell(machine.get('driver', '?'))} |",
        f"| torch / triton / transformers | {machine.get('torch', '?')} / {machine.get('triton', '?')} / "
        f"{machine.get('transformers', '?')} |",
        f"| liger-kernel | {machine.get('liger_kernel', '?')} |",
        f"| git commit | {cell(commit_id)} |",
        f"| date | {when or '?'} |",
        f"| mode | {mode} ({len(benchmarks)} benchmarks) |",
        f"| measured copy bandwidth | {fmt(ceilings.get('copy_GBps'))} GB/s (read + write) |",
        f"| measured matmul rate | {fmt(ceilings.get('matmul_TFLOPs'))} TFLOP/s {ceilings.get('matmul_dtype', '')} |",
        f"| ceilings measured by | {cell(ceilings.get('method', '?'))} |",
        "",
    ]
    return lines


def method_notes(machine, benchmarks) -> list:
    timers = sorted({b.get("extra_info", {}).get("timer") for b in benchmarks} & set(TIMERS))
    kinds = sorted({b.get("extra_info", {}).get("peak_kind") for b in benchmarks} - {None})
    lines = ["## How to read this", ""]
    for name, doc in sorted(machine.get("providers", {}).items(), key=lambda item: provider_key(item[0])):
        lines.append(f"- **{name}**: {doc}.")
    lines += [
        "- **median ms**: " + "; ".join(TIMERS[t] for t in timers) + ". Inputs are rotated through up to 64 "
        "copies (enough to overflow the last-level cache unless they are tiny); warm-up (compilation, JIT) "
        "happens before timing.",
        "- **IQR %**: interquartile range of the timed calls over the median: how noisy the row is.",
        "- **× eager / × compile**: the eager (or compile) median over this row's, same shape and dtype.",
        "- **GB/s**: bytes that must move / median. **% floor**: (bytes / measured copy bandwidth) / median — "
        "100 % is a kernel that moves only what it must at copy speed.",
    ]
    lines += [f"- **peak MiB**: {PEAK_KINDS.get(kind, kind)}." for kind in kinds]
    if machine.get("device_type") == "cpu":
        lines.append("- On CPU, **reference** runs the same code as **eager**: the gap between those two rows is "
                     "this run's noise (a small machine, shared with other work).")
    return lines + [""]


def op_section(group, rows, skips) -> list:
    lines = [f"## {OP_TITLES.get(group, group)}", ""]
    if group in OP_FLOORS:
        lines += [f"Floor: {OP_FLOORS[group]}.", ""]
    has_flops = any(r["extra_info"].get("flops") for r in rows)
    columns = ["shape", "dtype", "provider", "median ms", "IQR %", "× eager", "× compile", "GB/s", "% floor"]
    if has_flops:
        columns += ["TFLOP/s", "% matmul"]
    columns += ["peak MiB"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    by_case = defaultdict(dict)
    for bench in rows:
        info = bench["extra_info"]
        by_case[(info["dtype"], info["seq_len"], info["shape_id"])][info["provider"]] = bench
    oom = {(s["params"].get("dtype"), s.get("seq_len"), s.get("shape_id"), s["params"].get("provider"))
           for s in skips if s["reason"].startswith("OOM")}
    cases = sorted(set(by_case) | {key[:3] for key in oom}, key=lambda k: (k[0] != "bf16", k[0], k[1], k[2]))
    for case in cases:
        providers = by_case.get(case, {})
        eager = providers.get("eager")
        compile_ = providers.get("compile")
        names = sorted(set(providers) | {k[3] for k in oom if k[:3] == case}, key=provider_key)
        for name in names:
            bench = providers.get(name)
            if bench is None:
                lines.append(f"| {case[2]} | {case[0]} | {name} | OOM |" + " — |" * (len(columns) - 4))
                continue
            info = bench["extra_info"]
            ms = median_ms(bench)
            spread = None
            if info.get("q1_ms") is not None and info.get("q3_ms") is not None:
                spread = 100.0 * (info["q3_ms"] - info["q1_ms"]) / ms
            row = [case[2], case[0], f"**{name}**" if name == "fastppo" else name, fmt(ms), fmt(spread, 2),
                   fmt(median_ms(eager) / ms) if eager else "—",
                   fmt(median_ms(compile_) / ms) if compile_ else "—",
                   fmt(info.get("gbps")), fmt(info.get("pct_floor"))]
            if has_flops:
                row += [fmt(info.get("tflops")), fmt(info.get("pct_matmul"))]
            row.append(mib(info.get("peak_bytes")))
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    lines += [""] + skip_notes(skips, key="provider")
    return lines


def skip_notes(skips, key: str) -> list:
    reasons = defaultdict(list)
    for skip in skips:
        if skip["reason"].startswith("OOM"):
            continue
        label = skip.get("shape_id") or skip["params"].get("response_length", "")
        reasons[(skip["params"].get(key, "?"), skip["reason"])].append(str(label))
    if not reasons:
        return []
    lines = ["Not run:"]
    for (name, reason), labels in sorted(reasons.items(), key=lambda item: provider_key(item[0][0])):
        unique = sorted(set(labels), key=labels.index)
        where = ", ".join(unique[:4]) + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")
        lines.append(f"- {name}{f' ({where})' if where else ''}: {cell(reason)}")
    return lines + [""]


def ragged_section(rows, skips) -> list:
    """bench_ragged.py: one ragged batch, padded against packed rows."""
    lines = ["## PPOTrainer.step on a ragged batch: padded vs padding_free", ""]
    if rows:
        info = rows[0]["extra_info"]
        lines += [f"{info['shape'][0]} rows, sequence lengths {min(info['lengths'])}–{max(info['lengths'])} "
                  f"(query + log-uniform response), {info['dtype']}, the model of the step section, 1 PPO epoch, "
                  f"backend torch. Pads are {fmt(100 * info['pad_share'])} % of the padded batch's positions. "
                  "tokens/s counts real tokens only; the budget variant uses max_tokens_per_microbatch = the "
                  "longest sequence.", "",
                  "| variant | median ms | real tokens/s | × padded | peak MiB | pad share of positions run |",
                  "|---|---|---|---|---|---|"]
        padded = next((r for r in rows if r["extra_info"]["provider"] == "padded"), None)
        for bench in sorted(rows, key=lambda r: provider_key(r["extra_info"]["provider"])):
            info = bench["extra_info"]
            speedup = (info["tokens_per_s"] / padded["extra_info"]["tokens_per_s"]) if padded else None
            share = info["pad_share"] if info["provider"] == "padded" else 0.0
            lines.append(f"| {info['provider']} | {fmt(info['median_ms'])} | {fmt(info['tokens_per_s'])} | "
                         f"{fmt(speedup)} | {mib(info.get('peak_bytes'))} | {fmt(100 * share)} % |")
    for skip in skips:
        lines.append(f"| {skip['params'].get('variant', '?')} | {skip['reason']} | — | — | — | — |")
    return lines + [""]


def step_section(rows, longest, skips) -> list:
    lines = ["## PPOTrainer.step, end to end", ""]
    sample = (rows or longest)[0]["extra_info"]
    model = sample.get("model", {})
    if rows:
        info = rows[0]["extra_info"]
        has_mfu = any(r["extra_info"].get("mfu") is not None for r in rows)  # older JSON has none
        lines += [f"Llama from a config (no hub): hidden {model.get('hidden')}, {model.get('layers')} layers, "
                  f"{model.get('heads')} heads, vocabulary {model.get('vocab')}, {info.get('dtype')}, "
                  f"{fmt(info.get('parameters', 0) / 1e6)} M parameters; batch {info['shape'][0]}, "
                  f"{info.get('ppo_epochs')} PPO epoch(s); tokens/s = batch × (query + response) / median step."
                  + (" MFU = the step's model FLOPs (bench/suites/flops.py: forward × (2 + 3 · PPO epochs)) / "
                     "median step / the measured matmul rate." if has_mfu else ""),
                  ""]
        columns = ["batch × query × response", "variant", "median ms", "tokens/s", "× torch"]
        columns += ["MFU %"] * has_mfu + ["peak MiB"]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        by_length = defaultdict(dict)
        for bench in rows:
            by_length[bench["extra_info"]["seq_len"]][bench["extra_info"]["provider"]] = bench
        for skip in skips:  # a step that ran out of memory is a result: a row saying so
            length = skip["params"].get("response_length")
            if skip["group"] == "step" and skip["reason"].startswith("OOM") and length is not None:
                by_length[length].setdefault(skip["params"].get("backend", "?"), None)
        for length in sorted(by_length):
            torch_row = by_length[length].get("torch")
            for name in sorted(by_length[length], key=provider_key):
                if by_length[length][name] is None:
                    lines.append(f"| R{length} | {name} | OOM |" + " — |" * (len(columns) - 3))
                    continue
                info = by_length[length][name]["extra_info"]
                speedup = (info["tokens_per_s"] / torch_row["extra_info"]["tokens_per_s"]) if torch_row else None
                mfu = [fmt(100 * info["mfu"] if info.get("mfu") is not None else None)] * has_mfu
                row = [info["shape_id"], name, fmt(info["median_ms"]), fmt(info["tokens_per_s"]), fmt(speedup),
                       *mfu, mib(info.get("peak_bytes"))]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if longest:
        lines += ["Longest response that fits in device memory (doubling, then bisection to 1/8):", "",
                  "| variant | longest fitting response | first that did not fit | × torch | lengths tried |",
                  "|---|---|---|---|---|"]
        torch_longest = next((b["extra_info"]["max_response_length"] for b in longest
                              if b["extra_info"]["provider"] == "torch"), None)
        for bench in sorted(longest, key=lambda b: provider_key(b["extra_info"]["provider"])):
            info = bench["extra_info"]
            first_oom = info.get("first_oom_length")
            first_oom = first_oom if first_oom is not None else f"none up to {info.get('search_limit')}"
            ratio = info["max_response_length"] / torch_longest if torch_longest else None
            tried = ", ".join(f"{k}{'' if v else ' ✗'}" for k, v in info.get("tried", {}).items())
            lines.append(f"| {info['provider']} | {info['max_response_length']} | {first_oom} | {fmt(ratio)} | "
                         f"{tried} |")
        lines.append("")
    return lines + skip_notes(skips, key="backend")


# --------------------------------------------------------------------------- DESIGN.md §6 bars

# (op, shape, dtype, bar, metric, comparison, threshold), checked for the fastppo provider on CUDA.
BARS = [
    ("logprobs_fwd", "B4xT4096xV151936", "bf16", "≥ 85 % of the floor", "pct_floor", ">=", 85),
    ("logprobs_fwd", "B4xT4096xV151936", "bf16", "≥ 8× eager", "x_eager", ">=", 8),
    ("logprobs_fwd_bwd", "B4xT4096xV151936", "bf16", "≥ 4× eager", "x_eager", ">=", 4),
    ("logprobs_fwd_bwd", "B4xT4096xV151936", "bf16", "extra memory ≤ one bf16 [N, V]", "peak_over_nv_bf16", "<=", 1),
    ("full_kl", "B4xT2048xV128256", "bf16", "≥ 80 % of the floor", "pct_floor", ">=", 80),
    ("gae", "B64xT8192", "fp32", "≥ 100× eager", "x_eager", ">=", 100),
    ("gae", "B64xT8192", "fp32", "≤ 50 µs", "median_us", "<=", 50),
    ("kl_reward", "B64xT16384", "fp32", "≥ 3× eager", "x_eager", ">=", 3),
    ("kl_reward", "B64xT16384", "fp32", "≥ 1.5× compile", "x_compile", ">=", 1.5),
    ("ppo_loss_fwd_bwd", "B64xT16384", "fp32", "≥ 3× eager", "x_eager", ">=", 3),
    ("ppo_loss_fwd_bwd", "B64xT16384", "fp32", "≥ 1.5× compile", "x_compile", ">=", 1.5),
    ("linear_logprobs", "B8xT4096xH4096xV128256", "bf16", "peak extra ≤ 2 GB (beyond inputs and gradients)",
     "peak_extra_GB", "<=", 2),
    ("linear_logprobs", "B8xT4096xH4096xV128256", "bf16", "eager peak ≥ 25 GB (for contrast)", "eager_peak_GB",
     ">=", 25),
    ("linear_logprobs", "B8xT4096xH4096xV128256", "bf16", "≤ 1.25× the 8·N·H·V matmul floor (≥ 80 % matmul)",
     "pct_matmul", ">=", 80),
]


def _bar_metric(metric: str, rows: dict):
    fast, eager, compile_ = rows.get("fastppo"), rows.get("eager"), rows.get("compile")
    if fast is None:
        return None
    info = fast["extra_info"]
    if metric in ("pct_floor", "pct_matmul"):
        return info.get(metric)
    if metric == "median_us":
        return median_ms(fast) * 1e3
    if metric == "x_eager":
        return median_ms(eager) / median_ms(fast) if eager else None
    if metric == "x_compile":
        return median_ms(compile_) / median_ms(fast) if compile_ else None
    if info.get("peak_bytes") is None:
        return None
    if metric == "peak_over_nv_bf16":  # in bf16 [N, V] buffers, to 0.01: the float32 per-row outputs and softmax
        # statistics (12 B a row, 4e-5 of a buffer) must not fail a bar that the gradient alone meets
        batch, length, vocab = info["shape"]
        return round(info["peak_bytes"] / (batch * length * vocab * 2), 2)
    if metric == "peak_extra_GB":  # the measured peak counts the gradients of hidden and weight: take them off
        batch, length, n_hidden, vocab = info["shape"]
        return (info["peak_bytes"] - (batch * length + vocab) * n_hidden * 2) / 1e9
    if metric == "eager_peak_GB":
        return eager["extra_info"]["peak_bytes"] / 1e9 if eager and eager["extra_info"].get("peak_bytes") else None
    raise ValueError(metric)


def bars_section(machine, groups) -> list:
    lines = ["## DESIGN.md §6 bars", ""]
    if machine.get("device_type") != "cuda" or machine.get("mode") != "gpu":
        return lines + ["Not evaluated: the bars are for one H100 at full shapes; this is not a GPU run.", ""]
    lines += ["| op | shape | dtype | bar | measured | met |", "|---|---|---|---|---|---|"]
    for group, shape, dtype, bar, metric, comparison, threshold in BARS:
        rows = {b["extra_info"]["provider"]: b for b in groups.get(group, [])
                if b["extra_info"]["shape_id"] == shape and b["extra_info"]["dtype"] == dtype}
        value = _bar_metric(metric, rows)
        met = "—" if value is None else ("yes" if (value >= threshold if comparison == ">=" else value <= threshold)
                                         else "**no**")
        lines.append(f"| {group} | {shape} | {dtype} | {bar} | {fmt(value)} | {met} |")
    step = {b["extra_info"]["provider"]: b for b in groups.get("step", []) if b["extra_info"]["seq_len"] == 2048}
    longest = {b["extra_info"]["provider"]: b["extra_info"]["max_response_length"]
               for b in groups.get("step_longest", [])}
    sample = next(iter(step.values()), None) or next(iter(groups.get("step_longest", [])), None)
    params = sample["extra_info"].get("parameters") if sample else None
    model = f"{params / 1e9:.2f} B-parameter model" if params else "bench model"
    for variant in ("triton", "triton-fused"):
        if "torch" in step and variant in step:
            ratio = step[variant]["extra_info"]["tokens_per_s"] / step["torch"]["extra_info"]["tokens_per_s"]
            lines.append(f"| step, {variant} ({model}) | response 2048 | — | ≥ 2× torch | "
                         f"{fmt(ratio)} | {'yes' if ratio >= 2 else '**no**'} |")
        if longest.get("torch") and longest.get(variant):
            ratio = longest[variant] / longest["torch"]
            lines.append(f"| longest step, {variant} ({model}) | — | — | longest fit ≥ 4× torch | {fmt(ratio)} | "
                         f"{'yes' if ratio >= 4 else '**no**'} |")
    return lines + [""]


# --------------------------------------------------------------------------- plot


def plot_panels(groups: dict) -> list:
    """One panel per op: (title, baseline, x label, {provider: [(x, speedup over baseline, peak MiB)]})."""
    panels = []
    for group in [g for g in sorted(groups, key=op_key) if g not in ("step_longest", "ragged")]:
        rows = groups[group]
        dtypes = {r["extra_info"].get("dtype") for r in rows}
        dtype = "bf16" if "bf16" in dtypes else sorted(dtypes)[0]  # the GPU bars' dtype where there is one
        series = defaultdict(dict)
        for bench in rows:
            if bench["extra_info"].get("dtype") == dtype:
                series[bench["extra_info"]["provider"]][bench["extra_info"]["seq_len"]] = bench
        baseline = "torch" if group == "step" else "eager"
        base = series.get(baseline, {})
        lines = {}
        for provider in sorted(series, key=provider_key):
            lines[provider] = [
                (x, median_ms(base[x]) / median_ms(bench) if x in base else None,
                 bench["extra_info"]["peak_bytes"] / 2**20 if bench["extra_info"].get("peak_bytes") else None)
                for x, bench in sorted(series[provider].items())]
        x_label = "response length" if group == "step" else "sequence length T"
        panels.append((f"{group} ({dtype})", baseline, x_label, lines))
    return panels


# --------------------------------------------------------------------------- main

MEASUREMENTS = "measurements.md"  # the hand-kept fragment, in the results directory


def relative(path: str, start: str) -> str:
    """`path` as the markdown in `start` links it (forward slashes)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start)).replace(os.sep, "/")


def measurements_section(path) -> list:
    """The hand-kept fragment at `path`, as lines, or nothing if there is no such file."""
    if path is None or not os.path.isfile(path):
        return []
    with open(path) as handle:
        text = handle.read().strip()
    return [text, ""] if text else []


def write_report(json_paths, out_dir: str, command: str = "bash bench/run.sh", results_dir: str | None = None,
                 measurements: str | None = None) -> str:
    """Write RESULTS.md into `out_dir` and results.png into `results_dir` (default: `out_dir`); append the
    hand-kept fragment `measurements` (default: `results_dir`/measurements.md) when that file exists.
    Return the markdown's path."""
    results_dir = out_dir if results_dir is None else results_dir
    if measurements is None:
        measurements = os.path.join(results_dir, MEASUREMENTS)
    elif not os.path.isfile(measurements):
        raise FileNotFoundError(f"no measurements fragment at {measurements}")
    machine, commit, when, benchmarks, skipped = load(json_paths)
    groups = defaultdict(list)
    for bench in benchmarks:
        groups[bench.get("extra_info", {}).get("op") or bench.get("group")].append(bench)
    skips = defaultdict(list)
    for skip in skipped:
        skips[skip["group"]].append(skip)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(results_dir, exist_ok=True)
    png = os.path.join(results_dir, "results.png")
    lines = header(machine, commit, when, benchmarks)
    lines.append(f"Command: `{command}`. Raw pytest-benchmark JSON: "
                 + ", ".join(f"`{relative(p, out_dir)}`" for p in json_paths) + ".")
    lines.append("")
    title = f"fastppo benchmarks — {machine.get('device_name', '?')} ({machine.get('mode', '?')} mode)"
    if machine.get("device_type") == "cpu":
        title += " — CPU numbers, not comparable with GPU"
    panels = plot_panels(groups)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        lines += ["(No plot: matplotlib is not installed.)", ""]
        panels = []
    if panels:
        import plot

        plot.draw(panels, png, title)
        lines += [f"![speedup and peak memory against sequence length]({relative(png, out_dir)})", ""]
    lines += bars_section(machine, groups)
    lines += method_notes(machine, benchmarks)
    for group in sorted(set(groups) | set(skips), key=op_key):
        if group in ("step", "step_longest", "ragged"):
            continue
        lines += op_section(group, groups.get(group, []), skips.get(group, []))
    if groups.get("step") or groups.get("step_longest"):
        lines += step_section(groups.get("step", []), groups.get("step_longest", []),
                              skips.get("step", []) + skips.get("step_longest", []))
    if groups.get("ragged") or skips.get("ragged"):
        lines += ragged_section(groups.get("ragged", []), skips.get("ragged", []))
    lines += measurements_section(measurements)
    path = os.path.join(out_dir, "RESULTS.md")
    with open(path, "w") as handle:
        handle.write("\n".join(lines).rstrip() + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) from the bench/suites/ run")
    parser.add_argument("--out", default=None, help="directory for RESULTS.md (default: the first JSON's "
                                                    "directory)")
    parser.add_argument("--results-dir", default=None,
                        help="directory for results.png, where measurements.md is looked for (default: --out)")
    parser.add_argument("--measurements", default=None,
                        help=f"hand-kept markdown to append (default: {MEASUREMENTS} in the results directory, "
                             "if it exists)")
    parser.add_argument("--command", default="bash bench/run.sh", help="the command to name in the header")
    args = parser.parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.json[0]))
    print(f"wrote {write_report(args.json, out, args.command, args.results_dir, args.measurements)}")


if __name__ == "__main__":
    main()
