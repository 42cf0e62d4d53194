"""An independent float64 implementation of docs/math.md, written for the tests only.

Plain loops over exits and pairs with explicit log-softmax / KL formulas. It never calls
hdkd_fast, so it checks the library rather than restating it. Gradients and JVPs of the
reference come from PyTorch autograd (reverse mode) and ``torch.func.jvp`` (forward mode)
through these elementary ops.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masks(k: int) -> dict[str, list[list[bool]]]:
    """The three named pair selections, written out independently of hdkd_fast._pairs."""
    return {
        "dense": [[i < j for j in range(k)] for i in range(k)],
        "last": [[j == k - 1 and i != j for j in range(k)] for i in range(k)],
        "adjacent": [[j == i + 1 for j in range(k)] for i in range(k)],
    }


def _log_softmax(x: Tensor) -> Tensor:
    shifted = x - x.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _kl_terms(log_p_j: Tensor, log_p_i: Tensor) -> Tensor:
    """``p_j (log p_j - log p_i)`` per class with 0 · log 0 = 0: a class with ``p_j = 0`` adds 0 (also
    where ``log p_i = -inf``), one with ``p_j > 0`` and ``log p_i = -inf`` adds ``+inf``. The difference
    is zeroed before the product so that no NaN reaches the gradient either."""
    p_j = log_p_j.exp()
    return p_j * torch.where(p_j > 0, log_p_j - log_p_i, 0.0)


def losses(
    z: Tensor,
    target: Tensor | None,
    *,
    temperature: float,
    mask: list[list[bool]],
    detach_teacher: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Tensor | None, Tensor]:
    """``(ce, kd)`` of docs/math.md for ``z: Tensor[K, B, C]`` in float64 (``-inf`` logits: 0 · log 0 = 0)."""
    z = z.double()
    k, b, _ = z.shape
    t = temperature
    ce = None
    if target is not None:
        valid = target != ignore_index
        n_valid = max(int(valid.sum()), 1)
        rows = []
        for e in range(k):
            logq = _log_softmax(z[e])
            nll = torch.stack([-logq[r, int(target[r])] if bool(valid[r]) else logq.new_zeros(()) for r in range(b)])
            rows.append(nll)
        ce_rows = torch.stack(rows)
        ce = {"mean": ce_rows.sum(-1) / n_valid, "sum": ce_rows.sum(-1), "none": ce_rows}[reduction]
    kd_rows = z.new_zeros(k, k, b)
    for i in range(k):
        for j in range(k):
            if not mask[i][j]:
                continue
            teacher = z[j].detach() if detach_teacher else z[j]
            log_p_i = _log_softmax(z[i] / t)
            log_p_j = _log_softmax(teacher / t)
            kl = _kl_terms(log_p_j, log_p_i).sum(-1)
            kd_rows = kd_rows.index_put((torch.tensor(i), torch.tensor(j)), t * t * kl)
    kd = {"mean": kd_rows.sum(-1) / b, "sum": kd_rows.sum(-1), "none": kd_rows}[reduction]
    return ce, kd


def weighted(z: Tensor, target: Tensor | None, ce_weight: Tensor, kd_weight: Tensor, **kwargs: object) -> Tensor:
    """``sum_k ce_weight[k] ce[k] + sum_ij kd_weight[i, j] kd[i, j]`` (mean reduction)."""
    ce, kd = losses(z, target, **kwargs)  # type: ignore[arg-type]
    total = (kd_weight.double() * kd).sum()
    if ce is not None:
        total = total + (ce_weight.double() * ce).sum()
    return total
