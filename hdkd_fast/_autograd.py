"""The autograd wrapper every backend plugs into.

One ``torch.autograd.Function`` in the torch.func style (``forward`` + ``setup_context``,
``backward``, ``vmap``; ``jvp`` on the eager subclass) computes, in one backend call, the
per-objective losses, the weighted objective and its logits gradient. Outputs:
``(ce, kd, loss, grad)``, where ``grad`` is returned (not hidden in ``ctx``) so that the
torch.func transforms see every saved intermediate; it is non-differentiable.

Backward returns :class:`LogitsGradFunction`, whose forward is the fast path:
- ``dense_kd`` (only the scalar ``loss`` is used): the kept gradient scaled by ``grad_output``;
  no recomputation, no host sync;
- any other use of the per-objective outputs: one backend call with the grad-outputs as the
  objective weights.
Its own backward/jvp run only when a second derivative is requested (``create_graph=True``,
nested ``torch.func.grad``, Hessians): there the gradient map is differentiated through the
``"torch"`` backend, so second derivatives (including the mixed ∂²L/∂z∂w the bilevel ``"exact"``
hypergradient needs) are exact, while first-order gradients, ``torch.func.grad`` included,
never pay for it.

Dynamo cannot trace a Function with a custom ``jvp``; under ``torch.compile`` the base class
(same forward, backward and vmap) is used, eagerly the subclass that adds ``jvp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._pairs import PairMask
from ._validation import check_target_values
from .backends import Backend, get_backend, torch_backend


class OpSpec(NamedTuple):
    """The non-tensor arguments of the op (hashable, so torch.compile treats them as constants)."""

    backend: str
    temperature: float
    mask: PairMask
    detach_teacher: bool
    ignore_index: int
    reduction: str
    stacked: bool  # one Tensor[K, B, C] rather than K Tensor[B, C]
    compute_grad: bool  # weighted call whose logits will need a gradient: compute it in forward


def weighted_sum(weight: Tensor, values: Tensor) -> Tensor:
    """``sum(weight * values)``; per-objective weights broadcast over a trailing row axis."""
    w = weight.to(values.dtype)
    return (w.reshape(w.shape + (1,) * (values.dim() - w.dim())) * values).sum()


def combine_weights(g_loss: Tensor | None, weight: Tensor | None, g: Tensor | None, rows: bool) -> Tensor | None:
    """Objective weights seen by backward: ``g_loss * weight + g`` (missing terms dropped)."""
    terms = []
    if g_loss is not None and weight is not None:
        w = g_loss * weight
        terms.append(w.unsqueeze(-1) if rows else w)
    if g is not None:
        terms.append(g)
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


class DenseKDFunction(torch.autograd.Function):
    """``apply(spec, target, ce_weight, kd_weight, *logits) -> (ce, kd, loss, grad)``.

    ``ce_weight``/``kd_weight`` are ``None`` for the unweighted :func:`dense_kd_losses` (then
    ``loss`` is 0 and ``grad`` empty); ``ce`` is empty when ``target`` is ``None``.
    """

    @staticmethod
    def forward(spec: OpSpec, target: Tensor | None, ce_weight: Tensor | None, kd_weight: Tensor | None,
                *logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = logits[0] if spec.stacked else logits
        if target is not None and not torch.compiler.is_compiling():
            check_target_values(target, logits[0].shape[-1], spec.ignore_index)
        weighted = ce_weight is not None and kd_weight is not None
        ce, kd, grad = get_backend(spec.backend).losses_and_grad(
            x, target, ce_weight if target is not None else None, kd_weight,
            temperature=spec.temperature, mask=spec.mask, detach_teacher=spec.detach_teacher,
            ignore_index=spec.ignore_index, reduction=spec.reduction,
            compute_grad=spec.compute_grad and weighted,
        )
        loss = kd.new_zeros(())
        if weighted:
            assert kd_weight is not None and ce_weight is not None
            loss = weighted_sum(kd_weight, kd)
            if ce is not None:
                loss = loss + weighted_sum(ce_weight, ce)
        return (
            ce if ce is not None else kd.new_zeros(0),
            kd,
            loss,
            grad if grad is not None else logits[0].new_zeros(0),
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        spec, target, ce_weight, kd_weight, *logits = inputs
        ce, kd, _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.save_for_backward(target, ce_weight, kd_weight, ce, kd, grad, *logits)

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor | None, g_kd: Tensor | None, g_loss: Tensor | None,
                 _g_grad: Tensor | None) -> tuple[Tensor | None, ...]:
        spec: OpSpec = ctx.spec
        target, ce_weight, kd_weight, ce, kd, grad, *logits = ctx.saved_tensors
        d_ce_w, d_kd_w = weight_grads(ctx.needs_input_grad, g_loss, target, ce_weight, kd_weight, ce, kd)
        d_logits: tuple[Tensor | None, ...] = (None,) * len(logits)
        if any(ctx.needs_input_grad[4:]):
            g = grad_function_class().apply(spec, target, ce_weight, kd_weight, g_loss, g_ce, g_kd, grad, *logits)
            d_logits = (g,) if spec.stacked else g.unbind(0)
        return (None, None, d_ce_w, d_kd_w, *d_logits)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], spec: OpSpec, *args: Tensor | None
             ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """Batching rule: the op once per slice of the vmapped dimension, outputs stacked on dim 0."""
        return _apply_per_slice(function_class(), info, in_dims, spec, args), (0, 0, 0, 0)


def weight_grads(needs_input_grad: tuple[bool, ...], g_loss: Tensor | None, target: Tensor | None,
                 ce_weight: Tensor | None, kd_weight: Tensor | None, ce: Tensor, kd: Tensor
                 ) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``g_loss · loss`` w.r.t. the objective weights (inputs 2 and 3): ``g_loss · ce`` (zeros
    without a target) and ``g_loss · kd``, each ``None`` where not needed."""
    d_ce_w = d_kd_w = None
    if g_loss is not None:
        if needs_input_grad[2] and ce_weight is not None:
            d_ce_w = (g_loss * ce).to(ce_weight.dtype) if target is not None else torch.zeros_like(ce_weight)
        if needs_input_grad[3] and kd_weight is not None:
            d_kd_w = (g_loss * kd).to(kd_weight.dtype)
    return d_ce_w, d_kd_w


