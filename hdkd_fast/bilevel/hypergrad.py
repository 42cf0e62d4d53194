r"""Functional core of the bilevel step: the virtual SGD step and the weight hypergradient.

Notation. θ: the trainable parameters; :math:`l(\theta) \in \mathbb{R}^n` the objective vector on the
train batch (K cross-entropies, then the selected distillation pairs, see
:mod:`hdkd_fast.bilevel.weights`); :math:`w \in \mathbb{R}^n` their weights;
:math:`L_\mathrm{train}(\theta, w) = \langle w, l(\theta)\rangle`; :math:`L_\mathrm{val}` the validation
objective.

Virtual step (the update the optimizer would make, per parameter tensor, SGD semantics):

.. math::
    g = \nabla_\theta L_\mathrm{train}(\theta, w) \;(\text{negated if maximize}) + \lambda\theta, \quad
    b' = \begin{cases} g & \text{no momentum buffer yet} \\ \mu b + (1 - \tau) g & \text{else} \end{cases}, \quad
    d = \begin{cases} g + \mu b' & \text{nesterov} \\ b' & \text{momentum} \ne 0 \\ g & \text{else} \end{cases}, \quad
    \theta' = \theta - \eta\, d.

Only ``g`` depends on ``w``, linearly, so :math:`\partial\theta'/\partial w_o = -\eta\, c\, \nabla_\theta l_o(\theta)`
with the scalar :math:`c = \pm(1 \text{ or } 1-\tau)(1 + \mu \text{ if nesterov})` of
:meth:`InnerRule.tangent_scale`. Hence, with :math:`v = \nabla_{\theta'} L_\mathrm{val}(\theta')` and the
tangent :math:`u = -\eta c\, v` (per parameter tensor),

.. math::
    \frac{\partial L_\mathrm{val}}{\partial w_o} = \langle \nabla_\theta l_o(\theta), u\rangle
    = \frac{d}{dt} l_o(\theta + t u)\Big|_{t=0},

the directional derivative of the **whole objective vector** along ``u``: one forward-mode pass
(``"jvp"``, about the cost of a forward and backward) or one plain forward (``"fd"``), whatever the number
of objectives. Since :math:`l` depends on θ only through the logits z,
:math:`\frac{d}{dt} l(\theta + t u) = \partial_z l \cdot \dot z` with :math:`\dot z = J_z(\theta)\, u`; ``"fd"``
takes :math:`\dot z \approx (z(\theta + \varepsilon u) - z(\theta)) / \varepsilon` from the gradient pass's
logits :math:`z(\theta)` and one more forward, and applies the loss's exact JVP to it (the error is in
:math:`\dot z` only: the truncation, :math:`O(\varepsilon)`, and the rounding of z,
:math:`O(\text{eps}/\varepsilon)`; the perturbation's norm :math:`\varepsilon\lVert u\rVert =
\sqrt{\text{eps}}` of the dtype balances them, :data:`FD_STEP`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.nn import functional as F

from .._pairs import PairSpec
from .._types import KDLosses, LossWeights
from .._validation import Logits, accumulation_dtype, check_choice, check_logits, check_target, check_target_values
from ..functional import dense_kd, dense_kd_losses

HYPERGRAD_MODES = ("auto", "jvp", "fd", "exact")
STEP_LENGTHS = ("free", "fixed")
"""How the look-ahead's virtual step may change with w: its length too (``"free"``, the plain one-step
look-ahead), or only its direction (``"fixed"``; :func:`weight_hypergradient`)."""
FD_STEP = 1.0
r"""Norm of the finite-difference perturbation in units of :math:`\sqrt{\text{eps}}`, eps the machine epsilon
of the coarser of the logits' and the parameters' dtypes: :math:`\varepsilon\lVert u\rVert =`
``FD_STEP``·√eps (float32: 3.5e-4, float64: 1.5e-8). A one-sided difference errs by the truncation,
∝ ε·(curvature along u), plus the rounding of z, ∝ eps·|z| / ε; the usual step √eps·(scale) balances
the two. Measured against ``"exact"`` in float64 (docs/hdkd.md, "Hypergradient modes"), the best perturbation
lay within ×0.3–×7 of √eps on a small tanh MLP (float32 and float64) and on ``msdnet-tiny`` with
BatchNorm (float32), so the scale is 1; the textbook scale 1 + ‖θ‖ would be ×66 too large on
``msdnet-tiny``, whose batch statistics, not its parameter norm, set the curvature. Relative error of the
hypergradient with this step (issue 23 item 5; 20 seeds of the tests' MLP, SGD lr 0.5, momentum 0.9,
weight decay 1e-3): float64 median 1.7e-8, max 5.5e-8 (was 1.1e-3 / 4.7e-3 with the old fixed norm
1e-2); float32 median 3.1e-4, max 1.5e-3 (was 1.1e-3 / 4.7e-3; float32 ``"exact"`` itself errs by
2.6e-7 / 1.2e-6). ``msdnet-tiny`` in float32 (B = 64, 4 seeds, BatchNorm in training mode): 2.3e-3 to
1.7e-2 against float64 ``"jvp"`` (was 1.1e-2 to 1.2e-1)."""
FD_DTYPES = (torch.float32, torch.float64)
"""Logit dtypes precise enough for ``"fd"`` (``"auto"`` takes ``"jvp"`` for others, e.g. bf16 autocast,
whose rounding of z, about 0.4 % of |z|, leaves √eps ≈ 9 % error in a one-sided difference at best)."""

Forward = Callable[[dict[str, Tensor], Tensor], Any]
"""``forward(params, x) -> output``: the model evaluated with ``params`` substituted (functional call); the
output is what the :class:`Objectives` take: logits for :class:`ObjectiveSpec`."""
ValObjective = Callable[[Tensor], Tensor]
"""``val_objective(ce) -> scalar``: the validation objective from the validation cross-entropies ``ce[K]``."""


class Objectives(Protocol):
    """What the bilevel step needs to know of a model's output: its objectives, in closed form.

    ``output`` is what the model's forward returns: K exits' logits for :class:`ObjectiveSpec`, or the
    exits' hidden states and their shared head (:class:`hdkd_fast.bilevel.shared_head.SharedHeadObjectives`).
    Every method but :meth:`weighted` may be called inside ``torch.autograd.forward_ad.dual_level`` with a
    dual output, and must then return dual losses.
    """

    @property
    def pairs(self) -> PairSpec:
        """The selected (student, teacher) pairs."""
        ...

    @property
    def detach_teacher(self) -> bool:
        """Whether a pair's gradient reaches only its student."""
        ...

    def losses(self, output: Any, target: Tensor) -> KDLosses:
        """Every objective, ``ce [K]`` and ``kd [K, K]`` (0 outside the pairs)."""
        ...

    def weighted(self, output: Any, target: Tensor, weights: LossWeights) -> Tensor:
        """:math:`\\langle w, l\\rangle`, differentiable w.r.t. the output (and the weights for ``"exact"``)."""
        ...

    def cross_entropy(self, output: Any, target: Tensor) -> Tensor:
        """``ce [K]`` alone, differentiable w.r.t. the output (the validation objective)."""
        ...

    def detach(self, output: Any) -> Any:
        """``output`` without its graph."""
        ...

    def dtype(self, output: Any) -> torch.dtype:
        """The floating dtype of ``output`` (``"auto"`` and ``"fd"`` decide by it)."""
        ...

    def fd_dual(self, base: Any, moved: Any, eps: float) -> Any:
        """Inside a ``dual_level``: ``base`` with the tangent ``(moved - base) / eps`` (the ``"fd"`` step)."""
        ...


