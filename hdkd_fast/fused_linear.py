r"""Dense KD fused with a shared linear head (early-exit language models), without the K×N×V logits.

K exits' hidden states :math:`h_k \in \mathbb{R}^{N \times H}` share one head :math:`W \in \mathbb{R}^{V \times H}`,
:math:`b \in \mathbb{R}^V`; the logits would be :math:`z_k = h_k W^\top + b`, ``K·N·V`` numbers (16.8 GB in
fp32 at K = 4, N = 8192, V = 128256). :func:`fused_linear_dense_kd` computes exactly the objectives of
:func:`hdkd_fast.dense_kd_losses` on those logits while holding only one chunk of ``c`` token rows of them
at a time. Per chunk :math:`r` (rows :math:`n_0 \le n < n_1`):

1. one matmul, :math:`z^{(r)} = h^{(r)} W^\top + b` (``[K, c, V]``, computed in fp32 — float64 for float64
   inputs — whatever the input dtype or autocast state);
2. one call of the fused backend op ``losses_and_grad`` on it (``reduction="sum"`` over the chunk's rows,
   the objective weights pre-multiplied by the global row scales, so the chunk sums add up to the means),
   which returns the chunk's losses and :math:`G^{(r)} = \partial L / \partial z^{(r)}` in one pass;
3. the chunk's share of the parameter gradients, accumulated in fp32:
   :math:`\partial L/\partial h^{(r)}_k = G^{(r)}_k W`,
   :math:`\partial L/\partial W \mathrel{+}= \sum_k G^{(r)\top}_k h^{(r)}_k`,
   :math:`\partial L/\partial b \mathrel{+}= \sum_{k, n} G^{(r)}_{k, n}`.

Steps 2–3 run in the forward only for the weighted loss (:class:`FusedLinearDenseKD`), whose weights are
known then: backward only scales the kept gradients by the incoming cotangent, as ``dense_kd`` does. When
the per-objective outputs of :func:`fused_linear_dense_kd` are differentiated, backward makes one more
sweep with the cotangents as objective weights (``∂⟨g, losses⟩/∂z`` is the weighted gradient with weights
``g``). Forward mode (``torch.func.jvp``, the bilevel ``"jvp"`` hypergradient) is a third sweep:
:math:`dz^{(r)} = dh^{(r)} W^\top + h^{(r)} dW^\top + db`, then the backend's ``jvp``. Second derivatives
(``create_graph=True``, the bilevel ``"exact"`` hypergradient) are not provided: under ``create_graph=True``
the first-order gradients are returned (and require grad), but differentiating them raises PyTorch's
"trying to differentiate twice" error, so a gradient penalty fails loudly instead of being dropped. Use
the materialized path, :func:`hdkd_fast.dense_kd` on ``hidden @ weight.T + bias``, for those.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._autograd import OpSpec, combine_weights, loss_tangent, weight_grads, weighted_sum
from ._pairs import PairSpec
from ._types import KDLosses, LossWeights
from ._validation import (
    LogitsInfo,
    check_count,
    check_logits,
    check_target,
    check_target_values,
)
from .backends import get_backend
from .backends.torch_backend import row_scales
from .functional import op_spec, weight_tensors
from .modules import DenseKDConfig

Hidden = Tensor | Sequence[Tensor]
"""``Tensor[K, N, H]`` or a sequence of K ``Tensor[N, H]``: the exits' (final-normed) hidden states."""

DEFAULT_CHUNK_BUDGET_BYTES = 256 << 20
"""Memory a chunk's logits may take when ``chunk_size=None``, counting :data:`CHUNK_COPIES` copies."""
CHUNK_COPIES = 4
"""``[K, c, V]`` buffers assumed live per chunk: the logits, their gradient and the backend's temporaries."""


class FusedSpec(NamedTuple):
    """The op's non-tensor arguments (hashable, constants for torch.compile)."""

    op: OpSpec
    chunk_size: int
    vocab_size: int  # columns of the head in use (V' <= V); rows V' .. V-1 get gradient 0


