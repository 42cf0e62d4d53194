"""The functional loss API: :func:`dense_kd_losses` (every objective) and :func:`dense_kd` (their
weighted sum). See docs/math.md for the math; both are differentiable in reverse and forward mode."""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import OpSpec, function_class
from ._pairs import PairSpec, pair_mask
from ._types import KDLosses
from ._validation import (
    Logits,
    LogitsInfo,
    accumulation_dtype,
    check_ignore_index,
    check_logits,
    check_reduction,
    check_target,
    check_temperature,
    check_weight,
)
from .backends import resolve_backend


def op_spec(info: LogitsInfo, *, temperature: float, pairs: PairSpec, detach_teacher: bool, ignore_index: int,
            reduction: str, backend: str, compute_grad: bool) -> OpSpec:
    """The checked, resolved settings of one call of the fused op (also built by :mod:`hdkd_fast.fused_linear`)."""
    return OpSpec(
        backend=resolve_backend(backend, info.device),
        temperature=check_temperature(temperature),
        mask=pair_mask(pairs, info.num_exits, detach_teacher=bool(detach_teacher)),
        detach_teacher=bool(detach_teacher),
        ignore_index=check_ignore_index(ignore_index),
        reduction=check_reduction(reduction),
        stacked=info.stacked,
        compute_grad=compute_grad,
    )


def weight_tensors(ce_weight: float | Tensor, kd_weight: float | Tensor, info: LogitsInfo, dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor]:
    """The checked objective weights as ``Tensor[K]`` and ``Tensor[K, K]`` (numbers become ``dtype`` tensors)."""
    k = info.num_exits
    ce_w = check_weight(ce_weight, "ce_weight", (k,), info)
    kd_w = check_weight(kd_weight, "kd_weight", (k, k), info)
    ce_t = ce_w if isinstance(ce_w, Tensor) else torch.full((k,), ce_w, dtype=dtype, device=info.device)
    kd_t = kd_w if isinstance(kd_w, Tensor) else torch.full((k, k), kd_w, dtype=dtype, device=info.device)
    return ce_t, kd_t


def dense_kd_losses(
    logits: Logits,
    target: Tensor | None = None,
    *,
    temperature: float = 4.0,
    pairs: PairSpec = "dense",
    detach_teacher: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> KDLosses:
    r"""Every exit's cross-entropy and every selected pair's distillation loss.

    With :math:`p_k = \mathrm{softmax}(z_k / T)`:

    - ``ce[k]`` = mean over non-ignored rows of :math:`\mathrm{CE}(z_k[b], y_b)` (temperature 1;
      0 when every row is ignored);
    - ``kd[i, j]`` = :math:`T^2 \cdot \mathrm{mean}_b \sum_c p_j (\log p_j - \log p_i)`, i.e.
      :math:`T^2 \cdot` batchmean :math:`\mathrm{KL}(p_j \| p_i)`, for every selected pair and 0 elsewhere.

    Masked classes: a logit may be ``-inf`` (e.g. a masked vocabulary entry), with
    :math:`0 \cdot \log 0 = 0` in every backend; which losses are then ``+inf`` or NaN and why every
    gradient stays finite: docs/math.md, "Masked classes and extreme values".

    Args:
        logits: ``Tensor[K, B, C]`` or a sequence of K ``Tensor[B, C]`` (float16/bfloat16/float32
            accumulate in float32; float64 stays float64). A sequence is not copied into a stack
            by backends that read it in place.
        target: integer labels ``Tensor[B]`` (any integer dtype), or ``None`` for distillation only
            (``ce`` is ``None``).
        temperature: the distillation temperature T, in ``[1e-3, 1e3]`` (``TEMPERATURE_RANGE`` in
            ``hdkd_fast._validation``: float32 cannot carry the KD losses beyond).
        pairs: ``"dense"`` (all i < j), ``"last"`` (j = K-1), ``"adjacent"`` (j = i+1) or a boolean
            ``Tensor[K, K]`` mask (``mask[i, j]``: exit i learns from exit j).
        detach_teacher: no gradient flows into the teacher side of a pair.
        ignore_index: label value whose rows are left out of the cross-entropy.
        reduction: ``"mean"`` (above), ``"sum"`` (sums over rows) or ``"none"`` (``ce [K, B]``,
            ``kd [K, K, B]``).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (see :func:`available_backends`).

    Returns:
        :class:`KDLosses` ``(ce, kd)`` in the accumulation dtype.
    """
    info = check_logits(logits)
    target = check_target(target, info)
    spec = op_spec(info, temperature=temperature, pairs=pairs, detach_teacher=detach_teacher,
                   ignore_index=ignore_index, reduction=reduction, backend=backend, compute_grad=False)
    ce, kd, _, _ = function_class().apply(spec, target, None, None, *info.tensors)
    return KDLosses(ce if target is not None else None, kd)


def dense_kd(
    logits: Logits,
    target: Tensor | None = None,
    *,
    ce_weight: float | Tensor = 1.0,
    kd_weight: float | Tensor = 1.0,
    temperature: float = 4.0,
    pairs: PairSpec = "dense",
    detach_teacher: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    r"""The weighted objective :math:`L = \sum_k \alpha_k\,\mathrm{ce}[k] + \sum_{ij} \gamma_{ij}\,\mathrm{kd}[i, j]`.

    ``ce_weight`` (α) is a number or a ``Tensor[K]``; ``kd_weight`` (γ) a number or a ``Tensor[K, K]``
    (entries outside the selected pairs have no effect). Other arguments as :func:`dense_kd_losses`
    with ``reduction="mean"``. The forward computes the logits gradient together with the losses when
    the logits require grad, so backward only scales it. Differentiable w.r.t. the weights too:
    :math:`\partial L / \partial \alpha_k = \mathrm{ce}[k]` and
    :math:`\partial L / \partial \gamma_{ij} = \mathrm{kd}[i, j]`.
    """
    info = check_logits(logits)
    target = check_target(target, info)
    ce_t, kd_t = weight_tensors(ce_weight, kd_weight, info, accumulation_dtype(info.dtype))
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in info.tensors)
    spec = op_spec(info, temperature=temperature, pairs=pairs, detach_teacher=detach_teacher,
                   ignore_index=ignore_index, reduction="mean", backend=backend, compute_grad=compute_grad)
    _, _, loss, _ = function_class().apply(spec, target, ce_t, kd_t, *info.tensors)
    return loss