def _objective_grad(spec: OpSpec, target: Tensor | None, ce_weight: Tensor | None, kd_weight: Tensor | None,
                    g_loss: Tensor | None, g_ce: Tensor | None, g_kd: Tensor | None, logits: tuple[Tensor, ...],
                    impl: Backend) -> Tensor:
    """Gradient w.r.t. the stacked logits of ``g_loss·loss + <g_ce, ce> + <g_kd, kd>``: one backend call
    with the objective weights ``g_loss·weight + g``."""
    rows = spec.reduction == "none"
    w_ce = combine_weights(g_loss, ce_weight, g_ce, rows) if target is not None else None
    w_kd = combine_weights(g_loss, kd_weight, g_kd, rows)
    first = logits[0]
    if w_ce is None and w_kd is None:
        return first.new_zeros(first.shape if spec.stacked else (len(logits), *first.shape))
    _, _, g = impl.losses_and_grad(
        first if spec.stacked else logits, target, w_ce, w_kd,
        temperature=spec.temperature, mask=spec.mask, detach_teacher=spec.detach_teacher,
        ignore_index=spec.ignore_index, reduction=spec.reduction, compute_grad=True,
    )
    assert g is not None
    return g


_GRAD_DIFF_INPUTS = slice(2, 7)  # ce_weight, kd_weight, g_loss, g_ce, g_kd; the logits follow the kept grad


def _differentiable_grad_map(ctx: Any) -> tuple[list[Tensor], Callable[..., Tensor], list[int], int]:
    """The gradient map as a pure function of its differentiable, non-None inputs (for torch.func)."""
    spec: OpSpec = ctx.spec
    target, *rest = ctx.saved_tensors
    inputs = [*rest[:5], *rest[6:]]  # drop the kept gradient
    present = [i for i, t in enumerate(inputs) if t is not None]

    def grad_map(*values: Tensor) -> Tensor:
        full: list[Tensor | None] = list(inputs)
        for i, v in zip(present, values, strict=True):
            full[i] = v
        ce_w, kd_w, g_loss, g_ce, g_kd, *logits = full
        exits = tuple(t for t in logits if t is not None)  # the logits are always present
        return _objective_grad(spec, target, ce_w, kd_w, g_loss, g_ce, g_kd, exits, torch_backend)

    return [inputs[i] for i in present], grad_map, present, len(inputs)


def _scatter(present: list[int], n: int, values: tuple[Tensor, ...]) -> list[Tensor | None]:
    out: list[Tensor | None] = [None] * n
    for i, v in zip(present, values, strict=True):
        out[i] = v
    return out