def chunk_size_for(num_exits: int, vocab_size: int, dtype: torch.dtype,
                   budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that :data:`CHUNK_COPIES` ``[K, c, V]`` buffers of ``dtype`` fit ``budget_bytes``
    (at least 1)."""
    row = num_exits * vocab_size * torch.tensor([], dtype=dtype).element_size() * CHUNK_COPIES
    return max(1, budget_bytes // row)


def _acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _head(weight: Tensor, bias: Tensor | None, spec: FusedSpec, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The used rows of the head in the accumulation dtype."""
    v = spec.vocab_size
    return weight[:v].to(acc), (bias[:v].to(acc) if bias is not None else None)


def _chunks(hidden: tuple[Tensor, ...], stacked: bool, w: Tensor, b: Tensor | None, chunk: int
            ) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """``(rows, h, z)`` per chunk: ``h`` the exits' rows ``[K, c, H]`` and ``z = h Wᵀ + b`` ``[K, c, V]``,
    both in ``w``'s dtype (autocast off: the logits are computed in full precision)."""
    n = hidden[0].shape[-2]
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        h = hidden[0][:, rows] if stacked else torch.stack([x[rows] for x in hidden])
        h = h.to(w.dtype)
        yield rows, h, _chunk_logits(h, w, b)  # this frame keeps no reference: the caller frees z


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``h Wᵀ + b`` for ``h [K, c, H]``: ``[K, c, V]``."""
    flat = h.reshape(-1, h.shape[-1])
    z = torch.mm(flat, w.t()) if b is None else torch.addmm(b, flat, w.t())
    return z.view(h.shape[0], h.shape[1], -1)


def _rows_of(weight: Tensor | None, rows: slice, per_row: bool) -> Tensor | None:
    return weight[..., rows] if weight is not None and per_row else weight


def _sweep(spec: FusedSpec, target: Tensor | None, ce_weight: Tensor | None, kd_weight: Tensor | None,
           weight: Tensor, bias: Tensor | None, hidden: tuple[Tensor, ...], *, compute_grad: bool
           ) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(ce, kd, d_hidden [K, N, H], d_weight [V, H], d_bias [V])`` over all chunks; the gradients (of the
    objective weighted by ``ce_weight``/``kd_weight``, ``[K]``/``[K, K]``, per row ``[K, N]``/``[K, K, N]``
    for ``reduction="none"``) in the accumulation dtype, ``None`` unless ``compute_grad``."""
    op = spec.op
    acc = _acc_dtype(weight, *hidden)
    k = hidden[0].shape[0] if op.stacked else len(hidden)
    n = hidden[0].shape[-2]
    per_row = op.reduction == "none"
    r_ce, r_kd = row_scales(target, op.ignore_index, op.reduction, n, acc)
    w_ce = ce_weight.to(acc) * r_ce if ce_weight is not None and target is not None else None
    w_kd = kd_weight.to(acc) * r_kd if kd_weight is not None else None
    impl = get_backend(op.backend)
    ce_parts: list[Tensor] = []
    kd_parts: list[Tensor] = []
    d_hidden = d_weight = d_bias = None
    with torch.autocast(weight.device.type, enabled=False):
        w, b = _head(weight, bias, spec, acc)
        if compute_grad:
            d_hidden = torch.empty(k, n, w.shape[1], dtype=acc, device=w.device)
            d_weight = torch.zeros_like(w)
            d_bias = torch.zeros(w.shape[0], dtype=acc, device=w.device) if bias is not None else None
        for rows, h, z in _chunks(hidden, op.stacked, w, b, spec.chunk_size):
            ce, kd, g = impl.losses_and_grad(
                z, target[rows] if target is not None else None, _rows_of(w_ce, rows, per_row),
                _rows_of(w_kd, rows, per_row), temperature=op.temperature, mask=op.mask,
                detach_teacher=op.detach_teacher, ignore_index=op.ignore_index,
                reduction="none" if per_row else "sum", compute_grad=compute_grad,
            )
            del z  # only the gradient is needed from here: one [K, c, V] buffer alive, not two
            kd_parts.append(kd)
            if ce is not None:
                ce_parts.append(ce)
            if g is not None and d_hidden is not None and d_weight is not None:
                d_hidden[:, rows] = torch.matmul(g, w)
                d_weight.addmm_(g.reshape(-1, g.shape[-1]).t(), h.reshape(-1, h.shape[-1]))
                if d_bias is not None:
                    d_bias += g.sum((0, 1))
            del g
    return (_reduce(ce_parts, r_ce, per_row) if ce_parts else None, _reduce(kd_parts, r_kd, per_row),
            d_hidden, d_weight, d_bias)


def _reduce(parts: list[Tensor], scale: Tensor | float, per_row: bool) -> Tensor:
    """The chunks' row sums (or rows, concatenated for ``reduction="none"``) to the op's reduction."""
    if per_row:
        return torch.cat(parts, -1)
    return torch.stack(parts).sum(0) * scale


def _full_rows(grad: Tensor, rows: int) -> Tensor:
    """A gradient of the first ``vocab_size`` head rows, zero-padded to all ``rows`` of the head."""
    extra = rows - grad.shape[0]
    return grad if extra == 0 else torch.cat([grad, grad.new_zeros(extra, *grad.shape[1:])])


def _input_grads(spec: FusedSpec, d_hidden: Tensor, d_weight: Tensor, d_bias: Tensor | None, weight: Tensor,
                 bias: Tensor | None, hidden: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """``(d_weight, d_bias, *d_hidden)`` in the inputs' dtypes and shapes."""
    dh = d_hidden.to(hidden[0].dtype)
    return (
        _full_rows(d_weight, weight.shape[0]).to(weight.dtype),
        _full_rows(d_bias, bias.shape[0]).to(bias.dtype) if d_bias is not None and bias is not None else None,
        *((dh,) if spec.op.stacked else dh.unbind(0)),
    )


class FusedLinearDenseKDFunction(torch.autograd.Function):
    """``apply(spec, target, ce_weight, kd_weight, weight, bias, *hidden)
    -> (ce, kd, loss, d_hidden, d_weight, d_bias)``; the last three are the kept gradients of ``loss``
    (non-differentiable; empty unless ``spec.op.compute_grad``). ``ce_weight``/``kd_weight`` are ``None``
    for the unweighted :func:`fused_linear_dense_kd` (``loss`` is then 0)."""

    @staticmethod
    def forward(spec: FusedSpec, target: Tensor | None, ce_weight: Tensor | None, kd_weight: Tensor | None,
                weight: Tensor, bias: Tensor | None, *hidden: Tensor) -> tuple[Tensor, ...]:
        if target is not None and not torch.compiler.is_compiling():
            check_target_values(target, spec.vocab_size, spec.op.ignore_index)
        weighted = ce_weight is not None and kd_weight is not None
        ce, kd, dh, dw, db = _sweep(spec, target, ce_weight, kd_weight, weight, bias, hidden,
                                    compute_grad=spec.op.compute_grad and weighted)
        loss = kd.new_zeros(())
        if weighted:
            assert ce_weight is not None and kd_weight is not None
            loss = weighted_sum(kd_weight, kd) + (weighted_sum(ce_weight, ce) if ce is not None else 0.0)
        empty = kd.new_zeros(0)
        return (ce if ce is not None else empty, kd, loss, dh if dh is not None else empty,
                dw if dw is not None else empty, db if db is not None else empty)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        spec, target, ce_weight, kd_weight, weight, bias, *hidden = inputs
        ce, kd, _, dh, dw, db = output
        ctx.mark_non_differentiable(dh, dw, db)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.save_for_backward(target, ce_weight, kd_weight, ce, kd, dh, dw, db, weight, bias, *hidden)

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor | None, g_kd: Tensor | None, g_loss: Tensor | None,
                 *_kept: Tensor | None) -> tuple[Tensor | None, ...]:
        """First derivatives only. Under ``create_graph=True`` the gradients still require grad (when an
        input does) but differentiating them raises the standard "differentiate twice" error, so that
        a gradient penalty cannot be dropped silently."""
        with torch.no_grad():
            grads = _first_derivatives(ctx, g_ce, g_kd, g_loss)
        tracked = (g_ce, g_kd, g_loss, *ctx.saved_tensors)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked):
            return _refuse_second_derivative(grads)
        return grads


