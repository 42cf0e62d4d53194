"""Peak memory of one step, shared by the bench files (``import peak_memory``: pytest puts ``bench/`` on
``sys.path``, and so does running a bench file as a script).

On the CPU, tracemalloc does not see torch's allocations, so a benchmark runs its own file as a script in a
fresh process (:func:`peak_in_subprocess`), which builds its inputs and calls :func:`peak_rss` on one step:
the step's peak resident set above the resident set before it, as the kernel counts it (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``), allocator caching included. On CUDA, :func:`cuda_peak`:
``torch.cuda.max_memory_allocated`` above what was allocated before the step.

:func:`live_tensor_peak` is the explanation rather than the measurement: the tensors alive at the peak of
the bytes held by tensors the step created, and the ops that made them.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def available_bytes(device: torch.device) -> int:
    """The GPU's memory on CUDA, ``MemAvailable`` of ``/proc/meminfo`` elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def peak_rss(step: Callable[[], object]) -> dict[str, int]:
    """Run ``step()`` once in this process with the kernel's peak-RSS counter reset: ``rss_before_bytes``
    (what was resident before: the interpreter, torch, the step's inputs) and ``peak_extra_bytes`` (the peak
    above it)."""
    gc.collect()
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    return {"rss_before_bytes": before * 1024, "peak_extra_bytes": (status_kib("VmHWM") - before) * 1024}


def cuda_peak(step: Callable[[], object]) -> int:
    """Bytes ``step()`` allocated on the current CUDA device at its peak, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def peak_in_subprocess(script: str | Path, args: Sequence[str]) -> dict[str, Any]:
    """``python script *args`` in a fresh process with the repository root on ``PYTHONPATH``; the JSON object
    on the last line of its output (the script prints :func:`peak_rss`'s result there)."""
    cmd = [sys.executable, str(script), *args]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class _LiveTensors(TorchDispatchMode):
    """Follows the storages of the tensors that ops return (and the tensors they read, for those made
    outside the dispatcher), each labelled with the op that first returned it."""

    def __init__(self) -> None:
        super().__init__()
        self.ignored: set[int] = set()
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.current = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []
        self.peak_op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._add(t, f"{func.overloadpacket.__name__} {list(t.shape)}" if isinstance(t, torch.Tensor) else "")
        for t in tree_leaves((args, kwargs)):
            self._add(t, f"(read by {func.overloadpacket.__name__}) {list(t.shape)}" if isinstance(t, torch.Tensor)
                      else "")
        for key in [key for key, (ref, _, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, func.overloadpacket.__name__
            self.at_peak = [(size, label) for _, size, label in self.live.values()]
        return out

    def _add(self, t: object, label: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.ignored or storage.nbytes() == 0:
            return
        if key in self.live:
            if not self.live[key][0].expired():
                return
            self.current -= self.live.pop(key)[1]  # a freed address handed out again
        self.live[key] = (StorageWeakRef(storage), storage.nbytes(), label)
        self.current += storage.nbytes()


def live_tensor_peak(step: Callable[[], object], ignore: Sequence[torch.Tensor] = (), top: int = 12
                     ) -> dict[str, Any]:
    """Run ``step()`` under a dispatch mode that follows the storages of the tensors the step creates
    (``ignore``: tensors that existed before it, e.g. the parameters and inputs). Returns ``peak_bytes``
    (the most bytes those storages held at once), ``peak_op`` (the op after which it was reached) and
    ``at_peak``: the ``top`` largest groups of tensors alive then, as ``[bytes, count, "op [shape]"]``.
    Temporaries that a kernel allocates outside the dispatcher are not seen; the peak RSS of
    :func:`peak_rss` is the measurement."""
    mode = _LiveTensors()
    mode.ignored.update(t.untyped_storage().data_ptr() for t in ignore)
    with mode:
        step()
    groups: dict[str, list[int]] = {}
    for size, label in mode.at_peak:
        group = groups.setdefault(label, [0, 0])
        group[0] += size
        group[1] += 1
    ranked = sorted(([size, count, label] for label, (size, count) in groups.items()), key=lambda g: -g[0])
    return {"peak_bytes": mode.peak, "peak_op": mode.peak_op, "at_peak": ranked[:top]}
