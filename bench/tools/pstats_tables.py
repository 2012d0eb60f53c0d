"""cProfile tables for bench/tools/trl_step_compare.py: a profile's top functions and own time per package, per step.

Imports nothing of fastppo's (the TRL interpreter runs it too).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _short_path(path: str) -> str:
    """torch/nn/modules/module.py, fastppo/trainer.py, stdlib/email/parser.py: relative to where each lives."""
    import sysconfig

    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    for prefix, label in ((str(ROOT), ""), (sysconfig.get_paths()["stdlib"], "stdlib/")):
        if path.startswith(prefix + os.sep):
            return label + path[len(prefix) + 1:]
    return path


def _function_name(key) -> str:
    path, line, name = key
    if path == "~" or not line:  # built-ins: ('~', 0, "<method 'item' of 'torch._C.TensorBase' objects>")
        return name
    return f"{_short_path(path)}:{line}({name})"


def _package(key) -> str:
    """'torch/nn' for torch/nn/modules/module.py, 'fastppo' for fastppo/trainer.py, one bucket for C functions."""
    if key[0] == "~" or not key[1]:
        return "(built-in and C functions)"
    parts = _short_path(key[0]).split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def print_profile(profile, steps: int, library: str, clock: str = "wall", top: int = 30, out=sys.stdout) -> None:
    """Top functions of the profiled steps by cumulative and by own time, in ms per step; own time per package."""
    import pstats

    stats = pstats.Stats(profile).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
    total = sum(tt for _, _, tt, _, _ in stats.values())
    print(f"\n### cProfile, {library}: {steps} steps, {1e3 * total / steps:.1f} ms per step of profiled {clock} time",
          file=out)
    for title, column in (("cumulative", 3), ("tottime", 2)):
        print(f"\ntop {top} by {title} (ms per step; calls per step)", file=out)
        print(f"{'cum ms':>9} {'own ms':>9} {'calls':>8}  function", file=out)
        rows = sorted(stats.items(), key=lambda item: item[1][column], reverse=True)[:top]
        for key, (_, calls, tt, ct, _) in rows:
            print(f"{1e3 * ct / steps:9.2f} {1e3 * tt / steps:9.2f} {calls / steps:8.1f}  {_function_name(key)}",
                  file=out)
    packages = {}
    for key, (_, _, tt, _, _) in stats.items():
        packages[_package(key)] = packages.get(_package(key), 0.0) + tt
    print("\nown time by package (ms per step)", file=out)
    for name, tt in sorted(packages.items(), key=lambda item: item[1], reverse=True)[:15]:
        print(f"{1e3 * tt / steps:9.2f}  {name}", file=out)