def _first_derivatives(ctx: Any, g_ce: Tensor | None, g_kd: Tensor | None, g_loss: Tensor | None
                       ) -> tuple[Tensor | None, ...]:
    """The gradients :class:`FusedLinearDenseKDFunction` returns (see the module docstring)."""
    spec: FusedSpec = ctx.spec
    target, ce_weight, kd_weight, ce, kd, dh, dw, db, weight, bias, *hidden = ctx.saved_tensors
    d_ce_w, d_kd_w = weight_grads(ctx.needs_input_grad, g_loss, target, ce_weight, kd_weight, ce, kd)
    d_inputs: tuple[Tensor | None, ...] = (None,) * (2 + len(hidden))
    if any(ctx.needs_input_grad[4:]):
        if g_ce is None and g_kd is None and g_loss is not None and dw.numel():
            kept = (dh * g_loss, dw * g_loss, db * g_loss if bias is not None else None)
        else:  # the per-objective outputs were used: one sweep with the cotangents as weights
            rows = spec.op.reduction == "none"
            w_ce = combine_weights(g_loss, ce_weight, g_ce, rows) if target is not None else None
            w_kd = combine_weights(g_loss, kd_weight, g_kd, rows)
            if w_kd is None:
                w_kd = kd.new_zeros(kd.shape)
            _, _, sdh, sdw, sdb = _sweep(spec, target, w_ce, w_kd, weight, bias, tuple(hidden),
                                         compute_grad=True)
            assert sdh is not None and sdw is not None
            kept = (sdh, sdw, sdb)
        d_inputs = _input_grads(spec, *kept, weight, bias, tuple(hidden))
    return (None, None, d_ce_w, d_kd_w, *d_inputs)


