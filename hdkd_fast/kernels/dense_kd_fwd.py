r"""Fused forward kernel: every exit's CE, every selected pair's KD loss and the weighted gradient.

One program per row ``b`` (grid ``(B,)``), all K exits of the row in one ``[KP, BLOCK_C]`` tile:

- pass 1 (:func:`row_stats`): online max / sum-of-exp per exit at temperature T, and at
  temperature 1 when labels are given and ``T != 1``;
- pass 2: re-reads the row block by block; with ``logp = (z - max)/T - lns``, ``p = exp(logp)`` it
  accumulates the K×K cross terms ``X[i, j] = Σ_c log p_i p_j`` with one ``tl.dot`` per block
  (fp32/fp64 "ieee" precision, never TF32) and the negative entropies ``H[j] = Σ_c p_j log p_j``,
  so ``KL[i, j] = H[j] - X[i, j]`` for every pair at once; when a gradient is requested and the
  teacher is detached it also writes each exit's gradient once:
  ``g = rowsum(W) p - W @ p + α (q - onehot(y))`` where ``W`` = kd weight · mask · T · r_kd
  (``r`` = the reduction's row scale) and ``α`` = ce weight · r_ce, both folded in by the launcher;
- pass 3 (only ``detach_teacher=False`` with a gradient): the teacher term needs the row's complete
  KL, so the gradient is written by a third pass:
  ``g += p ⊙ (colsum(W) log p - Wᵀ @ log p - Σ_s W[s, :] KL[s, :])``.

Masked classes (``-inf`` logits) follow 0 · log 0 = 0: ``log p`` enters every product as 0 where
``p = 0`` exactly, and a block holding such a class also accumulates the mass of each ``p_j`` on the
classes where ``log p_i = -inf`` (a second ``tl.dot``), whose pairs get ``KL = +inf``
(:func:`~._common.log_probs`, :func:`~._common.add_lost_mass`).

Memory traffic: 2 reads + 1 write of K·B·C (3 reads with ``detach_teacher=False``), independent of
the number of pairs; loss-only mode (no gradient) is 2 reads and writes no gradient.

Per-row losses go to ``ce_rows [K, B]`` and ``kd_rows [K, K, B]`` (T²·KL·mask); the launcher's
caller reduces them with torch (deterministic: no atomics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    DOT_PRECISION,
    ExitTable,
    acc_dtype,
    add_lost_mass,
    block_sizes,
    load_at,
    load_scalar,
    load_tile,
    log_probs,
    row_stats,
    tl_acc,
)


@triton.jit
def _dense_kd_fwd_kernel(
    x_base, x_table, target_ptr,
    wce_ptr, wce_s0, wce_s1,
    wkd_ptr, wkd_s0, wkd_s1, wkd_s2,
    mask_ptr, ce_rows_ptr, kd_rows_ptr, grad_ptr,
    K, B, C, ignore_index,
    HAS_TARGET: tl.constexpr, TEMP_ONE: tl.constexpr, TWO_TEMPS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_CE_W: tl.constexpr, HAS_KD_W: tl.constexpr, DETACH: tl.constexpr,
    KP: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = load_scalar(x_table, 2 * K, ACC)
    t_sq = load_scalar(x_table, 2 * K + 1, ACC)
    k_idx = tl.arange(0, KP)
    k_ok = k_idx < K
    pair_ok = k_ok[:, None] & k_ok[None, :]
    ik = k_idx[:, None].to(tl.int64)
    jk = k_idx[None, :].to(tl.int64)

    mx, lns_t, lns_1 = row_stats(x_base, x_table, row, K, C, inv_t, k_idx, TWO_TEMPS, KP, BLOCK_C, ALIGN, ACC)

    # ---- cross-entropy of the row (temperature 1) ----
    y = 0
    valid = False
    if HAS_TARGET:
        y = tl.load(target_ptr + row).to(tl.int64)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)
        z_y = load_at(x_base, x_table, row, y, k_idx, K, ACC)
        ce = tl.where(k_ok & valid, lns_1 - (z_y - mx), 0.0)
        tl.store(ce_rows_ptr + k_idx.to(tl.int64) * B + row, ce, mask=k_ok)

    # ---- weights of the gradient (already scaled and masked by the launcher) ----
    w = tl.zeros([KP, KP], ACC)
    alpha = tl.zeros([KP], ACC)
    if COMPUTE_GRAD:
        if HAS_KD_W:
            w = tl.load(wkd_ptr + ik * wkd_s0 + jk * wkd_s1 + row * wkd_s2, mask=pair_ok, other=0.0).to(ACC)
        if HAS_TARGET and HAS_CE_W:
            alpha = tl.load(wce_ptr + k_idx.to(tl.int64) * wce_s0 + row * wce_s1, mask=k_ok, other=0.0).to(ACC)
            alpha = tl.where(valid, alpha, 0.0)
    w_rows = tl.sum(w, axis=1)
    grad_row = grad_ptr + (k_idx.to(tl.int64) * B + row) * C  # [KP] row starts of the output

    # ---- pass 2: KL of every pair (+ the gradient when the teacher is detached) ----
    cross = tl.zeros([KP, KP], ACC)  # cross[i, j] = sum_c log p_i p_j
    neg_ent = tl.zeros([KP], ACC)  # sum_c p_j log p_j
    lost = tl.zeros([KP, KP], ACC)  # lost[i, j] = mass of p_j where log p_i = -inf
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z, ok = load_tile(x_base, x_table, row, cols, k_idx, K, C, ALIGN, ACC)
        logp, p, gap = log_probs(z, ok, mx, lns_t, inv_t)
        cross = tl.dot(logp, tl.trans(p), cross, input_precision=PREC, out_dtype=ACC)
        lost = add_lost_mass(lost, gap, p, PREC, ACC)
        neg_ent += tl.sum(p * logp, axis=1)
        if COMPUTE_GRAD and DETACH:
            g = w_rows[:, None] * p - tl.dot(w, p, input_precision=PREC, out_dtype=ACC)
            if HAS_TARGET and HAS_CE_W:
                q = p
                if not TEMP_ONE:
                    q = tl.where(ok, tl.exp(z - mx[:, None] - lns_1[:, None]), 0.0)
                g += alpha[:, None] * (q - tl.where(cols[None, :] == y, 1.0, 0.0))
            tl.store(grad_row[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=ok)

    # KL[i, j] = sum_c p_j (log p_j - log p_i); unselected pairs store exactly 0 (also where KL = inf)
    kl = tl.where(lost > 0, float("inf"), neg_ent[None, :] - cross)
    sel = tl.load(mask_ptr + ik * K + jk, mask=pair_ok, other=0.0)
    tl.store(kd_rows_ptr + (ik * K + jk) * B + row, tl.where(sel != 0, t_sq * kl, 0.0), mask=pair_ok)

    # ---- pass 3: teacher term, which needs the row's complete KL ----
    if COMPUTE_GRAD and not DETACH:
        w_cols = tl.sum(w, axis=0)
        w_kl = tl.sum(tl.where(w != 0, w * kl, 0.0), axis=0)  # sum_s W[s, j] KL[s, j] (0 · inf = 0)
        w_t = tl.trans(w)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            z, ok = load_tile(x_base, x_table, row, cols, k_idx, K, C, ALIGN, ACC)
            logp, p, _ = log_probs(z, ok, mx, lns_t, inv_t)
            g = w_rows[:, None] * p - tl.dot(w, p, input_precision=PREC, out_dtype=ACC)
            mixed = tl.dot(w_t, logp, input_precision=PREC, out_dtype=ACC)
            g += p * (w_cols[:, None] * logp - mixed - w_kl[:, None])
            if HAS_TARGET and HAS_CE_W:
                q = p
                if not TEMP_ONE:
                    q = tl.where(ok, tl.exp(z - mx[:, None] - lns_1[:, None]), 0.0)
                g += alpha[:, None] * (q - tl.where(cols[None, :] == y, 1.0, 0.0))
            tl.store(grad_row[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=ok)


def _weight_args(w: Tensor | None, dims: int, dummy: Tensor) -> tuple[Tensor, list[int]]:
    """A weight tensor with its strides; per-objective weights get row stride 0 (no expansion copy)."""
    if w is None:
        return dummy, [0] * (dims + 1)
    if w.dim() == dims:
        return w, [*w.stride(), 0]
    return w, list(w.stride())


def dense_kd_forward(
    logits: Tensor | Sequence[Tensor],
    target: Tensor | None,
    ce_weight: Tensor | None,
    kd_weight: Tensor | None,
    mask: Tensor,
    *,
    temperature: float,
    detach_teacher: bool,
    ignore_index: int,
    compute_grad: bool,
    block_c: int | None = None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Launch the fused forward kernel once.

    Args:
        logits: ``Tensor[K, B, C]`` or K ``Tensor[B, C]`` (read in place).
        target: ``Tensor[B]`` of labels (``ignore_index`` rows skipped) or ``None``.
        ce_weight: the CE gradient weight **already multiplied by the reduction's row scale**:
            ``[K]`` or per row ``[K, B]``; ``None``: no CE term in the gradient.
        kd_weight: the KD gradient weight **already multiplied by mask · T · r_kd**: ``[K, K]`` or per
            row ``[K, K, B]``; ``None``: no KD term in the gradient.
        mask: ``[K, K]`` 0/1 pair selection (for the per-row losses).
        compute_grad: write the gradient (``[K, B, C]``, input dtype); otherwise only the losses.
        block_c: column block size (power of two >= 16); default from the shape.

    Returns:
        ``(ce_rows [K, B] | None, kd_rows [K, K, B], grad | None)``; rows unreduced, in the
        accumulation dtype (float32, float64 for float64 input).
    """
    tab = ExitTable(logits, (1.0 / temperature, temperature * temperature))
    k, b, c = tab.num_exits, tab.batch, tab.classes
    dtype, device = tab.base.dtype, tab.base.device
    acc = acc_dtype(dtype)
    kp, bc, warps = block_sizes(k, c, block_c)
    has_target = target is not None
    kd_rows = torch.empty((k, k, b), dtype=acc, device=device)
    ce_rows = torch.empty((k, b), dtype=acc, device=device) if has_target else kd_rows
    grad = torch.empty((k, b, c), dtype=dtype, device=device) if compute_grad else kd_rows
    tgt = target.to(torch.int64).contiguous() if target is not None else kd_rows
    wce, wce_s = _weight_args(ce_weight, 1, kd_rows)
    wkd, wkd_s = _weight_args(kd_weight, 2, kd_rows)
    mask_f = mask.to(device=device, dtype=acc).contiguous()
    _dense_kd_fwd_kernel[(b,)](
        tab.base, tab.table, tgt,
        wce, wce_s[0], wce_s[1],
        wkd, wkd_s[0], wkd_s[1], wkd_s[2],
        mask_f, ce_rows, kd_rows, grad,
        k, b, c, ignore_index,
        HAS_TARGET=has_target, TEMP_ONE=temperature == 1.0,
        TWO_TEMPS=has_target and temperature != 1.0, COMPUTE_GRAD=compute_grad,
        HAS_CE_W=ce_weight is not None, HAS_KD_W=kd_weight is not None, DETACH=detach_teacher,
        KP=kp, BLOCK_C=bc, ALIGN=tab.align, ACC=tl_acc(dtype), PREC=DOT_PRECISION, num_warps=warps,
    )
    return (ce_rows if has_target else None), kd_rows, (grad if compute_grad else None)
