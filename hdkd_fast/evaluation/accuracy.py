"""The two measurements early-exit papers report: per-exit ("anytime") accuracy and budgeted accuracy.

Budgeted accuracy is the dynamic evaluation of MSDNet (Huang et al., ICLR 2018, §5 "budgeted batch
classification"; ``adaptive_inference.py`` of the authors' code). For a geometric exit distribution
``p_k ∝ q^k`` (k = 1 … K, normalized), thresholds are fit on the validation outputs so that a fraction
``p_k`` of the validation samples leaves at exit k: going through the exits in order, ``τ_k`` is the
confidence of the ``⌊N·p_k⌋``-th most confident validation sample that has not left yet (``τ_k = +∞``,
nobody leaves, when that count is 0 or more than the samples left), and a sample leaves at its first
exit with ``confidence ≥ τ_k``; the last exit takes everyone left. The thresholds are then applied to
the test outputs, giving one point (average cost, accuracy) per q:

    cost(q) = mean_i c_{k(i)},    accuracy(q) = mean_i [argmax z_{k(i)}(x_i) = y_i]

with ``k(i)`` the exit sample i takes and ``c_k`` the cumulative cost of reaching exit k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..inference import Criterion, check_criterion, confidence, signed_threshold
from ._inputs import LogitsArg, exit_logits, labels, per_exit_values


class AnytimeAccuracy(NamedTuple):
    """Per-exit accuracy, fractions in [0, 1]."""

    top1: Tensor  # [K] float64
    top5: Tensor  # [K] float64 (top-C when there are fewer than 5 classes)


class BudgetCurve(NamedTuple):
    """Budgeted-accuracy points, one per value of q (see :func:`budgeted_accuracy`)."""

    cost: Tensor  # [P] average cost per test sample
    accuracy: Tensor  # [P] test top-1 accuracy
    val_accuracy: Tensor  # [P] validation top-1 accuracy with the same thresholds
    thresholds: Tensor  # [P, K] fitted τ_k in the criterion's units; usable as EarlyExit(thresholds=...)
    exit_fraction: Tensor  # [P, K] fraction of the test samples that leave at each exit
    q: Tensor  # [P] the geometric ratios


def anytime_accuracy(logits: LogitsArg, y: Tensor) -> AnytimeAccuracy:
    """Top-1 and top-5 accuracy of every exit: ``acc_k = mean_i [y_i ∈ top-n(z_k(x_i))]``, n = 1, 5.

    Args:
        logits: ``Tensor[K, N, C]`` or a list of K ``Tensor[N, C]``.
        y: labels ``[N]`` in ``[0, C)``.
    """
    exits = exit_logits(logits, "logits")
    y = labels(y, "y", exits)
    n = min(5, exits[0].shape[1])
    top1 = torch.stack([(z.argmax(dim=1) == y).double().mean() for z in exits])
    top5 = torch.stack([(z.topk(n, dim=1).indices == y[:, None]).any(dim=1).double().mean() for z in exits])
    return AnytimeAccuracy(top1.cpu(), top5.cpu())


def budgeted_accuracy(
    val_logits: LogitsArg,
    val_y: Tensor,
    test_logits: LogitsArg,
    test_y: Tensor,
    costs: Sequence[float] | Tensor,
    criterion: Criterion = "maxprob",
    *,
    q: Sequence[float] | Tensor | None = None,
) -> BudgetCurve:
    """MSDNet's dynamic evaluation: (average cost, test accuracy) for a sweep of exit distributions.

    See the module docstring for the protocol. Vectorized over samples and over the sweep: the only
    Python loop is over the K exits.

    Args:
        val_logits, val_y: outputs and labels of the held-out split the thresholds are fit on.
        test_logits, test_y: outputs and labels they are applied to. Logits are ``Tensor[K, N, C]`` or a
            list of K ``Tensor[N, C]`` (the two splits may differ in N).
        costs: K cumulative costs ``c_k`` of reaching exit k, e.g. :func:`exit_costs`.
        criterion: ``"maxprob"`` (the paper) or ``"entropy"`` (see :mod:`hdkd_fast.inference`).
        q: the geometric ratios; default ``0.05, 0.10, …, 2.00`` (the official ``p / 20``, p = 1 … 40).

    Returns:
        a :class:`BudgetCurve`; its points are in the order of ``q`` (cost grows with q).
    """
    val = exit_logits(val_logits, "val_logits")
    test = exit_logits(test_logits, "test_logits")
    num_exits, num_classes = len(val), val[0].shape[1]
    if len(test) != num_exits or test[0].shape[1] != num_classes:
        raise ValueError(
            f"test_logits has K = {len(test)} exits and C = {test[0].shape[1]} classes but val_logits has "
            f"K = {num_exits}, C = {num_classes}"
        )
    if test[0].device != val[0].device:
        raise ValueError(f"test_logits is on {test[0].device} but val_logits is on {val[0].device}")
    val_y = labels(val_y, "val_y", val)
    test_y = labels(test_y, "test_y", test)
    device = val[0].device
    cost = per_exit_values(costs, "costs", num_exits).to(device)
    criterion = check_criterion(criterion)
    ratios = _check_q(q).to(device)

    val_score = torch.stack([confidence(z, criterion) for z in val])  # [K, N_val]
    bounds = _fit_bounds(val_score, geometric_exit_distribution(ratios, num_exits))  # [P, K]
    test_exit = _exit_index(torch.stack([confidence(z, criterion) for z in test]), bounds)  # [P, N_test]
    val_exit = _exit_index(val_score, bounds)

    test_correct = torch.stack([z.argmax(dim=1) == test_y for z in test])  # [K, N_test]
    val_correct = torch.stack([z.argmax(dim=1) == val_y for z in val])
    counts = torch.zeros(len(ratios), num_exits, dtype=torch.float64, device=device)
    fraction = counts.scatter_add_(1, test_exit, torch.ones_like(test_exit, dtype=torch.float64)) / len(test_y)
    return BudgetCurve(
        cost=cost[test_exit].mean(dim=1).cpu(),
        accuracy=test_correct.gather(0, test_exit).double().mean(dim=1).cpu(),
        val_accuracy=val_correct.gather(0, val_exit).double().mean(dim=1).cpu(),
        thresholds=signed_threshold(bounds.double(), criterion).cpu(),
        exit_fraction=fraction.cpu(),
        q=ratios.cpu(),
    )


def geometric_exit_distribution(q: Tensor, num_exits: int) -> Tensor:
    """``p[j, k] = q_j^{k+1} / Σ_{m=1}^{K} q_j^m`` for k = 0 … K−1: Tensor ``[len(q), K]``, float64."""
    log_w = torch.arange(1, num_exits + 1, dtype=torch.float64, device=q.device) * q.double().log()[:, None]
    return torch.softmax(log_w, dim=1)


def _fit_bounds(score: Tensor, fraction: Tensor) -> Tensor:
    """Confidence bounds ``[P, K]`` (score ≥ bound exits) that send ``⌊N·p_k⌋`` samples to exit k < K−1.

    ``score`` is ``[K, N]`` (larger = more confident), ``fraction`` the exit distributions ``[P, K]``.
    """
    (num_exits, n), p = score.shape, fraction.shape[0]
    quota = torch.floor(n * fraction).long()  # [P, K]
    bounds = torch.full((p, num_exits), math.inf, dtype=score.dtype, device=score.device)
    bounds[:, -1] = -math.inf
    left = torch.zeros(p, n, dtype=torch.bool, device=score.device)  # samples that have already exited
    for k in range(num_exits - 1):
        ranked = score[k].expand(p, n).masked_fill(left, -math.inf).sort(dim=1, descending=True).values
        count = quota[:, k]
        fits = (count >= 1) & (count <= n - left.sum(dim=1))
        picked = ranked.gather(1, (count - 1).clamp(0, n - 1)[:, None]).squeeze(1)
        bounds[:, k] = torch.where(fits, picked, bounds[:, k])
        left |= score[k][None, :] >= bounds[:, k, None]
    return bounds


def _exit_index(score: Tensor, bounds: Tensor) -> Tensor:
    """``[P, N]``: the first exit k with ``score[k, i] ≥ bounds[p, k]`` (the last bound is −∞)."""
    passes = (score[None, :, :] >= bounds[:, :, None]).to(torch.uint8)  # [P, K, N]
    return passes.argmax(dim=1)  # argmax returns the first maximum


def _check_q(q: Sequence[float] | Tensor | None) -> Tensor:
    if q is None:
        return torch.arange(1, 41, dtype=torch.float64) / 20
    if isinstance(q, Tensor):
        values = q.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(q, Sequence) and not isinstance(q, (str, bytes)):
        values = torch.tensor([float(v) for v in q], dtype=torch.float64)
    else:
        raise TypeError(f"q must be a sequence of positive numbers or a tensor; got {type(q).__name__}")
    if values.numel() < 1 or not bool((torch.isfinite(values) & (values > 0)).all()):
        raise ValueError(f"q must hold at least one finite, positive ratio; got {values.tolist()}")
    return values