def _refuse_second_derivative(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """``grads`` as aliases behind a node that raises when differentiated: what
    ``torch.autograd.function.once_differentiable`` does, but also when only the saved inputs (not the
    incoming cotangents) require grad, the ``create_graph=True`` case that decorator lets through."""
    present = [i for i, g in enumerate(grads) if g is not None]
    refuse = torch._C._functions.DelayedError(
        b"trying to differentiate twice a function that was marked with @once_differentiable: "
        b"fused_linear_dense_kd has first derivatives only; for second derivatives use hdkd_fast.dense_kd "
        b"on the materialized logits", len(present))
    aliases = refuse(*[grads[i].detach().requires_grad_() for i in present])  # type: ignore[union-attr]
    out = list(grads)
    for i, alias in zip(present, aliases if isinstance(aliases, tuple) else (aliases,), strict=True):
        out[i] = alias
    return tuple(out)


class FusedLinearDenseKDFunctionWithJvp(FusedLinearDenseKDFunction):
    """:class:`FusedLinearDenseKDFunction` plus forward mode (outside ``torch.compile``, whose Dynamo
    refuses a Function with a custom ``jvp``)."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        FusedLinearDenseKDFunction.setup_context(ctx, inputs, output)
        _, target, ce_weight, kd_weight, weight, bias, *hidden = inputs
        ctx.save_for_forward(target, ce_weight, kd_weight, output[0], output[1], weight, bias, *hidden)

    @staticmethod
    def jvp(ctx: Any, _spec_t: None, _target_t: None, ce_weight_t: Tensor | None, kd_weight_t: Tensor | None,
            weight_t: Tensor | None, bias_t: Tensor | None, *hidden_t: Tensor | None) -> tuple[Tensor | None, ...]:
        r"""Tangents of ``(ce, kd, loss)``: per chunk :math:`dz = dh\,W^\top + h\,dW^\top + db` and the
        backend's JVP of the objectives; :math:`dL = \sum \alpha\,d\mathrm{ce} + \sum \gamma\,d\mathrm{kd}
        + \sum d\alpha\,\mathrm{ce} + \sum d\gamma\,\mathrm{kd}`."""
        spec: FusedSpec = ctx.spec
        target, ce_weight, kd_weight, ce, kd, weight, bias, *hidden = ctx.saved_tensors
        d_ce, d_kd = _jvp_sweep(spec, target, weight, bias, tuple(hidden), weight_t, bias_t, hidden_t)
        d_ce = d_ce if d_ce is not None else torch.zeros_like(ce)
        d_loss = loss_tangent(ce_weight, kd_weight, ce if target is not None else None, kd, d_ce, d_kd,
                              ce_weight_t, kd_weight_t)
        return d_ce, d_kd, d_loss, None, None, None


def _jvp_sweep(spec: FusedSpec, target: Tensor | None, weight: Tensor, bias: Tensor | None,
               hidden: tuple[Tensor, ...], weight_t: Tensor | None, bias_t: Tensor | None,
               hidden_t: tuple[Tensor | None, ...]) -> tuple[Tensor | None, Tensor]:
    """``(d_ce, d_kd)`` along the tangents of the hidden states and the head, chunk by chunk."""
    op = spec.op
    acc = _acc_dtype(weight, *hidden)
    n = hidden[0].shape[-2]
    per_row = op.reduction == "none"
    r_ce, r_kd = row_scales(target, op.ignore_index, op.reduction, n, acc)
    impl = get_backend(op.backend)
    tangents = tuple(t if t is not None else torch.zeros_like(x) for t, x in zip(hidden_t, hidden, strict=True))
    ce_parts: list[Tensor] = []
    kd_parts: list[Tensor] = []
    with torch.autocast(weight.device.type, enabled=False):
        w, b = _head(weight, bias, spec, acc)
        dw = weight_t[: spec.vocab_size].to(acc) if weight_t is not None else torch.zeros_like(w)
        db = bias_t[: spec.vocab_size].to(acc) if bias_t is not None else None
        pieces = zip(_chunks(hidden, op.stacked, w, b, spec.chunk_size),
                     _chunks(tangents, op.stacked, w, db, spec.chunk_size), strict=True)
        for (rows, h, z), (_, _, dz_h) in pieces:
            dz = dz_h + torch.matmul(h, dw.t())
            d_ce, d_kd = impl.jvp(z, dz, target[rows] if target is not None else None,
                                  temperature=op.temperature, mask=op.mask, detach_teacher=op.detach_teacher,
                                  ignore_index=op.ignore_index, reduction="none" if per_row else "sum")
            kd_parts.append(d_kd)
            if d_ce is not None:
                ce_parts.append(d_ce)
            del z, dz, dz_h  # as in _sweep: one chunk's logits and tangents alive at a time
    return (_reduce(ce_parts, r_ce, per_row) if ce_parts else None), _reduce(kd_parts, r_kd, per_row)


def _function_class() -> type[FusedLinearDenseKDFunction]:
    return FusedLinearDenseKDFunction if torch.compiler.is_compiling() else FusedLinearDenseKDFunctionWithJvp


class _Checked(NamedTuple):
    info: LogitsInfo
    target: Tensor | None
    vocab_size: int
    chunk_size: int


def _check(hidden: Hidden, weight: Tensor, target: Tensor | None, bias: Tensor | None, vocab_size: int | None,
           chunk_size: int | None) -> _Checked:
    """Validate the tensors and sizes; every error names the argument."""
    info = check_logits(hidden, "hidden")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor[V, H]; got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != info.classes:
        raise ValueError(f"weight must be a Tensor[V, H] with H = {info.classes} (hidden's last dimension); "
                         f"got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor; got dtype {weight.dtype}")
    if weight.device != info.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {info.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a Tensor[V] or None; got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating Tensor[V] = [{weight.shape[0]}]; "
                             f"got {bias.dtype} {list(bias.shape)}")
        if bias.device != info.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {info.device}")
    v = weight.shape[0] if vocab_size is None else check_count(vocab_size, "vocab_size")
    if v > weight.shape[0]:
        raise ValueError(f"vocab_size must be <= V = {weight.shape[0]} (weight's rows); got {vocab_size}")
    chunk = (chunk_size_for(info.num_exits, v, _acc_dtype(weight, *info.tensors)) if chunk_size is None
             else check_count(chunk_size, "chunk_size"))
    return _Checked(info, check_target(target, info), v, min(chunk, info.batch))


def _apply(hidden: Hidden, weight: Tensor, target: Tensor | None, bias: Tensor | None, ce_weight: Tensor | None,
           kd_weight: Tensor | None, *, temperature: float, pairs: PairSpec, detach_teacher: bool,
           ignore_index: int, reduction: str, vocab_size: int | None, chunk_size: int | None, backend: str
           ) -> tuple[Tensor, ...]:
    c = _check(hidden, weight, target, bias, vocab_size, chunk_size)
    inputs = (*c.info.tensors, weight, *((bias,) if bias is not None else ()))
    compute_grad = (ce_weight is not None and torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
    op = op_spec(c.info, temperature=temperature, pairs=pairs, detach_teacher=detach_teacher,
                 ignore_index=ignore_index, reduction=reduction, backend=backend, compute_grad=compute_grad)
    spec = FusedSpec(op, c.chunk_size, c.vocab_size)
    out: tuple[Tensor, ...] = _function_class().apply(spec, c.target, ce_weight, kd_weight, weight, bias,
                                                      *c.info.tensors)
    return out


def fused_linear_dense_kd(
    hidden: Hidden,
    weight: Tensor,
    target: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    temperature: float = 4.0,
    pairs: PairSpec = "dense",
    detach_teacher: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> KDLosses:
    r"""Every exit's cross-entropy and every selected pair's distillation loss of the logits
    :math:`z_k = h_k W^\top + b`, i.e. ``dense_kd_losses(hidden @ weight.T + bias, target, ...)``, computed
    one chunk of token rows at a time (module docstring) so that no more than ``chunk_size`` rows of
    ``[K, ·, V]`` logits exist at once.

    With :math:`p_k = \mathrm{softmax}(z_k / T)` over the first ``vocab_size`` columns:

    - ``ce[k]`` = :math:`\frac{1}{\max(1, |\mathcal{V}|)} \sum_{n \in \mathcal{V}} \mathrm{CE}(z_k[n], y_n)`,
      :math:`\mathcal{V}` the tokens whose label is not ``ignore_index`` (temperature 1);
    - ``kd[i, j]`` = :math:`\frac{T^2}{N} \sum_{n=1}^{N} \mathrm{KL}(p_j[n] \,\|\, p_i[n])` for each selected
      pair (student i, teacher j), 0 elsewhere.

    **Ignored tokens and the KD mean** (as in :func:`hdkd_fast.dense_kd_losses`): ``ignore_index`` only
    removes a token from the cross-entropy. Every one of the N rows, ignored or not, enters the KD sum,
    and the KD mean divides by N, not by the number of labelled tokens: the exits of a token without a
    label still agree or disagree with each other. To keep padding out of the distillation, pass only the
    rows to keep (``hidden[:, keep]``, ``target[keep]``).

    Args:
        hidden: the exits' hidden states (after the final norm), ``Tensor[K, N, H]`` or K ``Tensor[N, H]``.
        weight: the shared head ``Tensor[V, H]``.
        target: labels ``Tensor[N]`` in ``[0, vocab_size)`` or ``ignore_index``; ``None``: KD only.
        bias: ``Tensor[V]`` or ``None``. ``-inf`` entries mask vocabulary columns (probability 0 everywhere,
            gradient 0; see :func:`hdkd_fast.dense_kd_losses` on masked classes).
        vocab_size: use only the first ``vocab_size <= V`` rows of the head (padding rows after them get
            gradient 0); default V.
        chunk_size: token rows per chunk; default: as many as fit a 256 MiB budget for
            :data:`CHUNK_COPIES` fp32 ``[K, c, V]`` buffers (:func:`chunk_size_for`).
        temperature, pairs, detach_teacher, ignore_index, reduction, backend: as in
            :func:`hdkd_fast.dense_kd_losses` (``reduction="none"`` gives ``ce [K, N]``, ``kd [K, K, N]``).

    Returns:
        :class:`hdkd_fast.KDLosses` in float32 (float64 when ``hidden`` or ``weight`` is float64), whatever
        the input dtype or autocast state: the logits are computed and reduced in that precision.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (one extra chunked sweep in backward, with the
    cotangents as objective weights) and in forward mode (``torch.func.jvp``; not inside
    ``torch.compile``). No second derivatives: differentiating a ``create_graph=True`` gradient raises
    "trying to differentiate twice"; use :func:`hdkd_fast.dense_kd_losses` on materialized logits for those.
    """
    ce, kd, *_ = _apply(hidden, weight, target, bias, None, None, temperature=temperature, pairs=pairs,
                        detach_teacher=detach_teacher, ignore_index=ignore_index, reduction=reduction,
                        vocab_size=vocab_size, chunk_size=chunk_size, backend=backend)
    return KDLosses(ce if target is not None else None, kd)


class FusedLinearDenseKD(DenseKDConfig):
    r"""The weighted objective :math:`\sum_k \alpha_k \mathrm{ce}[k] + \sum_{ij} \gamma_{ij} \mathrm{kd}[i, j]`
    of :func:`fused_linear_dense_kd`, as an ``nn.Module`` configured like :class:`hdkd_fast.DenseKD`
    (same arguments, plus ``vocab_size`` and ``chunk_size``).

    ``forward(hidden, weight, target=None, bias=None, weights=None)`` takes the exits' hidden states and the
    shared head (e.g. ``lm_head.weight``, ``lm_head.bias``); ``weights`` (a :class:`hdkd_fast.LossWeights`)
    replaces ``ce_weight``/``kd_weight`` for one call. The weights are known in forward, so the forward
    sweep also accumulates the gradients of hidden, weight and bias, and backward only scales them
    (:math:`\partial L/\partial\alpha = \mathrm{ce}`, :math:`\partial L/\partial\gamma = \mathrm{kd}` for
    tensor weights). Its loss is in float32 (float64 for float64 inputs). It shares its configuration with
    :class:`hdkd_fast.DenseKD` (:class:`hdkd_fast.modules.DenseKDConfig`) but is not one: criteria that
    take logits, such as :class:`hdkd_fast.HDKD`'s, refuse it. First derivatives only, as
    :func:`fused_linear_dense_kd`: a second one raises "trying to differentiate twice".
    """

    def __init__(self, num_exits: int | None = None, *, vocab_size: int | None = None,
                 chunk_size: int | None = None, **config: Any) -> None:
        """``config``: the keyword arguments of :class:`hdkd_fast.DenseKD` (``temperature``, ``ce_weight``,
        ``kd_weight``, ``pairs``, ``detach_teacher``, ``ignore_index``, ``backend``); ``vocab_size`` and
        ``chunk_size`` as in :func:`fused_linear_dense_kd`."""
        super().__init__(num_exits, **config)
        self.vocab_size = None if vocab_size is None else check_count(vocab_size, "vocab_size")
        self.chunk_size = None if chunk_size is None else check_count(chunk_size, "chunk_size")

    def forward(self, hidden: Hidden, weight: Tensor, target: Tensor | None = None,
                bias: Tensor | None = None, weights: LossWeights | None = None) -> Tensor:
        return self.loss_and_losses(hidden, weight, target, bias, weights)[0]

    def loss_and_losses(self, hidden: Hidden, weight: Tensor, target: Tensor | None = None,
                        bias: Tensor | None = None, weights: LossWeights | None = None) -> tuple[Tensor, KDLosses]:
        """``forward``'s loss and, from the same sweep, the per-objective :class:`hdkd_fast.KDLosses` it
        weighs (differentiable too; differentiating them costs the extra sweep of
        :func:`fused_linear_dense_kd`, the loss alone does not)."""
        info = check_logits(hidden, "hidden", num_exits=self.num_exits)
        acc = _acc_dtype(weight if isinstance(weight, Tensor) else None, *info.tensors)
        ce_w, kd_w = (self.ce_weight, self.kd_weight) if weights is None else (weights.ce, weights.kd)
        ce_t, kd_t = weight_tensors(ce_w, kd_w, info, acc)
        loss = _apply(hidden, weight, target, bias, ce_t, kd_t, temperature=self.temperature, pairs=self.pairs,
                      detach_teacher=self.detach_teacher, ignore_index=self.ignore_index, reduction="mean",
                      vocab_size=self.vocab_size, chunk_size=self.chunk_size, backend=self.backend)
        return loss[2], KDLosses(loss[0] if target is not None else None, loss[1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vocab_size={self.vocab_size}, chunk_size={self.chunk_size}"

