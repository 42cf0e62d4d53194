r"""The ``"torch"`` backend: every objective and its gradient as a few batched tensor ops.

No Python loop over exit pairs: all K log-softmaxes are taken at once and the K×K cross terms of
each row, :math:`X[i, j, b] = \sum_c p_j[b, c] \log p_i[b, c]`, come from one batched matmul
(``einsum``). With :math:`p_k = \mathrm{softmax}(z_k / T)` and :math:`q_k = \mathrm{softmax}(z_k)`:

.. math::
    \mathrm{ce}[k, b] &= -\log q_k[b, y_b] \quad (0 \text{ on ignored rows}) \\
    \mathrm{KL}[i, j, b] &= \textstyle\sum_c p_j \log p_j - X[i, j, b], \qquad
    \mathrm{kd}[i, j, b] = T^2 \, \mathrm{KL}[i, j, b] \, m_{ij}

The weighted objective :math:`L = \sum_k \alpha_k \mathrm{ce}_k + \sum_{ij} \gamma_{ij} \mathrm{kd}_{ij}`
(after reduction) has the logits gradient (``r`` = the reduction's row scale)

.. math::
    \partial L / \partial z_i = \alpha_i r_{ce} (q_i - e_{y}) + T r_{kd}
        \big(\textstyle\sum_j \gamma_{ij} \, p_i - \sum_j \gamma_{ij} p_j\big)
        \;[+\; T r_{kd}\, p_i \odot \textstyle\sum_s \gamma_{si} (\log p_i - \log p_s - \mathrm{KL}_{si})
        \text{ when the teacher is not detached}]

Masked classes (``-inf`` logits) follow :math:`0 \log 0 = 0`: ``log p`` is kept finite (0 where
``p = 0`` exactly) so that a class of probability 0 contributes nothing to a sum, and the KL is set to
``+inf`` where the teacher puts mass on a class whose student log-probability is ``-inf``. That
handling (a mask, a ``where`` and a second batched matmul) is paid only when some log-probability is
``-inf``, which one min-reduction finds; inside ``torch.compile`` or a functorch transform (no
data-dependent branch there) it is always taken, with the same results.

Every function here is made of differentiable PyTorch ops, so the same code is the analytic fast
path (under ``no_grad``) and the differentiable fallback used for double backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import Tensor

from .._pairs import PairMask, mask_tensor
from .._validation import accumulation_dtype

NAME = "torch"


def unavailable_reason(device: torch.device) -> str | None:
    """Always usable: plain PyTorch runs on every device."""
    return None


class _Rows(NamedTuple):
    """Per-row quantities shared by the losses, the gradient and the JVP."""

    logp: Tensor  # [K, B, C] log softmax(z / T), 0 where it is -inf (p = 0: 0 · log 0 = 0)
    p: Tensor  # [K, B, C] softmax(z / T)
    off_support: Tensor | None  # [K, B, C] 1 where log softmax(z / T) = -inf, else 0; None: nowhere
    logq: Tensor | None  # [K, B, C] log softmax(z), when a target is given
    valid: Tensor | None  # [B] rows whose label is not ignore_index
    label_index: Tensor | None  # [K, B, 1] label per row (0 on ignored rows), for gather / scatter
    r_ce: Tensor | float  # CE row scale of the reduction: 1 / max(#valid, 1) for "mean"
    r_kd: float  # KD row scale of the reduction: 1 / B for "mean"


def _stack(logits: Tensor | Sequence[Tensor]) -> Tensor:
    return logits if isinstance(logits, Tensor) else torch.stack(tuple(logits))


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _without_autocast(fn: _Fn) -> _Fn:
    """Run ``fn(logits, ...)`` with autocast off on the logits' device: every op here computes in the
    accumulation dtype, and autocast would otherwise run the batched matmuls in bf16."""
    @functools.wraps(fn)
    def wrapper(logits: Tensor | Sequence[Tensor], *args: Any, **kwargs: Any) -> Any:
        device = (logits if isinstance(logits, Tensor) else logits[0]).device
        with torch.autocast(device.type, enabled=False):
            return fn(logits, *args, **kwargs)
    return cast(_Fn, wrapper)


def row_scales(target: Tensor | None, ignore_index: int, reduction: str, batch: int,
               dtype: torch.dtype) -> tuple[Tensor | float, float]:
    """``(r_ce, r_kd)``, the row scales of the reduction: ``1 / max(#non-ignored rows, 1)`` and ``1 / B``
    for ``"mean"``, else 1."""
    if reduction != "mean":
        return 1.0, 1.0
    r_ce = 1.0 if target is None else 1.0 / (target != ignore_index).sum().clamp(min=1).to(dtype)
    return r_ce, 1.0 / batch


def reduce_rows(rows: Tensor, scale: Tensor | float, reduction: str) -> Tensor:
    """Reduce the trailing row dimension: ``sum_b scale * rows[..., b]`` (``scale`` from :func:`row_scales`),
    or the rows themselves for ``"none"``. Scaling before summing keeps a mean of finite rows finite."""
    return rows if reduction == "none" else (rows * scale).sum(-1)


def _scaled(z: Tensor, temperature: float) -> Tensor:
    """``z / T``; for T < 1 from ``z - max_c z`` (softmax does not change), so that it cannot overflow."""
    if temperature >= 1.0:
        return z / temperature
    return (z - z.amax(-1, keepdim=True).detach()) / temperature


def _rows(z: Tensor, target: Tensor | None, temperature: float, ignore_index: int, reduction: str) -> _Rows:
    k, b, _ = z.shape
    raw = torch.log_softmax(_scaled(z, temperature), dim=-1)
    p = raw.exp()
    logp, off_support = raw, None
    if _may_hold_neginf(raw):
        off = torch.isneginf(raw)
        logp, off_support = torch.where(off, 0.0, raw), off.to(z.dtype)
    logq = valid = label_index = None
    if target is not None:
        logq = raw if temperature == 1.0 else torch.log_softmax(z, dim=-1)
        valid = target != ignore_index
        label_index = torch.where(valid, target, 0).view(1, b, 1).expand(k, b, 1)
    r_ce, r_kd = row_scales(target, ignore_index, reduction, b, z.dtype)
    return _Rows(logp, p, off_support, logq, valid, label_index, r_ce, r_kd)


def _may_hold_neginf(raw: Tensor) -> bool:
    """Whether ``raw`` may hold ``-inf``: its minimum, read on the host (a NaN minimum is no ``-inf``);
    always ``True`` where no host read can branch (``torch.compile``, functorch's wrapped tensors)."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(raw):
        return True
    return raw.numel() > 0 and bool(raw.detach().amin() == -math.inf)


def _differentiated(z: Tensor) -> bool:
    """Whether this call is itself differentiated (the second-derivative path: autograd or a functorch
    transform), so that a detached teacher must be kept out of the derivative."""
    if torch.is_grad_enabled() and z.requires_grad:
        return True
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(z)


def _selected(rows: Tensor, m: Tensor) -> Tensor:
    """Per-pair rows ``[K, K, B]`` kept on the selected pairs (``m``: ``[K, K]`` 0/1) and exactly 0
    elsewhere, even where the row is infinite or NaN."""
    return torch.where(m.unsqueeze(-1) != 0, rows, 0.0)


def _pair_kl(r: _Rows) -> Tensor:
    """``KL[i, j, b] = sum_c p_j (log p_j - log p_i)`` for every pair, as one batched matmul (whose
    diagonal, ``sum_c p_j log p_j``, is the negative entropy the KL needs); ``+inf`` where ``p_j`` puts
    mass on a class with ``log p_i = -inf`` (a second batched matmul finds those)."""
    cross = torch.einsum("jbc,ibc->ijb", r.p, r.logp)  # sum_c p_j log p_i
    neg_entropy = cross.diagonal(dim1=0, dim2=1).transpose(0, 1)  # [K(j), B]
    kl = neg_entropy.unsqueeze(0) - cross
    if r.off_support is None:
        return kl
    lost = torch.einsum("jbc,ibc->ijb", r.p, r.off_support)  # mass of p_j where p_i = 0 exactly
    return torch.where(lost > 0, math.inf, kl)


def _mix(w: Tensor, t: Tensor) -> Tensor:
    """``out[i] = sum_j w[i, j] * t[j]`` over the exit axis; ``w`` is ``[K, K, 1]`` or per row ``[K, K, B]``."""
    if w.shape[-1] == 1:
        return torch.einsum("ij,jbc->ibc", w[..., 0], t)
    return torch.einsum("ijb,jbc->ibc", w, t)


def _expand_rows(w: Tensor, dims: int) -> Tensor:
    """Per-objective weights ([K] or [K, K]) gain a trailing row axis to match per-row ones."""
    return w.unsqueeze(-1) if w.dim() == dims else w


@_without_autocast
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
    """Per-objective losses and, when ``compute_grad``, the gradient of the weighted objective.

    ``logits``: ``Tensor[K, B, C]`` or K ``Tensor[B, C]``. ``ce_weight``: ``[K]`` or per row ``[K, B]``;
    ``kd_weight``: ``[K, K]`` or per row ``[K, K, B]``; ``None`` drops that term from the gradient.
    Returns ``(ce, kd, grad)``: ``ce`` (``None`` without a target) and ``kd`` in the accumulation
    dtype (float32, or float64 for float64 input), ``grad`` a ``Tensor[K, B, C]`` in the input dtype.
    """
    x = _stack(logits)
    z = x.to(accumulation_dtype(x.dtype))
    r = _rows(z, target, temperature, ignore_index, reduction)
    m = mask_tensor(mask, dtype=z.dtype, device=z.device)
    kl = _pair_kl(r)
    kd = reduce_rows(_selected(temperature**2 * kl, m), r.r_kd, reduction)
    ce = None
    if r.logq is not None and r.label_index is not None and r.valid is not None:
        nll = torch.where(r.valid, -r.logq.gather(-1, r.label_index).squeeze(-1), 0.0)
        ce = reduce_rows(nll, r.r_ce, reduction)
    if not compute_grad:
        return ce, kd, None

    # Each term is one pass over [K, B, C]: the student term is the matmul of the exit axis with
    # M = T·r·(diag(Σ_j γ_ij) − γ), so that M @ p = T·r·(Σ_j γ_ij p_i − Σ_j γ_ij p_j).
    k = z.shape[0]
    differentiated = _differentiated(z)
    grad: Tensor | None = None
    if kd_weight is not None:
        w = _expand_rows(kd_weight.to(z.dtype), 2) * m.unsqueeze(-1)  # [K, K, 1 or B]
        scale = temperature * r.r_kd
        if detach_teacher and differentiated:  # the teacher's p_j is a constant: no derivative through it
            grad = torch.addcmul(_mix(-scale * w, r.p.detach()), scale * w.sum(1).unsqueeze(-1), r.p)
        else:
            eye = torch.eye(k, dtype=z.dtype, device=z.device).unsqueeze(-1)
            grad = _mix(scale * (eye * w.sum(1).unsqueeze(1) - w), r.p)
        if not detach_teacher:
            mixed_logp = _mix(w.transpose(0, 1), r.logp)
            weighted_kl = torch.where(w != 0, w * kl, 0.0).sum(0)  # [K(j), B]; a zero weight drops an infinite KL
            teacher = r.p * (w.sum(0).unsqueeze(-1) * r.logp - mixed_logp - weighted_kl.unsqueeze(-1))
            grad = torch.add(grad, teacher, alpha=scale)
    if ce_weight is not None and r.logq is not None and r.label_index is not None and r.valid is not None:
        wc = (_expand_rows(ce_weight.to(z.dtype), 1) * r.valid * r.r_ce).unsqueeze(-1)  # [K, B, 1]
        q = r.p if temperature == 1.0 else r.logq.exp()
        if grad is None:
            grad = wc * q
        elif differentiated:  # out of place: vmap may batch wc and q but not grad
            grad = torch.addcmul(grad, wc, q)
        else:
            grad.addcmul_(wc, q)  # grad is a fresh tensor: no allocation
        grad.scatter_add_(-1, r.label_index, -wc)  # − α r e_y on the label column (grad is a fresh tensor)
    if grad is None:
        grad = torch.zeros_like(z)
    return ce, kd, grad.to(x.dtype)


@_without_autocast
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
    r"""Forward-mode derivative of every objective along the logit tangents ``dz``.

    .. math::
        d\,\mathrm{ce}[k] = r \textstyle\sum_b \langle q_k - e_{y_b}, dz_k \rangle, \quad
        d\,\mathrm{kd}[i, j] = T r \textstyle\sum_b \langle p_i - p_j, dz_i \rangle
        \;[+\; T r \textstyle\sum_b \langle p_j \odot (\log p_j - \log p_i - \mathrm{KL}_{ij}), dz_j\rangle]
    """
    x = _stack(logits)
    z = x.to(accumulation_dtype(x.dtype))
    dz = _stack(tangents).to(z.dtype)
    r = _rows(z, target, temperature, ignore_index, reduction)
    m = mask_tensor(mask, dtype=z.dtype, device=z.device)
    own = (r.p * dz).sum(-1)  # <p_i, dz_i>: [K, B]
    rows = temperature * (own.unsqueeze(1) - torch.einsum("jbc,ibc->ijb", r.p, dz))
    if not detach_teacher:
        p_dz = r.p * dz
        rows = rows + temperature * (
            (p_dz * r.logp).sum(-1).unsqueeze(0)  # <p_j log p_j, dz_j>
            - torch.einsum("ibc,jbc->ijb", r.logp, p_dz)  # <p_j log p_i, dz_j>
            - _pair_kl(r) * own.unsqueeze(0)  # KL_ij <p_j, dz_j>
        )
    dkd = reduce_rows(_selected(rows, m), r.r_kd, reduction)
    dce = None
    if r.logq is not None and r.label_index is not None and r.valid is not None:
        ce_rows = (r.logq.exp() * dz).sum(-1) - dz.gather(-1, r.label_index).squeeze(-1)
        dce = reduce_rows(ce_rows * r.valid, r.r_ce, reduction)
    return dce, dkd
