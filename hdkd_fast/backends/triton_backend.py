r"""The ``"triton"`` backend: the fused kernels of ``hdkd_fast.kernels``.

One kernel launch per call computes every per-row objective (and the weighted gradient), see
:mod:`hdkd_fast.kernels.dense_kd_fwd` and :mod:`hdkd_fast.kernels.dense_kd_jvp`; this module folds the
reduction's row scales, the pair mask and the temperature into the weights before the launch and
reduces the per-row losses with torch afterwards (deterministic, no atomics, no host sync).

The launches are wrapped in ``torch.library`` custom ops (``hdkd_fast::triton_losses``,
``hdkd_fast::triton_jvp``) with fake implementations, so ``torch.compile(fullgraph=True)`` treats
them as opaque ops. Available for CUDA tensors when ``triton`` imports, and for CPU tensors only under
the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._pairs import PairMask, mask_tensor
from .._validation import accumulation_dtype
from .torch_backend import reduce_rows, row_scales

NAME = "triton"

_IMPORT_ERROR: str | None = None
try:
    from ..kernels import dense_kd_fwd, dense_kd_jvp
except ImportError as _err:  # triton missing (or broken): the backend is simply unavailable
    _IMPORT_ERROR = f"triton could not be imported ({_err})"


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` for CUDA tensors when triton imports; CPU tensors only under ``TRITON_INTERPRET=1``."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 before importing triton)"
    return f"the Triton kernels do not run on {device.type} tensors"


def _as_list(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _launch_input(tensors: list[Tensor]) -> Tensor | list[Tensor]:
    """The custom ops get a tensor list: one ``[K, B, C]`` tensor (stacked) or K ``[B, C]`` tensors."""
    return tensors[0] if tensors[0].dim() == 3 else tensors


def _geometry(tensors: Sequence[Tensor]) -> tuple[int, int, int]:
    if tensors[0].dim() == 3:
        k, b, c = tensors[0].shape
        return int(k), int(b), int(c)
    b, c = tensors[0].shape
    return len(tensors), int(b), int(c)


_LOSSES_SCHEMA = (
    "(Tensor[] logits, Tensor? target, Tensor? ce_weight, Tensor? kd_weight, Tensor mask, float temperature, "
    "bool detach_teacher, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)"
)
_JVP_SCHEMA = (
    "(Tensor[] logits, Tensor[] tangents, Tensor? target, Tensor mask, float temperature, bool detach_teacher, "
    "int ignore_index) -> (Tensor, Tensor)"
)


def _losses_impl(logits: list[Tensor], target: Tensor | None, ce_weight: Tensor | None, kd_weight: Tensor | None,
                 mask: Tensor, temperature: float, detach_teacher: bool, ignore_index: int,
                 compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    ce, kd, grad = dense_kd_fwd.dense_kd_forward(
        _launch_input(logits), target, ce_weight, kd_weight, mask, temperature=temperature,
        detach_teacher=detach_teacher, ignore_index=ignore_index, compute_grad=compute_grad,
    )
    return (ce if ce is not None else kd.new_empty(0), kd,
            grad if grad is not None else logits[0].new_empty(0))


def _losses_fake(logits: list[Tensor], target: Tensor | None, ce_weight: Tensor | None, kd_weight: Tensor | None,
                 mask: Tensor, temperature: float, detach_teacher: bool, ignore_index: int,
                 compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    k, b, c = _geometry(logits)
    x = logits[0]
    acc = accumulation_dtype(x.dtype)
    kd = x.new_empty((k, k, b), dtype=acc)
    ce = x.new_empty((k, b) if target is not None else (0,), dtype=acc)
    grad = x.new_empty((k, b, c) if compute_grad else (0,))
    return ce, kd, grad


def _jvp_impl(logits: list[Tensor], tangents: list[Tensor], target: Tensor | None, mask: Tensor,
              temperature: float, detach_teacher: bool, ignore_index: int) -> tuple[Tensor, Tensor]:
    dce, dkd = dense_kd_jvp.dense_kd_jvp(
        _launch_input(logits), _launch_input(tangents), target, mask, temperature=temperature,
        detach_teacher=detach_teacher, ignore_index=ignore_index,
    )
    return (dce if dce is not None else dkd.new_empty(0)), dkd


def _jvp_fake(logits: list[Tensor], tangents: list[Tensor], target: Tensor | None, mask: Tensor,
              temperature: float, detach_teacher: bool, ignore_index: int) -> tuple[Tensor, Tensor]:
    k, b, _ = _geometry(logits)
    x = logits[0]
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((k, b) if target is not None else (0,), dtype=acc), x.new_empty((k, k, b), dtype=acc)


_losses_op: Any = None
_jvp_op: Any = None
if _IMPORT_ERROR is None:
    _losses_op = torch.library.custom_op(
        "hdkd_fast::triton_losses", _losses_impl, mutates_args=(), schema=_LOSSES_SCHEMA
    )
    _losses_op.register_fake(_losses_fake)
    _jvp_op = torch.library.custom_op("hdkd_fast::triton_jvp", _jvp_impl, mutates_args=(), schema=_JVP_SCHEMA)
    _jvp_op.register_fake(_jvp_fake)


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
    """Same contract as :func:`hdkd_fast.backends.torch_backend.losses_and_grad`, in one kernel launch."""
    tensors = _as_list(logits)
    _, b, _ = _geometry(tensors)
    x = tensors[0]
    acc = accumulation_dtype(x.dtype)
    m = mask_tensor(mask, dtype=acc, device=x.device)
    r_ce, r_kd = row_scales(target, ignore_index, reduction, b, acc)
    ce_w = kd_w = None
    if compute_grad:
        if kd_weight is not None:
            w = kd_weight.to(acc)
            kd_w = w * (m if w.dim() == 2 else m.unsqueeze(-1)) * (temperature * r_kd)
        if ce_weight is not None and target is not None:
            ce_w = ce_weight.to(acc) * r_ce
    ce_rows, kd_rows, grad = _losses_op(
        tensors, target, ce_w, kd_w, m, float(temperature), bool(detach_teacher), int(ignore_index),
        bool(compute_grad),
    )
    ce = reduce_rows(ce_rows, r_ce, reduction) if target is not None else None
    return ce, reduce_rows(kd_rows, r_kd, reduction), (grad if compute_grad else None)


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
    """Same contract as :func:`hdkd_fast.backends.torch_backend.jvp`, in one kernel launch."""
    tensors = _as_list(logits)
    _, b, _ = _geometry(tensors)
    x = tensors[0]
    acc = accumulation_dtype(x.dtype)
    m = mask_tensor(mask, dtype=acc, device=x.device)
    r_ce, r_kd = row_scales(target, ignore_index, reduction, b, acc)
    dce_rows, dkd_rows = _jvp_op(
        tensors, _as_list(tangents), target, m, float(temperature), bool(detach_teacher), int(ignore_index)
    )
    dce = reduce_rows(dce_rows, r_ce, reduction) if target is not None else None
    return dce, reduce_rows(dkd_rows, r_kd, reduction)