def difference_dual(base: Tensor, moved: Tensor, eps: float) -> Tensor:
    """Inside a ``dual_level``: ``base`` with the one-sided difference ``(moved - base) / eps`` as tangent."""
    return fwAD.make_dual(base, (moved - base) / eps)


class ObjectiveSpec(NamedTuple):
    """The criterion's configuration: the arguments of :func:`hdkd_fast.dense_kd_losses`. The
    :class:`Objectives` of a model that returns K exits' logits."""

    temperature: float = 4.0
    pairs: PairSpec = "dense"
    detach_teacher: bool = True
    ignore_index: int = -100
    backend: str = "auto"

    def losses(self, logits: Logits, target: Tensor) -> KDLosses:
        """Every objective of ``logits`` in one fused call."""
        return dense_kd_losses(
            logits, target, temperature=self.temperature, pairs=self.pairs, detach_teacher=self.detach_teacher,
            ignore_index=self.ignore_index, backend=self.backend,
        )

    def weighted(self, logits: Logits, target: Tensor, weights: LossWeights) -> Tensor:
        r""":math:`\langle w, l\rangle` in one fused call that also forms the logits gradient
        (:func:`hdkd_fast.dense_kd`); differentiable w.r.t. the weights, twice w.r.t. the logits."""
        return dense_kd(
            logits, target, ce_weight=weights.ce, kd_weight=weights.kd, temperature=self.temperature,
            pairs=self.pairs, detach_teacher=self.detach_teacher, ignore_index=self.ignore_index,
            backend=self.backend,
        )

    def cross_entropy(self, logits: Logits, target: Tensor) -> Tensor:
        """``ce[K]`` alone (mean over the rows whose label is not ``ignore_index``; 0 if there are none),
        without the pairwise terms: the validation objective needs nothing else."""
        info = check_logits(logits)
        check_target(target, info)
        check_target_values(target, info.classes, self.ignore_index)
        z = torch.stack(info.tensors[0].unbind(0) if info.stacked else info.tensors)
        z = z.to(accumulation_dtype(z.dtype))
        k, b, c = z.shape
        nll = F.cross_entropy(z.reshape(k * b, c), target.repeat(k), ignore_index=self.ignore_index,
                              reduction="none").view(k, b)
        return nll.sum(1) / (target != self.ignore_index).sum().clamp(min=1)

    def detach(self, output: Logits) -> Logits:
        return output.detach() if isinstance(output, Tensor) else [z.detach() for z in output]

    def dtype(self, output: Logits) -> torch.dtype:
        return (output if isinstance(output, Tensor) else output[0]).dtype

    def fd_dual(self, base: Logits, moved: Logits, eps: float) -> Logits:
        if isinstance(base, Tensor):
            assert isinstance(moved, Tensor)
            return difference_dual(base, moved, eps)
        return [difference_dual(b, m, eps) for b, m in zip(base, moved, strict=True)]


