"""Shared pieces of the dense-KD Triton kernels: the exit table, tile loads, block sizes.

**Exit table.** The K exits are read in place, without a stacking copy: every exit ``k`` is
addressed as ``base + offset[k] + row * row_stride[k] + col`` where ``base`` is the first exit's
data pointer and ``offset`` / ``row_stride`` are int64 element counts kept in a small device tensor
(``[2K + n]``: offsets, row strides, then ``n`` float64 scalars such as 1/T stored as bit
patterns, so that float64 inputs see an exact float64 temperature). A stacked ``Tensor[K, B, C]``
gives ``offset[k] = k * stride(0)``; a list of K
``Tensor[B, C]`` gives the distance of each exit's storage from the first one (in elements; the
allocations only need to be element-aligned relative to each other, which torch's allocators
guarantee for tensors of one dtype; otherwise the launcher falls back to a stacking copy). All
offsets are int64, so ``B * C > 2**31`` is safe. The last dimension must be contiguous (other
layouts are made contiguous per exit).

**Tiles.** A program owns one row ``b`` and walks the columns in blocks of ``BLOCK_C``; every block
is a ``[KP, BLOCK_C]`` tile holding all exits (``KP`` = K padded to a power of two >= 16, the
smallest ``tl.dot`` operand size), loaded as the input dtype and upcast to the accumulation dtype
(float32, or float64 for float64 input) right after the load.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_TILE = 1024
"""Cap on ``KP * BLOCK_C`` (elements of one register tile). The ``tl.dot`` of the cross terms runs in
"ieee" precision (FMA, never TF32), whose operand layout replicates the column dimension across threads;
compiled offline for sm_90 (Triton 3.9, bf16 input, ``ptxas -v``), 1024-element tiles with 8 warps use
117-192 registers without spills for KP in {16, 32, 64}, while 2048+ element tiles spill."""

DOT_PRECISION = "ieee"
"""``input_precision`` of every ``tl.dot``: full fp32 (fp64 for float64 input). TF32 would cost ~1e-3
relative error in the cross terms, i.e. ~1e-2 absolute in a KL of a 1000-class row; "tf32x3" spilled
registers badly in the sm_90 offline compile (see :data:`MAX_TILE`)."""

BLOCK_C_ENV = "HDKD_FAST_TRITON_BLOCK_C"
"""Environment override of the column block size (a power of two >= 16), used by the tests to
force several column blocks on tiny inputs."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def padded_exits(k: int) -> int:
    """K padded to a power of two, at least 16 (``tl.dot`` needs every operand dimension >= 16)."""
    return max(16, triton.next_power_of_2(k))


