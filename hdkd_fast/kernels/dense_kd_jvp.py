r"""Forward-mode kernel: the derivative of every objective along logit tangents ``dz``, in one pass.

One program per row; after the statistics pass (:func:`row_stats`, on the logits only) a single pass
reads the logits and the tangents block by block and accumulates, with ``p = softmax(z/T)``,
``q = softmax(z)``:

- ``own[i] = Σ_c p_i dz_i`` and ``M[i, j] = Σ_c dz_i p_j`` (one ``tl.dot``), so
  ``d kd[i, j] = T (own[i] - M[i, j])`` (student side);
- with ``detach_teacher=False`` also the teacher side
  ``T (Σ_c p_j log p_j dz_j - Σ_c log p_i p_j dz_j - KL[i, j] own[j])``, whose KL comes from the same
  pass (two more ``tl.dot`` per block);
- ``d ce[k] = Σ_c q_k dz_k - dz_k[y]`` on non-ignored rows.

Per-row values are written to ``[K, B]`` / ``[K, K, B]`` and reduced by the caller with torch.
Traffic: 2 reads of the logits + 1 read of the tangents.
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
def _dense_kd_jvp_kernel(
    x_base, x_table, dx_base, dx_table, target_ptr, mask_ptr, dce_rows_ptr, dkd_rows_ptr,
    K, B, C, ignore_index,
    HAS_TARGET: tl.constexpr, TEMP_ONE: tl.constexpr, TWO_TEMPS: tl.constexpr,
    DETACH: tl.constexpr,
    KP: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, DALIGN: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = load_scalar(x_table, 2 * K, ACC)
    t = load_scalar(x_table, 2 * K + 1, ACC)
    k_idx = tl.arange(0, KP)
    k_ok = k_idx < K
    pair_ok = k_ok[:, None] & k_ok[None, :]
    ik = k_idx[:, None].to(tl.int64)
    jk = k_idx[None, :].to(tl.int64)

    mx, lns_t, lns_1 = row_stats(x_base, x_table, row, K, C, inv_t, k_idx, TWO_TEMPS, KP, BLOCK_C, ALIGN, ACC)
    y = 0
    if HAS_TARGET:
        y = tl.load(target_ptr + row).to(tl.int64)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)

    own = tl.zeros([KP], ACC)  # sum_c p_i dz_i
    mix = tl.zeros([KP, KP], ACC)  # mix[i, j] = sum_c dz_i p_j
    ce_dot = tl.zeros([KP], ACC)  # sum_c q_k dz_k
    cross = tl.zeros([KP, KP], ACC)  # sum_c log p_i p_j
    neg_ent = tl.zeros([KP], ACC)  # sum_c p_j log p_j
    t_cross = tl.zeros([KP, KP], ACC)  # sum_c log p_i p_j dz_j
    t_own = tl.zeros([KP], ACC)  # sum_c p_j log p_j dz_j
    lost = tl.zeros([KP, KP], ACC)  # mass of p_j where log p_i = -inf (there KL = inf)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z, ok = load_tile(x_base, x_table, row, cols, k_idx, K, C, ALIGN, ACC)
        dz, _ = load_tile(dx_base, dx_table, row, cols, k_idx, K, C, DALIGN, ACC)
        logp, p, gap = log_probs(z, ok, mx, lns_t, inv_t)
        own += tl.sum(p * dz, axis=1)
        mix = tl.dot(dz, tl.trans(p), mix, input_precision=PREC, out_dtype=ACC)
        if HAS_TARGET:
            q = p
            if not TEMP_ONE:
                q = tl.where(ok, tl.exp(z - mx[:, None] - lns_1[:, None]), 0.0)
            ce_dot += tl.sum(q * dz, axis=1)
        if not DETACH:
            p_dz = p * dz
            cross = tl.dot(logp, tl.trans(p), cross, input_precision=PREC, out_dtype=ACC)
            lost = add_lost_mass(lost, gap, p, PREC, ACC)
            neg_ent += tl.sum(p * logp, axis=1)
            t_cross = tl.dot(logp, tl.trans(p_dz), t_cross, input_precision=PREC, out_dtype=ACC)
            t_own += tl.sum(p_dz * logp, axis=1)

    rows = t * (own[:, None] - mix)
    if not DETACH:
        kl = tl.where(lost > 0, float("inf"), neg_ent[None, :] - cross)
        rows += t * (t_own[None, :] - t_cross - kl * own[None, :])
    sel = tl.load(mask_ptr + ik * K + jk, mask=pair_ok, other=0.0)
    tl.store(dkd_rows_ptr + (ik * K + jk) * B + row, tl.where(sel != 0, rows, 0.0), mask=pair_ok)
    if HAS_TARGET:
        dz_y = load_at(dx_base, dx_table, row, y, k_idx, K, ACC)
        dce = tl.where(k_ok & valid, ce_dot - dz_y, 0.0)
        tl.store(dce_rows_ptr + k_idx.to(tl.int64) * B + row, dce, mask=k_ok)


def dense_kd_jvp(
    logits: Tensor | Sequence[Tensor],
    tangents: Tensor | Sequence[Tensor],
    target: Tensor | None,
    mask: Tensor,
    *,
    temperature: float,
    detach_teacher: bool,
    ignore_index: int,
    block_c: int | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Launch the JVP kernel once: per-row ``(dce_rows [K, B] | None, dkd_rows [K, K, B])`` (unreduced,
    accumulation dtype) of the objectives along ``tangents`` (same layout options as ``logits``)."""
    tab = ExitTable(logits, (1.0 / temperature, temperature))
    dtab = ExitTable(tangents)
    k, b, c = tab.num_exits, tab.batch, tab.classes
    if (dtab.num_exits, dtab.batch, dtab.classes) != (k, b, c):
        raise ValueError("tangents must have the shape of the logits")
    dtype, device = tab.base.dtype, tab.base.device
    acc = acc_dtype(dtype)
    kp, bc, warps = block_sizes(k, c, block_c)
    has_target = target is not None
    dkd_rows = torch.empty((k, k, b), dtype=acc, device=device)
    dce_rows = torch.empty((k, b), dtype=acc, device=device) if has_target else dkd_rows
    tgt = target.to(torch.int64).contiguous() if target is not None else dkd_rows
    mask_f = mask.to(device=device, dtype=acc).contiguous()
    _dense_kd_jvp_kernel[(b,)](
        tab.base, tab.table, dtab.base, dtab.table, tgt, mask_f, dce_rows, dkd_rows,
        k, b, c, ignore_index,
        HAS_TARGET=has_target, TEMP_ONE=temperature == 1.0,
        TWO_TEMPS=has_target and temperature != 1.0, DETACH=detach_teacher,
        KP=kp, BLOCK_C=bc, ALIGN=tab.align, DALIGN=dtab.align, ACC=tl_acc(dtype), PREC=DOT_PRECISION,
        num_warps=warps,
    )
    return (dce_rows if has_target else None), dkd_rows