class InnerRule(NamedTuple):
    """How the optimizer updates one parameter tensor (``torch.optim.SGD`` semantics)."""

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    momentum_buffer: Tensor | None = None

    def direction(self, param: Tensor, grad: Tensor) -> Tensor:
        """The update direction ``d`` (``θ' = θ − lr · d``), differentiable in ``grad``."""
        d = -grad if self.maximize else grad
        if self.weight_decay != 0:
            d = d + self.weight_decay * param
        if self.momentum != 0:
            buf = d if self.momentum_buffer is None else (
                self.momentum * self.momentum_buffer + (1 - self.dampening) * d)
            d = d + self.momentum * buf if self.nesterov else buf
        return d

    def tangent_scale(self) -> float:
        """``−lr · ∂d/∂grad``: the factor that maps ``v`` to the tangent ``u`` of this tensor."""
        c = 1.0 if self.momentum == 0 or self.momentum_buffer is None else 1.0 - self.dampening
        if self.momentum != 0 and self.nesterov:
            c = 1.0 + self.momentum * c
        return -self.lr * (-c if self.maximize else c)


def inner_rules(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> dict[str, InnerRule]:
    """The :class:`InnerRule` of every tensor of ``params`` (name → tensor) that ``optimizer`` updates.

    ``η`` is each param group's current ``lr``. For :class:`torch.optim.SGD` the group's momentum,
    dampening, nesterov, maximize, weight decay and the current momentum buffer are used as its real
    step would use them; any other optimizer is modelled by a plain SGD step with its learning rate
    (the usual DARTS-style approximation). Tensors the optimizer does not hold are left out.
    """
    names = {id(p): n for n, p in params.items()}
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    rules: dict[str, InnerRule] = {}
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or not p.requires_grad:
                continue
            if is_sgd:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                rules[name] = InnerRule(
                    lr=lr, weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
                    maximize=bool(group["maximize"]), momentum_buffer=None if buf is None else buf.detach(),
                )
            else:
                rules[name] = InnerRule(lr=lr)
    return rules


def virtual_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None],
                 rules: Mapping[str, InnerRule]) -> dict[str, Tensor]:
    """``θ' = θ − lr · d(θ, g)`` per tensor (unchanged where the gradient is ``None``, as the optimizer
    skips it). Differentiable: the graph of ``grads`` is kept when they have one. Without a graph the
    tensors that share a rule's hyperparameters are stepped together by ``torch._foreach_*`` ops (one
    kernel per op and group instead of one per tensor)."""
    if any(g is not None and g.requires_grad for g in grads.values()):
        out = {}
        for name, p in params.items():
            g = grads[name]
            out[name] = p if g is None else p - rules[name].lr * rules[name].direction(p, g)
        return out
    groups: dict[tuple[float, float, float, float, bool, bool, bool], list[str]] = {}
    for name in params:
        if grads[name] is not None:
            r = rules[name]
            key = (r.lr, r.weight_decay, r.momentum, r.dampening, r.nesterov, r.maximize, r.momentum_buffer is None)
            groups.setdefault(key, []).append(name)
    out = dict(params)
    for (lr, weight_decay, momentum, dampening, nesterov, maximize, no_buffer), names in groups.items():
        tensors = [params[n] for n in names]
        d = [g for g in (grads[n] for n in names) if g is not None]
        if maximize:
            d = list(torch._foreach_neg(d))
        if weight_decay != 0:
            d = list(torch._foreach_add(d, tensors, alpha=weight_decay))
        if momentum != 0:
            buffers = [b for b in (rules[n].momentum_buffer for n in names) if b is not None]
            buf = d if no_buffer else list(torch._foreach_add(torch._foreach_mul(buffers, momentum), d,
                                                              alpha=1 - dampening))
            d = list(torch._foreach_add(d, buf, alpha=momentum)) if nesterov else buf
        out.update(zip(names, torch._foreach_add(tensors, d, alpha=-lr), strict=True))
    return out


