"""Count the places where code reads tensor values back to the host (each one waits for the device on a GPU).

    with HostReads() as reads:
        trainer.step(queries, responses, scores)
    print(reads.total, reads.by_site())

A `TorchFunctionMode` sees every torch call, so it works on CPU, where no read ever waits and
`torch.cuda.set_sync_debug_mode` has nothing to say. Counted: the Tensor methods that turn a value
into a Python object (`item`, `tolist`, `__bool__`, `__float__`, `__int__`, `__index__`, `numpy`,
`__repr__`/`__format__`), copies to the CPU (`cpu`, `to("cpu")`), and ops whose output shape depends on
the values (`nonzero`, `masked_select`, `unique`, boolean-mask indexing, `repeat_interleave` without
`output_size`), inside transformers and torch as well as in fastppo. On a CPU tensor these do not wait
for anything, but on a GPU each is a synchronisation: the count is what a GPU step would pay. Reading the
result of a counted copy to the CPU (`.cpu().numpy()`) counts once, as on a GPU.
"""

from __future__ import annotations

import collections
import os
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

_TO_PYTHON = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
              torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__contains__}
_DATA_DEPENDENT = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
                   torch.unique, torch.Tensor.unique, torch.argwhere, torch.Tensor.argwhere,
                   torch.unique_consecutive, torch.Tensor.unique_consecutive}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.to, torch.Tensor.copy_}
_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _reads_values(func, args, kwargs) -> bool:
    if func in _TO_PYTHON or func in _DATA_DEPENDENT:
        return True
    if func is torch.Tensor.to or func is torch.Tensor.copy_:
        if func is torch.Tensor.copy_:  # a device tensor copied into a CPU one
            return len(args) > 1 and isinstance(args[1], torch.Tensor) and args[0].device.type == "cpu"
        device = kwargs.get("device")
        for arg in args[1:]:
            if isinstance(arg, (str, torch.device)):
                device = arg
        return _is_cpu(device) and not args[0].is_cpu
    if func is torch.Tensor.__getitem__:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        return kwargs.get("output_size") is None and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                                torch.Tensor)
    return False


def _call_site() -> str:
    """The innermost frame outside torch and this module, as `file:line (function)`."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH_DIR):
            return f"{_short(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "<torch>"


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, os.sep + "fastppo" + os.sep, os.sep + "tests" + os.sep):
        if marker in path:
            head, _, tail = path.rpartition(marker)
            return (marker.strip(os.sep) + "/" if marker != "site-packages" + os.sep else "") + tail
    return path


class HostReads(TorchFunctionMode):
    """A TorchFunctionMode that counts host reads by call site (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self._host_copies = {}  # id → weakref of the results of counted copies to the CPU: reading them is free

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode is off while this runs, so a read inside a read (repr → item) is not seen again
        kwargs = kwargs or {}
        reads = _reads_values(func, args, kwargs) and not (args and self._is_host_copy(args[0]))
        if reads:
            self.sites[_call_site()] += 1
        result = func(*args, **kwargs)
        if reads and func in _TO_HOST and isinstance(result, torch.Tensor):
            self._host_copies[id(result)] = weakref.ref(result)
        return result

    def _is_host_copy(self, value) -> bool:
        ref = self._host_copies.get(id(value)) if isinstance(value, torch.Tensor) else None
        return ref is not None and ref() is value

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def by_site(self) -> list[tuple[str, int]]:
        """(call site, reads) pairs, most reads first."""
        return self.sites.most_common()

    def report(self) -> str:
        lines = [f"{self.total} host reads"] + [f"  {n:4d}  {site}" for site, n in self.by_site()]
        return "\n".join(lines)
