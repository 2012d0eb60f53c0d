"""Where a ragged batch's step spends its time, padded against padding_free (bench_ragged.py's batch).

    python bench/tools/profile_ragged.py            # GPU: bench_step's Llama, 16 rows of 64..4096 tokens
    python bench/tools/profile_ragged.py --cpu      # the tiny CPU setting, to check the script runs

One warm-up step per variant, then one profiled step (torch.profiler): prints the step's wall time,
the device time summed over kernels, and the kernels taking most device time, per variant.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "suites"))  # the suites' modules
from bench_ragged import _batch, _trainer  # noqa: E402
from bench_step import SETTINGS  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device, mode = (torch.device("cuda"), "gpu") if cuda else (torch.device("cpu"), "cpu")
    settings = SETTINGS[mode]
    batch = _batch(settings, mode, device)
    longest = max(len(q) + len(r) for q, r in zip(batch[0], batch[1]))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for name, switches in (("padded", {}), ("padding-free", {"padding_free": True})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _trainer(settings, switches, longest, device)
            trainer.step(*batch)  # warm-up
            if cuda:
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as profile:
                start = time.perf_counter()
                trainer.step(*batch)
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
        events = profile.key_averages()
        attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
        total = sum(getattr(e, attribute) for e in events) / 1e3
        print(f"\n== {name}: step {wall * 1e3:.0f} ms wall; {'device' if cuda else 'cpu'} self time {total:.0f} ms")
        for event in sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:args.top]:
            print(f"  {getattr(event, attribute) / 1e3:9.1f} ms  x{event.count:<5} {event.key[:100]}")
        del trainer
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
