"""fastppo's `PPOTrainer.step` against TRL 0.11.4's on CPU: the same model, config and batches, alternating runs.

    python bench/tools/trl_step_compare.py --trl-python /tmp/trl011/bin/python --rounds 3 --steps 10
    python bench/tools/trl_step_compare.py ... --profile          # then one cProfile'd worker per library
    python bench/tools/trl_step_compare.py ... --append bench/results/cpu/measurements.md

The scenario is tests/trl/test_trl_parity.py's: the tiny GPT-2 of tests/data/trl_parity/init (vocab 64,
2 layers, n_embd 32) with its value head and tokenizer, loaded with eager attention, a reference model
loaded separately from the same folder, one intra-op thread; PPOConfig(batch_size=6, mini_batch_size=2,
ppo_epochs=4, learning_rate=1e-3, seed=0); fixed random batches of queries and responses of 3-12 tokens
and fixed scores. TRL 0.11.4 needs its own environment (docs/trl-compatibility.md,
/work/shared/trl-0.11-env.md), so each library runs in its own process:

    python bench/tools/trl_step_compare.py --worker fastppo|trl --steps N --json OUT [--profile]

builds the trainer once, runs 2 warm-up steps, times N steps (time.perf_counter around trainer.step,
and the process's CPU time, steadier on a shared machine) and writes the per-step seconds to OUT.
This file is run by both interpreters: the scenario lines below import only torch and transformers,
and the TRL worker imports nothing from fastppo (it checks).

The driver (the default mode) starts `--rounds` pairs of workers, fastppo then TRL, so that drift hits
both; each run's figure is its median step, and each library's the median over its runs. Workers run
with OMP_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false, fastppo's with FASTPPO_BACKEND=torch (the
reference ops; under the Triton interpreter the kernels would be far slower on CPU). `--profile` runs
one more worker per library under cProfile (outside the timed rounds: the profiler slows Python code
much more than native code) and prints each one's top functions by cumulative and by own time, per step;
`--profile-out DIR` keeps their raw pstats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "trl_parity"
CONFIG = dict(batch_size=6, mini_batch_size=2, ppo_epochs=4, learning_rate=1e-3, seed=0)
TOKENS = (3, 12)  # query and response lengths, inclusive
VOCAB = 64  # the tiny model's; ids 0 (<pad>) and 1 (<eos>) are never drawn
N_BATCHES = 4  # distinct batches, cycled through
WARMUP = 2
DEFAULT_TRL_PYTHON = "/tmp/trl011/bin/python"


# ---------------------------------------------------------------------------------------------- the scenario


def batches(n: int = N_BATCHES) -> list:
    """n fixed batches of (queries, responses, scores): the same in both interpreters (torch's CPU generator)."""
    import torch

    out = []
    for b in range(n):
        g = torch.Generator().manual_seed(2000 + b)
        queries, responses, scores = [], [], []
        for _ in range(CONFIG["batch_size"]):
            q_len, r_len = (int(torch.randint(TOKENS[0], TOKENS[1] + 1, (1,), generator=g)) for _ in range(2))
            queries.append(torch.randint(2, VOCAB, (q_len,), generator=g, dtype=torch.int64))
            responses.append(torch.randint(2, VOCAB, (r_len,), generator=g, dtype=torch.int64))
            scores.append(torch.randn((), generator=g, dtype=torch.float32))
        out.append((queries, responses, scores))
    return out


def build_trainer(library: str):
    """The trainer of `library` ("fastppo" or "trl") on the parity tests' model, with a separate reference."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    if library == "fastppo":
        from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    elif library == "trl":
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    else:
        raise ValueError(f"library must be fastppo or trl, got {library!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(DATA / "init"), attn_implementation="eager")
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(str(DATA / "init"), attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no dataset; TRL's deprecation notices
        config = PPOConfig(**CONFIG)
        return PPOTrainer(config=config, model=model, ref_model=ref_model, tokenizer=tokenizer)


def versions(library: str) -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if library == "trl":
        import accelerate
        import trl

        out.update(trl=trl.__version__, accelerate=accelerate.__version__)
    else:
        import accelerate

        out.update(accelerate=accelerate.__version__)
    return out


# ---------------------------------------------------------------------------------------------- the worker


def _worker_environment(library: str) -> None:
    """What `worker_env` sets, also when a worker is started by hand."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if library == "fastppo":
        os.environ.setdefault("FASTPPO_BACKEND", "torch")


def _step_inputs(data: list, i: int) -> tuple:
    """Step `i`'s (queries, responses, scores): fresh copies of one of the fixed batches, cycled through."""
    queries, responses, scores = data[i % len(data)]
    return [q.clone() for q in queries], [r.clone() for r in responses], [s.clone() for s in scores]


def _check_no_fastppo(library: str) -> None:
    """The TRL worker must have imported nothing of fastppo's."""
    leaked = sorted(name for name in sys.modules if name == "fastppo" or name.startswith("fastppo."))
    if library == "trl" and leaked:
        raise RuntimeError(f"the TRL worker imported fastppo: {leaked}")


def worker(library: str, steps: int, json_out: str | None, profile: bool, profile_out: str | None,
           profile_clock: str = "wall") -> dict:
    _worker_environment(library)
    import torch

    trainer = build_trainer(library)
    data = batches()

    def inputs(i):
        return _step_inputs(data, i)

    for i in range(WARMUP):
        trainer.step(*inputs(i))
    profiler = None
    if profile:
        import cProfile

        # "cpu" leaves out time spent waiting for a core on a shared machine, but reads the clock with a
        # system call per event, which inflates many-call Python code more than the wall clock does
        profiler = cProfile.Profile(time.process_time) if profile_clock == "cpu" else cProfile.Profile()
    seconds, cpu_seconds = [], []
    for i in range(WARMUP, WARMUP + steps):
        args = inputs(i)
        if profiler is not None:
            profiler.enable()
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.step(*args)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        if profiler is not None:
            profiler.disable()
    _check_no_fastppo(library)
    result = {
        "library": library, "steps_s": seconds, "median_s": statistics.median(seconds),
        "cpu_steps_s": cpu_seconds, "cpu_median_s": statistics.median(cpu_seconds), "warmup_steps": WARMUP,
        "profiled": profile, "config": CONFIG, "token_range": list(TOKENS), "torch_threads": torch.get_num_threads(),
        "versions": versions(library),
    }
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
    if profiler is not None:
        from pstats_tables import print_profile

        print_profile(profiler, steps, library, profile_clock)
        if profile_out:
            profiler.dump_stats(profile_out)
    return result


PROTOCOL = "@@fastppo-compare "  # the served worker's reply lines on stdout start with this (others are ignored)


def serve(library: str) -> None:
    """A worker that steps on request: builds its trainer, replies `ready`, then for each `step` line on stdin runs the
    next step and replies its wall and CPU seconds; `quit` replies the versions and ends. The interleaved driver
    (`--interleave`) runs one per library and has them take turns."""
    _worker_environment(library)
    import torch

    trainer, data = build_trainer(library), batches()

    def reply(**message):
        print(PROTOCOL + json.dumps(message), flush=True)

    reply(ready=True, torch_threads=torch.get_num_threads())
    for i, line in enumerate(sys.stdin):
        if line.strip() == "quit":
            _check_no_fastppo(library)
            reply(versions=versions(library))
            return
        args = _step_inputs(data, i)
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.step(*args)
        reply(wall=time.perf_counter() - start, cpu=time.process_time() - cpu_start)


# ---------------------------------------------------------------------------------------------- the driver


def worker_env(library: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if library == "fastppo":
        env["FASTPPO_BACKEND"] = "torch"
    else:  # nothing of fastppo's on the TRL interpreter's path
        env.pop("PYTHONPATH", None)
        env.pop("FASTPPO_BACKEND", None)
    return env


def run_worker(python: str, library: str, steps: int, json_out: Path, profile_out: Path | None = None,
               profile_clock: str = "wall") -> dict:
    """One worker process; with `profile_out`, under cProfile (its tables printed, its pstats kept there)."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", library, "--steps", str(steps), "--json", str(json_out)]
    profile = profile_out is not None
    if profile:
        cmd += ["--profile", "--profile-out", str(profile_out), "--profile-clock", profile_clock]
    result = subprocess.run(cmd, env=worker_env(library), cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{library} worker failed ({' '.join(cmd)}):\n"
                         f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    if profile:
        print(result.stdout)
    return json.loads(json_out.read_text())


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit_label() -> str:
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "fastppo", "kernels")
    return f"{commit} (fastppo/ or kernels/ with uncommitted changes)" if dirty else commit


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def row(wall_ms: dict, cpu_ms: dict, fv: dict, tv: dict, rounds: int, steps: int, trl_python: str,
        paired_ratio: float | None = None, turn: int = 1) -> str:
    """The measurements.md row; `wall_ms`, `cpu_ms`: {"fastppo": ms, "trl": ms}, medians of wall and CPU time.
    `paired_ratio`: the interleaved driver's median per-turn-pair CPU-time ratio, `turn` its steps per turn (`rounds`
    is then unused)."""
    interleaved = paired_ratio is not None
    what = ("PPOTrainer.step, fastppo vs TRL 0.11.4: " + ("median step time, the workers taking turns"
            if interleaved else "median step time (each run's median, then the median over runs)"))
    runs = (f"both workers at once, {steps} steps each in alternating turns of {turn} after {WARMUP} warm-up"
            if interleaved else f"{rounds} alternating runs per library × {steps} steps after {WARMUP} warm-up")
    setting = (f"tiny GPT-2 of tests/data/trl_parity (vocab 64, 2 layers, n_embd 32), eager attention, separate "
               f"reference; {CONFIG['batch_size']} rows of {TOKENS[0]}–{TOKENS[1]}-token queries and responses, "
               f"mini-batch {CONFIG['mini_batch_size']}, {CONFIG['ppo_epochs']} PPO epochs; fastppo backend torch; "
               + runs)
    figure = (f"fastppo {wall_ms['fastppo']:.1f} ms; TRL {wall_ms['trl']:.1f} ms (fastppo/TRL "
              f"{wall_ms['fastppo'] / wall_ms['trl']:.2f}×); CPU time fastppo {cpu_ms['fastppo']:.1f} ms, TRL "
              f"{cpu_ms['trl']:.1f} ms ({cpu_ms['fastppo'] / cpu_ms['trl']:.2f}×)")
    if interleaved:
        figure += f"; median of the per-turn-pair CPU-time ratios {paired_ratio:.2f}×"
    device = (f"{cpu_name()}, {os.cpu_count()} CPUs, torch threads 1; fastppo: torch {fv['torch']}, transformers "
              f"{fv['transformers']}, accelerate {fv.get('accelerate')}; TRL: trl {tv.get('trl')}, torch "
              f"{tv['torch']}, transformers {tv['transformers']}, accelerate {tv.get('accelerate')}")
    source = (f"`python bench/tools/trl_step_compare.py --trl-python {trl_python} "
              + (f"--interleave --turn {turn}" if interleaved else f"--rounds {rounds}") + f" --steps {steps}`")
    cells = [what, setting, figure, device, commit_label(), source]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def append_row(path: Path, line: str) -> None:
    """Insert `line` after the last row of the file's table (the file keeps one table of six columns)."""
    lines = path.read_text().splitlines()
    table = [i for i, text in enumerate(lines) if text.startswith("|")]
    if not table or lines[table[0]].count(" | ") != 5:
        raise SystemExit(f"{path}: no six-column table to append to")
    lines.insert(table[-1] + 1, line)
    path.write_text("\n".join(lines) + "\n")


def checked_trl_python(path: str) -> str:
    if not Path(path).exists():
        raise SystemExit(f"no TRL interpreter at {path} (see /work/shared/trl-0.11-env.md); pass --trl-python")
    return path


def driver(args) -> None:
    import tempfile

    fastppo_python, trl_python = args.fastppo_python or sys.executable, checked_trl_python(args.trl_python)
    runs = {"fastppo": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for library, python in (("fastppo", fastppo_python), ("trl", trl_python)):
                result = run_worker(python, library, args.steps, Path(tmp) / f"{library}-{r}.json")
                runs[library].append(result)
                print(f"round {r + 1}/{args.rounds} {library:7s}: median {1e3 * result['median_s']:.1f} ms, CPU "
                      f"{1e3 * result['cpu_median_s']:.1f} ms (steps "
                      f"{', '.join(f'{1e3 * s:.0f}' for s in result['steps_s'])} ms)", flush=True)
        if args.profile:
            keep = Path(args.profile_out or tmp)
            keep.mkdir(parents=True, exist_ok=True)
            for library, python in (("fastppo", fastppo_python), ("trl", trl_python)):
                run_worker(python, library, args.steps, Path(tmp) / f"{library}-profile.json", keep / f"{library}.prof",
                           args.profile_clock)
            if args.profile_out:
                print(f"raw pstats in {keep}/fastppo.prof and {keep}/trl.prof (python -m pstats FILE)")
    wall = {library: 1e3 * statistics.median(run["median_s"] for run in runs[library]) for library in runs}
    cpu = {library: 1e3 * statistics.median(run["cpu_median_s"] for run in runs[library]) for library in runs}
    fv, tv = runs["fastppo"][0]["versions"], runs["trl"][0]["versions"]
    print(f"\nmedian step: fastppo {wall['fastppo']:.1f} ms, TRL {wall['trl']:.1f} ms, fastppo/TRL "
          f"{wall['fastppo'] / wall['trl']:.2f}×; CPU time: fastppo {cpu['fastppo']:.1f} ms, TRL {cpu['trl']:.1f} ms, "
          f"{cpu['fastppo'] / cpu['trl']:.2f}×\n")
    header = ("| what | setting (model, shape, batch) | figure | device and versions | commit "
              "| source (command or script) |")
    line = row(wall, cpu, fv, tv, args.rounds, args.steps, trl_python)
    print(header + "\n| --- | --- | --- | --- | --- | --- |\n" + line)
    if args.append:
        append_row(Path(args.append), line)
        print(f"\nappended to {args.append}")


def interleaved(args) -> None:
    """Both libraries' served workers side by side, taking turns of `--turn` steps (who goes first flips every pair of
    turns): a slow spell of a shared machine then hits both alike. Figures: each library's median step and the median
    of the per-turn-pair ratios of the turns' median CPU times."""
    pythons = {"fastppo": args.fastppo_python or sys.executable, "trl": checked_trl_python(args.trl_python)}
    workers = {library: subprocess.Popen([python, str(Path(__file__).resolve()), "--serve", library], cwd=ROOT,
                                         env=worker_env(library), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
               for library, python in pythons.items()}

    def ask(library: str, command: str) -> dict:
        worker = workers[library]
        worker.stdin.write(command + "\n")
        worker.stdin.flush()
        for line in worker.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        raise SystemExit(f"the {library} worker ended early (exit code {worker.wait()}); run it alone with --worker")

    try:
        for library, worker in workers.items():  # each builds its trainer
            for line in worker.stdout:
                if line.startswith(PROTOCOL):
                    break
            else:
                raise SystemExit(f"the {library} worker failed to start (exit code {worker.wait()})")
        for _ in range(WARMUP):
            for library in workers:
                ask(library, "step")
        turns = {"fastppo": [], "trl": []}  # per turn, the median CPU seconds of its steps
        times = {"fastppo": [], "trl": []}
        for turn in range(-(-args.steps // args.turn)):
            for library in ("fastppo", "trl") if turn % 2 == 0 else ("trl", "fastppo"):
                results = [ask(library, "step") for _ in range(args.turn)]
                times[library] += results
                turns[library].append(statistics.median(r["cpu"] for r in results))
        found = {library: ask(library, "quit")["versions"] for library in workers}
    finally:
        for worker in workers.values():
            worker.kill()
    wall = {library: 1e3 * statistics.median(t["wall"] for t in times[library]) for library in times}
    cpu = {library: 1e3 * statistics.median(t["cpu"] for t in times[library]) for library in times}
    paired = [f / t for f, t in zip(turns["fastppo"], turns["trl"])]
    low, _, high = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    print(f"{len(times['fastppo'])} interleaved steps per library, {args.turn} per turn: median step fastppo "
          f"{wall['fastppo']:.1f} ms, TRL {wall['trl']:.1f} ms; CPU time fastppo {cpu['fastppo']:.1f} ms, TRL "
          f"{cpu['trl']:.1f} ms; median of the per-turn-pair CPU-time ratios fastppo/TRL "
          f"{statistics.median(paired):.3f}× (quartiles {low:.3f}–{high:.3f})\n")
    line = row(wall, cpu, found["fastppo"], found["trl"], 0, len(times["fastppo"]), pythons["trl"],
               statistics.median(paired), args.turn)
    print(line)
    if args.append:
        append_row(Path(args.append), line)
        print(f"\nappended to {args.append}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("fastppo", "trl"), help="run one library's timed steps in this process")
    parser.add_argument("--serve", choices=("fastppo", "trl"), help="a worker stepping on request (for --interleave)")
    parser.add_argument("--interleave", action="store_true",
                        help="driver: both workers at once, taking turns of --turn steps (steadier ratio)")
    parser.add_argument("--turn", type=int, default=1, help="--interleave: steps per library per turn")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--json", help="worker: where to write the per-step seconds")
    parser.add_argument("--profile", action="store_true",
                        help="worker: cProfile the timed steps; driver: one more profiled worker per library")
    parser.add_argument("--profile-out", help="worker: also dump the raw pstats to this file; driver: keep both "
                        "profiled workers' pstats in this folder (fastppo.prof, trl.prof)")
    parser.add_argument("--profile-clock", choices=("wall", "cpu"), default="wall",
                        help="cProfile's clock: wall time (default) or this process's CPU time (steadier on a "
                        "shared machine, but a system call per event inflates many-call code)")
    parser.add_argument("--rounds", type=int, default=3, help="driver: runs per library, alternating")
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="driver: the TRL 0.11.4 environment's python")
    parser.add_argument("--fastppo-python", help="driver: fastppo's python (default: this one)")
    parser.add_argument("--append", help="driver: append the markdown row to this measurements.md table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.turn < 1:
        parser.error("--steps, --rounds and --turn must be at least 1")
    if args.serve:
        serve(args.serve)
    elif args.interleave:
        interleaved(args)
    elif args.worker:
        result = worker(args.worker, args.steps, args.json, args.profile, args.profile_out, args.profile_clock)
        print(f"{args.worker}: median step {1e3 * result['median_s']:.1f} ms over {args.steps} steps")
    else:
        driver(args)


if __name__ == "__main__":
    main()
