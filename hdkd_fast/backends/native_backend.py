r"""The ``"native"`` backend: the fused C++ (CPU) and CUDA kernels of the compiled extension
``hdkd_fast._C`` (``csrc/``), registered as the PyTorch ops ``torch.ops.hdkd_fast.losses_and_grad``
and ``torch.ops.hdkd_fast.jvp`` (dispatching on the tensors' device).

Same ops, signatures and math as :mod:`hdkd_fast.backends.torch_backend`. The logits are read in
place: a stacked ``Tensor[K, B, C]`` is handed over as K views and a sequence of K ``Tensor[B, C]``
as is (no stacking copy); only the last dimension must be contiguous. Per row, the kernels take the
softmax of every exit once (one ``exp`` per logit for an integer temperature, which also yields the
T = 1 softmax of the cross-entropy) together with the dot products of every selected pair's KL, then
write each exit's gradient once (on CPU: in L1-sized column blocks, see
``csrc/cpu/dense_kd_cpu_kernel.cpp``). Per-row losses are reduced in a fixed order, so results do not
depend on the number of threads. On CPU, the ``[K, B, C]`` gradient buffers come from a two-slot pool
(a buffer returns to it only once its tensor and every view are gone), which spares a training loop
the page faults of a fresh multi-megabyte buffer per step. The ops are not differentiable themselves:
:mod:`hdkd_fast._autograd` calls them under ``no_grad`` and handles double backward with the
``"torch"`` backend.

Where the extension comes from (installed ahead of time, or compiled on first use into a cache) is
:mod:`hdkd_fast._ext_loader`'s job; ``hdkd-fast info`` tells which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .. import _ext_loader
from .._pairs import PairMask

NAME = "native"

# Only an ahead-of-time build is imported here (import time stays cheap and touches no GPU); a cached
# or new build on first use is loaded by the first eager unavailable_reason() call. Under torch.compile
# tracing the state at hand is used: tracing cannot run a compiler.
_EXT: _ext_loader.Extension = _ext_loader.extension(build=False, search_cache=False)


def _extension() -> ModuleType | None:
    """The loaded ``hdkd_fast._C``, loading (or building) it on the first eager call."""
    global _EXT
    if not _EXT.final and not torch.compiler.is_compiling():
        _EXT = _ext_loader.extension(build=True)
        if _EXT.module is not None:
            _register_fakes()
    return _EXT.module


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when the extension is loaded (built on first use if need be) and has kernels for
    ``device``'s type."""
    module = _extension()
    if module is None:
        return _EXT.detail
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if bool(getattr(module, "with_cuda", False)):
            return None
        return "hdkd_fast._C was built without CUDA kernels (rebuild with a GPU visible or FORCE_CUDA=1)"
    return f"hdkd_fast._C has no kernels for {device.type} tensors"


def build_info(build: bool = False) -> dict[str, Any]:
    """How this installation's extension was built and what it holds (for ``hdkd-fast info``);
    ``build=True`` builds it first when it has not been."""
    state = _ext_loader.extension(build=build)
    info: dict[str, Any] = {
        "built": state.module is not None, "pending": not state.final, "origin": state.origin, "detail": state.detail,
    }
    module = state.module
    if module is None:
        return info
    info.update({
        "path": getattr(module, "__file__", None),
        "torch_version": getattr(module, "torch_version", None),
        "cpu_capability": module.cpu_capability(),
        "requested_cpu_capability": module.requested_cpu_capability(),
        "supported_cpu_capability": module.supported_cpu_capability(),
        "compiled_cpu_capabilities": list(module.compiled_cpu_capabilities()),
        "with_cuda": bool(module.with_cuda),
    })
    if module.with_cuda:
        info["cuda_archs"] = str(module.cuda_archs)
        info["cuda_info"] = str(module.cuda_info())
    return info


_PAIRS: dict[PairMask, list[int]] = {}


def _pairs(mask: PairMask) -> list[int]:
    """The selected pairs as a flat ``[i0, j0, i1, j1, ...]`` list (cached per mask)."""
    flat = _PAIRS.get(mask) if not torch.compiler.is_compiling() else None
    if flat is None:
        flat = [v for i, row in enumerate(mask) for j, sel in enumerate(row) if sel for v in (i, j)]
        if not torch.compiler.is_compiling():
            _PAIRS[mask] = flat
    return list(flat)


def _exits(logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """K ``Tensor[B, C]`` views, without copying a stacked tensor."""
    return list(logits.unbind(0)) if isinstance(logits, Tensor) else list(logits)


def losses_and_grad(
    logits: Tensor | Sequence[Tensor],
    target: Tensor | None,
    ce_weight: Tensor | None,
    kd_weight: Tensor | None,
    *,
    temperature: float,
    mask: PairMask,
    detach_teacher: bool,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """See :func:`hdkd_fast.backends.torch_backend.losses_and_grad` (same contract)."""
    with torch.no_grad():
        ce, kd, grad = torch.ops.hdkd_fast.losses_and_grad(
            _exits(logits), target, ce_weight, kd_weight, _pairs(mask), float(temperature),
            bool(detach_teacher), int(ignore_index), reduction, bool(compute_grad),
        )
    return (ce if target is not None else None), kd, (grad if compute_grad else None)


def jvp(
    logits: Tensor | Sequence[Tensor],
    tangents: Tensor | Sequence[Tensor],
    target: Tensor | None,
    *,
    temperature: float,
    mask: PairMask,
    detach_teacher: bool,
    ignore_index: int,
    reduction: str,
) -> tuple[Tensor | None, Tensor]:
    """See :func:`hdkd_fast.backends.torch_backend.jvp` (same contract)."""
    with torch.no_grad():
        dce, dkd = torch.ops.hdkd_fast.jvp(
            _exits(logits), _exits(tangents), target, _pairs(mask), float(temperature),
            bool(detach_teacher), int(ignore_index), reduction,
        )
    return (dce if target is not None else None), dkd


def _register_fakes() -> None:
    """Shape functions of the ops, so torch.compile / FakeTensor tracing can see through them."""

    def acc_dtype(x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def losses_fake(logits: list[Tensor], target: Tensor | None, ce_weight: Tensor | None,
                    kd_weight: Tensor | None, pairs: list[int], temperature: float, detach_teacher: bool,
                    ignore_index: int, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        x = logits[0]
        k, (b, c) = len(logits), x.shape
        rows = (b,) if reduction == "none" else ()
        acc = acc_dtype(x)
        ce = x.new_empty((k, *rows) if target is not None else (0,), dtype=acc)
        kd = x.new_empty((k, k, *rows), dtype=acc)
        grad = x.new_empty((k, b, c) if compute_grad else (0,))
        return ce, kd, grad

    def jvp_fake(logits: list[Tensor], tangents: list[Tensor], target: Tensor | None, pairs: list[int],
                 temperature: float, detach_teacher: bool, ignore_index: int,
                 reduction: str) -> tuple[Tensor, Tensor]:
        x = logits[0]
        k, b = len(logits), x.shape[0]
        rows = (b,) if reduction == "none" else ()
        acc = acc_dtype(x)
        dce = x.new_empty((k, *rows) if target is not None else (0,), dtype=acc)
        return dce, x.new_empty((k, k, *rows), dtype=acc)

    for name, fn in (("hdkd_fast::losses_and_grad", losses_fake), ("hdkd_fast::jvp", jvp_fake)):
        with contextlib.suppress(RuntimeError):  # already registered (module reloaded)
            torch.library.register_fake(name)(fn)


if _EXT.module is not None:
    _register_fakes()