class _RngReplay:
    """Restores the RNG state captured at construction, so that every forward on the train batch draws
    the same random numbers (e.g. one Dropout mask for the gradient pass and the JVP/FD passes)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def __call__(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class Hypergradient(NamedTuple):
    """Result of :func:`weight_hypergradient` (every tensor detached)."""

    weights: LossWeights  # ∂L_val/∂w: ce [K], kd [K, K] (0 outside the pairs)
    val_ce: Tensor  # [K] validation cross-entropies at θ'
    val_loss: Tensor  # L_val(θ')
    train_loss: Tensor  # L_train(θ, w)
    train_grads: dict[str, Tensor | None]  # ∇θ L_train(θ, w) (None where unused), as the optimizer's .grad
    train_output: Any  # the model's output z(θ; x) of the gradient pass (logits for ObjectiveSpec), detached


def weight_hypergradient(
    forward: Forward,
    params: Mapping[str, Tensor],
    rules: Mapping[str, InnerRule],
    weights: LossWeights,
    spec: Objectives,
    val_objective: ValObjective,
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    mode: str = "auto",
    train_forward: Forward | None = None,
    step_length: str = "free",
) -> Hypergradient:
    r""":math:`\partial L_\mathrm{val}(\theta'(w)) / \partial w` of one virtual step (module docstring).

    1. gradient pass: :math:`g = \nabla_\theta \langle w, l(\theta; x, y)\rangle`;
    2. virtual step :math:`\theta'` (:func:`virtual_step` with ``rules``);
    3. validation pass: :math:`L_\mathrm{val} = ` ``val_objective(ce(θ'; x_val, y_val))`` and, except for
       ``"exact"``, :math:`v = \nabla_{\theta'} L_\mathrm{val}`, :math:`u = -\eta c\, v`;
    4. the hypergradient:

       - ``"jvp"``: forward mode (dual numbers) of :math:`\theta \mapsto l(\theta)` along ``u`` (exact);
       - ``"fd"``: the loss's exact JVP along :math:`\dot z = (z(\theta + \varepsilon u) - z(\theta)) /
         \varepsilon`, :math:`z(\theta)` the gradient pass's logits, :math:`\varepsilon = \sqrt{\text{eps}} /
         \lVert u\rVert` (a perturbation of norm √eps of the dtype, :data:`FD_STEP`): one forward without
         a graph;
       - ``"exact"``: reverse mode through steps 1-3 (``create_graph=True``): the reference;
       - ``"auto"``: ``"fd"`` when the gradient pass's logits are float32 or float64, else ``"jvp"``.

    ``step_length="fixed"`` differentiates the virtual step with its length held: the w-dependent part of
    the displacement is :math:`D g(w)\,\lVert g(w_0)\rVert / \lVert g(w)\rVert` (``D`` the per-tensor
    tangent scales, :math:`w_0` the current weights), so that

    .. math::
        \frac{\partial L_\mathrm{val}}{\partial w_o} = \langle \nabla l_o, u\rangle
        - \frac{\langle g, u\rangle}{\lVert g\rVert^2} \langle \nabla l_o, g\rangle ,

    the plain hypergradient less its step-length component: :math:`\sum_o w_o\, \partial L_\mathrm{val}/
    \partial w_o = 0`, so a uniform rescaling of the weights (a larger step, which a one-step look-ahead
    always rewards while the step is below its best length) earns nothing, and only the direction of the
    step is chosen. It costs one more directional derivative (``"fd"``: one more forward) along ``g``.

    Only the tensors of ``params`` that have a rule are differentiated and stepped; a leaf that requires
    grad (e.g. a module's own parameter) is differentiated as it is, anything else through a detached
    copy. ``train_forward`` (default ``forward``) runs the gradient pass, e.g. the module itself with its
    real buffers when ``params`` are its parameters and that pass doubles as the real step's forward.
    Every train-batch forward draws the random numbers of the gradient pass (one Dropout mask); on
    return the global RNG state is the one after the gradient pass, as if only that forward had run.
    Wrap the call in ``torch.random.fork_rng`` (and clone the buffers in ``forward``) for no side effect
    at all.
    """
    check_choice(mode, "hypergrad", HYPERGRAD_MODES)
    check_choice(step_length, "step_length", STEP_LENGTHS)
    exact = mode == "exact"
    with torch.enable_grad():
        replay = _RngReplay(x.device)
        w = LossWeights(weights.ce.detach().requires_grad_(exact), weights.kd.detach().requires_grad_(exact))
        theta = {n: p if p.is_leaf and p.requires_grad else p.detach().requires_grad_()
                 for n, p in params.items() if n in rules}
        names = list(theta)

        train_output = (train_forward or forward)(theta, x)
        train_loss = spec.weighted(train_output, y, w)
        grads = torch.autograd.grad(train_loss, [theta[n] for n in names], create_graph=exact, allow_unused=True)
        base = spec.detach(train_output)
        if mode == "auto":
            mode = "fd" if spec.dtype(base) in FD_DTYPES else "jvp"
        after_train = _RngReplay(x.device)
        try:
            d_ce, d_kd, val_ce, val_loss = _hypergradient_from_step(
                forward, theta, dict(zip(names, grads, strict=True)), rules, w, spec, val_objective,
                x, y, x_val, y_val, base, replay, mode, step_length == "fixed")
        finally:
            after_train()
    train_grads: dict[str, Tensor | None] = {
        n: None if g is None else g.detach() for n, g in zip(names, grads, strict=True)}
    return Hypergradient(LossWeights(d_ce.detach(), d_kd.detach()), val_ce.detach(), val_loss.detach(),
                         train_loss.detach(), train_grads, base)


def _hypergradient_from_step(forward: Forward, theta: dict[str, Tensor], grads: dict[str, Tensor | None],
                             rules: Mapping[str, InnerRule], w: LossWeights, spec: Objectives,
                             val_objective: ValObjective, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor,
                             base: Any, replay: _RngReplay, mode: str, fixed_length: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 2-4 of :func:`weight_hypergradient`: ``(∂L_val/∂w_ce, ∂L_val/∂w_kd, val_ce, L_val)``."""
    exact = mode == "exact"
    names = list(theta)
    if exact:
        if fixed_length:  # g ‖g₀‖ / ‖g‖: the same value, differentiated with its length held
            norm = _norm([g for g in grads.values() if g is not None])
            grads = {n: None if g is None else g * (norm.detach() / norm) for n, g in grads.items()}
        stepped = virtual_step(theta, grads, rules)
    else:
        with torch.no_grad():
            stepped = {n: t.requires_grad_() for n, t in virtual_step(theta, grads, rules).items()}
    val_ce = spec.cross_entropy(forward(stepped, x_val), y_val)
    val_loss = val_objective(val_ce)

    if exact:
        d_ce, d_kd = torch.autograd.grad(val_loss, [w.ce, w.kd], allow_unused=True, materialize_grads=True)
    else:
        v = torch.autograd.grad(val_loss, [stepped[n] for n in names], allow_unused=True,
                                materialize_grads=True)
        primal = {n: theta[n].detach() for n in names}
        tangent = dict(zip(names, torch._foreach_mul(list(v), [rules[n].tangent_scale() for n in names]),
                           strict=True))
        d_ce, d_kd = _directional_derivative(forward, spec, primal, tangent, base, x, y, replay, mode)
        if fixed_length:  # less the step-length component (weight_hypergradient's docstring)
            g = {n: torch.zeros_like(primal[n]) if (t := grads[n]) is None else t.detach() for n in names}
            g_sq, g_dot_u = torch.stack([  # ‖g‖² and ⟨g, u⟩ in float64, read in one host sync
                torch.stack([(g[n].double() * other[n].double()).sum() for n in names]).sum()
                for other in (g, tangent)]).tolist()
            if g_sq > 0 and math.isfinite(g_sq):
                along_g = _directional_derivative(forward, spec, primal, g, base, x, y, replay, mode)
                d_ce, d_kd = (d - (g_dot_u / g_sq) * e for d, e in zip((d_ce, d_kd), along_g, strict=True))
    return d_ce, d_kd, val_ce, val_loss


def _norm(tensors: list[Tensor]) -> Tensor:
    """The Euclidean norm of all ``tensors`` together (0-dim; differentiable)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _directional_derivative(forward: Forward, spec: Objectives, primal: dict[str, Tensor],
                            tangent: dict[str, Tensor], base: Any, x: Tensor, y: Tensor, replay: _RngReplay,
                            mode: str) -> tuple[Tensor, Tensor]:
    r"""``d/dt (ce, kd)(θ + t u)`` at 0 as seen by the training gradient (the op's JVP honours
    ``detach_teacher``: with a detached teacher ``kd[i, j]`` moves with the student's logits only).

    ``"jvp"``: one forward-mode pass through the model (``torch.autograd.forward_ad``, the engine of
    ``torch.func.jvp``). ``"fd"``: the logits' tangent :math:`\dot z = (z(\theta + \varepsilon u) -
    z(\theta)) / \varepsilon` with :math:`\varepsilon = \text{FD\_STEP}\sqrt{\text{eps}} / \lVert u\rVert`
    (eps of the coarser of the logits' and parameters' dtypes) and ``base`` = z(θ), one forward without a
    graph; then the same forward-mode pass through the loss alone.
    """

    def output(p: dict[str, Tensor]) -> Any:
        replay()
        return forward(p, x)

    with torch.no_grad():
        if mode == "jvp":  # torch.func.jvp's engine without functorch's per-op wrapping (~1.6× faster here)
            with fwAD.dual_level():
                return _loss_tangents(spec, output({n: fwAD.make_dual(p, tangent[n]) for n, p in primal.items()}), y)
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tangent.values()))).double()))
        if norm == 0 or not math.isfinite(norm):  # u = 0: nothing moves; u not finite: NaN tangents
            ce, kd = spec.losses(base, y)
            assert ce is not None
            fill = 0.0 if norm == 0 else math.nan
            return torch.full_like(ce, fill), torch.full_like(kd, fill)
        names = list(primal)
        dtypes = {spec.dtype(base), *(primal[n].dtype for n in names)}
        eps = FD_STEP * math.sqrt(max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)) / norm
        moved = torch._foreach_add([primal[n] for n in names], [tangent[n] for n in names], alpha=eps)
        plus = output(dict(zip(names, moved, strict=True)))
        with fwAD.dual_level():
            return _loss_tangents(spec, spec.fd_dual(base, plus, eps), y)


def _loss_tangents(spec: Objectives, output: Any, y: Tensor) -> tuple[Tensor, Tensor]:
    """The tangents of ``(ce, kd)`` at a dual ``output`` (inside a ``dual_level``; zeros where none)."""
    ce, kd = spec.losses(output, y)
    assert ce is not None
    (ce, d_ce), (kd, d_kd) = fwAD.unpack_dual(ce), fwAD.unpack_dual(kd)
    return (torch.zeros_like(ce) if d_ce is None else d_ce), (torch.zeros_like(kd) if d_kd is None else d_kd)