class LogitsGradFunction(torch.autograd.Function):
    """``apply(spec, target, ce_weight, kd_weight, g_loss, g_ce, g_kd, kept_grad, *logits) -> Tensor[K, B, C]``:
    the logits gradient that :class:`DenseKDFunction` returns from backward.

    Forward is the fast path: the kept gradient scaled by ``g_loss`` when only the weighted loss
    was used, else one call of the selected backend. Only when a second derivative is requested
    (``create_graph=True``, nested ``torch.func.grad``, ``jacfwd(jacrev)``) are this Function's
    ``backward``/``jvp`` run: the VJP/JVP of the same map written with the differentiable
    ``"torch"`` backend, so second derivatives are exact (teacher terms and the mixed ∂²L/∂z∂w
    included) while first-order gradients never pay for differentiability.
    """

    @staticmethod
    def forward(spec: OpSpec, target: Tensor | None, ce_weight: Tensor | None, kd_weight: Tensor | None,
                g_loss: Tensor | None, g_ce: Tensor | None, g_kd: Tensor | None, kept: Tensor,
                *logits: Tensor) -> Tensor:
        if g_ce is None and g_kd is None and g_loss is not None and kept.numel():
            return kept * g_loss
        return _objective_grad(spec, target, ce_weight, kd_weight, g_loss, g_ce, g_kd, logits,
                               get_backend(spec.backend))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.spec = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        primals, grad_map, present, n = _differentiable_grad_map(ctx)
        vjp_fn = torch.func.vjp(grad_map, *primals)[1]
        grads = _scatter(present, n, vjp_fn(grad_output))
        return (None, None, *grads[:5], None, *grads[5:])

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], spec: OpSpec, *args: Tensor | None
             ) -> tuple[Tensor, int]:
        out = _apply_per_slice(grad_function_class(), info, in_dims, spec, args)
        return out[0], 0


class LogitsGradFunctionWithJvp(LogitsGradFunction):
    """:class:`LogitsGradFunction` plus forward mode (forward-over-reverse), outside ``torch.compile``."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        LogitsGradFunction.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def jvp(ctx: Any, _spec_t: None, _target_t: None, *tangents: Tensor | None) -> Tensor:
        primals, grad_map, present, _ = _differentiable_grad_map(ctx)
        diff_tangents = [*tangents[:5], *tangents[6:]]  # drop the kept gradient's tangent
        tans = [diff_tangents[i] if diff_tangents[i] is not None else torch.zeros_like(p)
                for i, p in zip(present, primals, strict=True)]
        tangent_out: Tensor = torch.func.jvp(grad_map, tuple(primals), tuple(tans))[1]
        return tangent_out


def _backend_jvp(spec: OpSpec, target: Tensor | None, tensors: tuple[Tensor, ...], impl: Backend
                 ) -> tuple[Tensor, Tensor]:
    """``(d_ce, d_kd)`` of one backend's JVP; ``tensors`` = the logits followed by their tangents."""
    n = len(tensors) // 2
    logits, tangents = tensors[:n], tensors[n:]
    d_ce, d_kd = impl.jvp(
        logits[0] if spec.stacked else logits, tangents[0] if spec.stacked else tangents, target,
        temperature=spec.temperature, mask=spec.mask, detach_teacher=spec.detach_teacher,
        ignore_index=spec.ignore_index, reduction=spec.reduction,
    )
    return (d_ce if d_ce is not None else d_kd.new_zeros(0)), d_kd


class ObjectivesJvpFunction(torch.autograd.Function):
    """``apply(spec, target, *logits, *tangents) -> (d_ce, d_kd)``: the selected backend's JVP of
    every objective, wrapped so that it composes like the other ops: batched (``vmap``, as in
    ``jacfwd``/``hessian``) by slicing, and differentiable (reverse-over-forward) through the
    ``"torch"`` backend's JVP, which is linear in the tangents and smooth in the logits."""

    @staticmethod
    def forward(spec: OpSpec, target: Tensor | None, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        return _backend_jvp(spec, target, tensors, get_backend(spec.backend))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.spec = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor, g_kd: Tensor) -> tuple[Tensor | None, ...]:
        spec: OpSpec = ctx.spec
        target, *tensors = ctx.saved_tensors
        fn = lambda *ts: _backend_jvp(spec, target, ts, torch_backend)  # noqa: E731
        vjp_fn = torch.func.vjp(fn, *tensors)[1]
        return (None, None, *vjp_fn((g_ce, g_kd)))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], spec: OpSpec, *args: Tensor | None
             ) -> tuple[tuple[Tensor, ...], tuple[int, int]]:
        return _apply_per_slice(ObjectivesJvpFunction, info, in_dims, spec, args), (0, 0)