def block_sizes(k: int, c: int, block_c: int | None = None) -> tuple[int, int, int]:
    """``(KP, BLOCK_C, num_warps)``: the column block is capped so a ``[KP, BLOCK_C]`` tile stays within
    :data:`MAX_TILE` elements (at least 16 columns); warps scale with the tile size (one warp per 128
    elements, 4..16)."""
    kp = padded_exits(k)
    if block_c is None and os.environ.get(BLOCK_C_ENV):
        block_c = int(os.environ[BLOCK_C_ENV])
    if block_c is None:
        block_c = min(triton.next_power_of_2(c), max(16, MAX_TILE // kp))
    block_c = max(16, triton.next_power_of_2(int(block_c)))
    num_warps = min(16, max(4, (kp * block_c) // 128))
    return kp, block_c, num_warps


class ExitTable:
    """The exits of one logits (or tangents) argument as ``base`` pointer + int64 table ``[2K + n]``
    (element offsets from ``base``, row strides, then the ``scalars`` as float64 bit patterns) +
    ``align`` (the element count every offset and row stride is a multiple of, for vectorized loads)."""

    def __init__(self, x: Tensor | Sequence[Tensor], scalars: Sequence[float] = ()) -> None:
        exits = self._exits(x)
        first = exits[0]
        size = first.element_size()
        base_ptr = first.data_ptr()
        deltas = [t.data_ptr() - base_ptr for t in exits]
        if any(d % size for d in deltas):  # not element-aligned relative to each other: copy
            exits = list(torch.stack(exits).unbind(0))
            first, base_ptr = exits[0], exits[0].data_ptr()
            deltas = [t.data_ptr() - base_ptr for t in exits]
        offsets = [d // size for d in deltas]
        strides = [t.stride(0) if t.shape[0] > 1 else 0 for t in exits]
        vec = max(1, 16 // size)
        aligned = base_ptr % 16 == 0 and all(v % vec == 0 for v in offsets + strides)
        self.align = vec if aligned else 1
        self.base = first
        self.keep = exits  # keeps any per-exit contiguous copy alive during the launch
        bits = [struct.unpack("<q", struct.pack("<d", float(v)))[0] for v in scalars]
        # one host-to-device copy per launch carries the table and the float64 scalars (bit patterns)
        self.table = torch.tensor(offsets + strides + bits, dtype=torch.int64).to(first.device, non_blocking=True)
        self.num_exits = len(exits)
        self.batch, self.classes = first.shape

    @staticmethod
    def _exits(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(x, Tensor):
            if x.dim() != 3:
                raise ValueError(f"expected a Tensor[K, B, C]; got shape {list(x.shape)}")
            if x.stride(2) != 1 and x.shape[2] > 1:
                x = x.contiguous()
            return list(x.unbind(0))
        exits = [t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in x]
        return exits


@triton.jit
def load_tile(base, table, row, cols, k_idx, K, C, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """The ``[KP, BLOCK_C]`` tile of every exit at ``row`` and columns ``cols``, upcast to ``ACC``;
    also returns its validity mask (exit < K and column < C)."""
    k_ok = k_idx < K
    offs = tl.load(table + k_idx, mask=k_ok, other=0)
    rstr = tl.load(table + K + k_idx, mask=k_ok, other=0)
    start = offs + row.to(tl.int64) * rstr
    if ALIGN > 1:
        start = tl.multiple_of(start, ALIGN)
    ok = k_ok[:, None] & (cols < C)[None, :]
    z = tl.load(base + start[:, None] + cols[None, :], mask=ok, other=0.0)
    return z.to(ACC), ok


@triton.jit
def load_at(base, table, row, col, k_idx, K, ACC: tl.constexpr):
    """One element per exit: ``x_k[row, col]`` for ``k < K`` (0 for padding exits), as ``ACC`` ([KP])."""
    k_ok = k_idx < K
    offs = tl.load(table + k_idx, mask=k_ok, other=0)
    rstr = tl.load(table + K + k_idx, mask=k_ok, other=0)
    v = tl.load(base + offs + row.to(tl.int64) * rstr + col, mask=k_ok, other=0.0)
    return v.to(ACC)


@triton.jit
def row_stats(base, table, row, K, C, inv_t, k_idx, TWO: tl.constexpr, KP: tl.constexpr,
              BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    """Pass 1: online max / sum-of-exp over the column blocks. Returns, per exit, the max ``m`` of its
    logits, ``lns_t = log sum_c exp((z - m) / T)`` and ``lns_1 = log sum_c exp(z - m)`` (computed when
    ``TWO``, else ``lns_t`` again). Shifting by the max before scaling by 1/T keeps huge finite logits
    from overflowing; ``-inf`` logits (masked classes) add ``exp(-inf) = 0``, also in blocks where every
    logit so far is ``-inf``. An exit whose logits are all ``-inf`` has no softmax: NaN downstream."""
    m = tl.full([KP], float("-inf"), ACC)
    s_t = tl.zeros([KP], ACC)
    s_1 = tl.zeros([KP], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z, _ = load_tile(base, table, row, cols, k_idx, K, C, ALIGN, ACC)
        x = tl.where((cols < C)[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - (-inf)
        u = x - shift[:, None]
        back = m - shift
        s_t = s_t * tl.exp(back * inv_t) + tl.sum(tl.exp(u * inv_t), axis=1)
        if TWO:
            s_1 = s_1 * tl.exp(back) + tl.sum(tl.exp(u), axis=1)
        m = m_new
    lns_t = tl.log(s_t)
    lns_1 = lns_t
    if TWO:
        lns_1 = tl.log(s_1)
    return m, lns_t, lns_1


@triton.jit
def log_probs(z, ok, m, lns, inv_t):
    """One ``[KP, BLOCK_C]`` tile at temperature T: ``(log p, p, gap)`` with ``log p = (z - m) / T - lns``
    kept finite (0 where it is ``-inf``, i.e. ``p = 0`` exactly: 0 · log 0 = 0, so a masked class adds
    nothing to a dot product), ``p`` (0 outside ``ok``) and ``gap`` (1 where ``log p = -inf``, else 0:
    ``tl.dot(gap, p_j)`` is the mass ``p_j`` puts there, which makes a KL ``+inf``)."""
    raw = (z - m[:, None]) * inv_t - lns[:, None]
    off = ok & (raw == float("-inf"))
    logp = tl.where(ok & ~off, raw, 0.0)
    p = tl.where(ok, tl.exp(raw), 0.0)
    return logp, p, off.to(z.dtype)


@triton.jit
def add_lost_mass(lost, gap, p, PREC: tl.constexpr, ACC: tl.constexpr):
    """``lost[i, j] += sum_c gap[i, c] p[j, c]``: the mass of ``p_j`` on the classes where ``log p_i = -inf``
    (the dot only runs for a tile that has such a class)."""
    if tl.max(tl.max(gap, axis=1), axis=0) > 0:
        lost = tl.dot(gap, tl.trans(p), lost, input_precision=PREC, out_dtype=ACC)
    return lost


@triton.jit
def load_scalar(table, index, ACC: tl.constexpr):
    """A float64 scalar stored (as its bit pattern) in the int64 exit table, cast to ``ACC``."""
    return tl.load(table + index).to(tl.float64, bitcast=True).to(ACC)
