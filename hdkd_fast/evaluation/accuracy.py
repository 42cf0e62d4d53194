"""The two measurements early-exit papers report: per-exit ("anytime") accuracy and budgeted accuracy.

Budgeted accuracy is the dynamic evaluation of MSDNet (Huang et al., ICLR 2018, §5 "budgeted batch
classification"; ``adaptive_inference.py`` of the authors' code). For a geometric exit distribution
``p_k ∝ q^k`` (k = 1 … K, normalized), thresholds are fit on the validation outputs so that a fraction
``p_k`` of the validation samples leaves at exit k: going through the exits in order, ``τ_k`` is the
confidence of the ``⌊N·p_k⌋``-th most confident validation sample that has not left yet (``τ_k = +∞``,
nobody leaves, when that count is 0 or more than the samples left), and a sample leaves at its first
exit with ``confidence ≥ τ_k``; the last exit takes everyone left. ``⌊N·p_k⌋`` is computed exactly, in
rational arithmetic with q read as the decimal it prints as (0.4 = 2/5): a floating-point ``p_k`` can
land just below an integer ``N·p_k`` (K = 4, N = 203, q = 0.4: 124.99999999999999) and lose a sample.
The thresholds are then applied to the test outputs, giving one point (average cost, accuracy) per q:

    cost(q) = mean_i c_{k(i)},    accuracy(q) = mean_i [argmax z_{k(i)}(x_i) = y_i]

with ``k(i)`` the exit sample i takes and ``c_k`` the cumulative cost of reaching exit k.

The published sweeps (:data:`BUDGET_PROTOCOLS`) are q = p/20 for p = 1 … 40 (``"imta"``: the loop of
IMTA's ``adaptive_inference.py``, Li et al., ICCV 2019; the default) and p = 1 … 39 (``"msdnet"``: the
loop of MSDNet's own ``adaptive_inference.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from .._validation import Logits, check_logits
from ..inference import Criterion, check_criterion, confidence, signed_threshold
from ._inputs import labels, per_exit_values

BUDGET_PROTOCOLS: dict[str, int] = {"imta": 40, "msdnet": 39}
"""The published q sweeps of the budgeted evaluation, by name: q = p/20 for p = 1 … the value. ``"imta"``
(IMTA's loop, up to q = 2.0) is the default; ``"msdnet"`` is MSDNet's own loop (up to q = 1.95)."""
DEFAULT_BUDGET_PROTOCOL = "imta"
Q_STEP = Fraction(1, 20)
"""Both protocols step q by 1/20."""


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


def anytime_accuracy(logits: Logits, y: Tensor) -> AnytimeAccuracy:
    """Top-1 and top-5 accuracy of every exit: ``acc_k = mean_i [y_i ∈ top-n(z_k(x_i))]``, n = 1, 5.

    Args:
        logits: ``Tensor[K, N, C]`` or a list of K ``Tensor[N, C]``.
        y: labels ``[N]`` in ``[0, C)``.
    """
    exits = check_logits(logits, "logits", finite=True).exits()
    y = labels(y, "y", exits)
    n = min(5, exits[0].shape[1])
    top1 = torch.stack([(z.argmax(dim=1) == y).double().mean() for z in exits])
    top5 = torch.stack([(z.topk(n, dim=1).indices == y[:, None]).any(dim=1).double().mean() for z in exits])
    return AnytimeAccuracy(top1.cpu(), top5.cpu())


def budgeted_accuracy(
    val_logits: Logits,
    val_y: Tensor,
    test_logits: Logits,
    test_y: Tensor,
    costs: Sequence[float] | Tensor,
    criterion: Criterion = "maxprob",
    *,
    q: Sequence[float] | Tensor | str | None = None,
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
        q: the geometric ratios, or the name of a published sweep (:data:`BUDGET_PROTOCOLS`): ``"imta"``
            (the default, ``0.05, 0.10, …, 2.00``) or ``"msdnet"`` (``0.05, …, 1.95``).

    Returns:
        a :class:`BudgetCurve`; its points are in the order of ``q`` (cost grows with q).
    """
    val = check_logits(val_logits, "val_logits", finite=True).exits()
    test = check_logits(test_logits, "test_logits", finite=True).exits()
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
    exact = _check_q(q)
    ratios = torch.tensor([float(r) for r in exact], dtype=torch.float64, device=device)

    val_score = torch.stack([confidence(z, criterion) for z in val])  # [K, N_val]
    quota = exit_quotas(exact, num_exits, val_score.shape[1]).to(device)
    bounds = _fit_bounds(val_score, quota)  # [P, K]
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


def budget_q_grid(protocol: str = DEFAULT_BUDGET_PROTOCOL) -> Tensor:
    """The q values of a published sweep (:data:`BUDGET_PROTOCOLS`), float64."""
    return torch.tensor([float(r) for r in _protocol_ratios(protocol)], dtype=torch.float64)


def _protocol_ratios(protocol: str) -> list[Fraction]:
    if protocol not in BUDGET_PROTOCOLS:
        raise ValueError(f"budget protocol must be one of {tuple(BUDGET_PROTOCOLS)}; got {protocol!r}")
    return [p * Q_STEP for p in range(1, BUDGET_PROTOCOLS[protocol] + 1)]


def exit_quotas(q: Sequence[Fraction], num_exits: int, n: int) -> Tensor:
    """``⌊n·p_k⌋`` for ``p_k = q^{k+1} / Σ_{m=1}^{K} q^m``, k = 0 … K−1, exactly: int64 ``[len(q), K]``."""
    rows = []
    for ratio in q:
        powers = [ratio**m for m in range(1, num_exits + 1)]
        total = sum(powers)
        rows.append([math.floor(n * power / total) for power in powers])
    return torch.tensor(rows, dtype=torch.long)


def _fit_bounds(score: Tensor, quota: Tensor) -> Tensor:
    """Confidence bounds ``[P, K]`` (score ≥ bound exits) that send ``quota[:, k]`` samples to exit k < K−1.

    ``score`` is ``[K, N]`` (larger = more confident), ``quota`` the sample counts ``[P, K]`` (int64).
    """
    (num_exits, n), p = score.shape, quota.shape[0]
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


def _check_q(q: Sequence[float] | Tensor | str | None) -> list[Fraction]:
    """The ratios as exact fractions: a protocol's ``p/20``, or each number read as the decimal it prints as."""
    if q is None:
        return _protocol_ratios(DEFAULT_BUDGET_PROTOCOL)
    if isinstance(q, str):
        if q not in BUDGET_PROTOCOLS:
            raise ValueError(f"q must be positive ratios or one of {tuple(BUDGET_PROTOCOLS)}; got {q!r}")
        return _protocol_ratios(q)
    if isinstance(q, Tensor):
        values = q.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(q, Sequence) and not isinstance(q, bytes):
        values = torch.tensor([float(v) for v in q], dtype=torch.float64)
    else:
        raise TypeError(f"q must be a sequence of positive numbers, a tensor or a protocol name; "
                        f"got {type(q).__name__}")
    if values.numel() < 1 or not bool((torch.isfinite(values) & (values > 0)).all()):
        raise ValueError(f"q must hold at least one finite, positive ratio; got {values.tolist()}")
    return [Fraction(repr(v)) for v in values.tolist()]