def _apply_per_slice(fn: type[torch.autograd.Function], info: Any, in_dims: tuple[int | None, ...], spec: OpSpec,
                     args: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
    """Batching rule shared by both Functions: apply once per slice of the vmapped dimension and
    stack every output on dim 0."""
    outputs = []
    for i in range(info.batch_size):
        sliced = [a if d is None or a is None else a.select(d, i) for a, d in zip(args, in_dims[1:], strict=True)]
        out = fn.apply(spec, *sliced)
        outputs.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.stack(out) for out in zip(*outputs, strict=True))


class DenseKDFunctionWithJvp(DenseKDFunction):
    """:class:`DenseKDFunction` plus forward-mode AD (used outside ``torch.compile``)."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        DenseKDFunction.setup_context(ctx, inputs, output)
        _, target, ce_weight, kd_weight, *logits = inputs
        ce, kd, _, _ = output
        ctx.save_for_forward(target, ce_weight, kd_weight, ce, kd, *logits)

    @staticmethod
    def jvp(ctx: Any, _spec_t: None, _target_t: Tensor | None, ce_weight_t: Tensor | None,
            kd_weight_t: Tensor | None, *logits_t: Tensor | None) -> tuple[Tensor | None, ...]:
        r"""Tangents of ``(ce, kd, loss)``: the objectives' JVP along the logit tangents, and
        :math:`dL = \sum \alpha\, d\mathrm{ce} + \sum \gamma\, d\mathrm{kd} + \sum d\alpha\,\mathrm{ce}
        + \sum d\gamma\,\mathrm{kd}`."""
        spec: OpSpec = ctx.spec
        target, ce_weight, kd_weight, ce, kd, *logits = ctx.saved_tensors
        d_ce, d_kd = torch.zeros_like(ce), torch.zeros_like(kd)
        if any(t is not None for t in logits_t):
            tangents = [t if t is not None else torch.zeros_like(x) for t, x in zip(logits_t, logits, strict=True)]
            jvp_ce, d_kd = ObjectivesJvpFunction.apply(spec, target, *logits, *tangents)
            d_ce = jvp_ce if target is not None else d_ce
        d_loss = loss_tangent(ce_weight, kd_weight, ce if target is not None else None, kd, d_ce, d_kd,
                              ce_weight_t, kd_weight_t)
        return d_ce, d_kd, d_loss, None


def loss_tangent(ce_weight: Tensor | None, kd_weight: Tensor | None, ce: Tensor | None, kd: Tensor, d_ce: Tensor,
                 d_kd: Tensor, ce_weight_t: Tensor | None, kd_weight_t: Tensor | None) -> Tensor:
    r""":math:`dL = \sum \alpha\, d\mathrm{ce} + \sum \gamma\, d\mathrm{kd} + \sum d\alpha\,\mathrm{ce}
    + \sum d\gamma\,\mathrm{kd}` (0 for an unweighted call; the CE terms only with a target, ``ce``)."""
    d_loss = torch.zeros((), dtype=kd.dtype, device=kd.device)
    if ce_weight is not None and kd_weight is not None:
        d_loss = d_loss + weighted_sum(kd_weight, d_kd)
        if kd_weight_t is not None:
            d_loss = d_loss + weighted_sum(kd_weight_t, kd)
        if ce is not None:
            d_loss = d_loss + weighted_sum(ce_weight, d_ce)
            if ce_weight_t is not None:
                d_loss = d_loss + weighted_sum(ce_weight_t, ce)
    return d_loss


def function_class() -> type[DenseKDFunction]:
    """The Function to apply: without the custom ``jvp`` while torch.compile traces."""
    return DenseKDFunction if torch.compiler.is_compiling() else DenseKDFunctionWithJvp


def grad_function_class() -> type[LogitsGradFunction]:
    """The logits-gradient Function: without the custom ``jvp`` while torch.compile traces."""
    return LogitsGradFunction if torch.compiler.is_compiling() else LogitsGradFunctionWithJvp
