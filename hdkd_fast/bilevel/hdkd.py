r"""``HDKD``: the bilevel training step (harmonized weights + real step) as a thin object.

The state is the model, its optimizer, the :class:`HarmonizedWeights` φ and their optimizer, the
validation-loss running mean (``validation="balanced"``) and a step counter; the math lives in
:func:`hdkd_fast.bilevel.hypergrad.weight_hypergradient`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from .._distributed import all_reduce_mean
from .._pairs import pair_mask
from .._types import LossWeights
from .._validation import Logits, check_choice, check_count, check_logits, check_positive, check_positive_int, is_real
from ..modules import DenseKD
from .hypergrad import (
    HYPERGRAD_MODES,
    STEP_LENGTHS,
    Hypergradient,
    Objectives,
    ObjectiveSpec,
    inner_rules,
    weight_hypergradient,
)
from .shared_head import SharedHeadObjectives, check_features
from .weights import HarmonizedWeights

VALIDATION_OBJECTIVES = ("ce", "balanced")
DEFAULT_WEIGHT_LR = 1e-2


def model_logits(output: Any, num_exits: int) -> Logits:
    """``output`` (a model's), checked to be ``num_exits`` exits' logits (see :func:`check_logits`)."""
    check_logits(output, "model(x)", num_exits=num_exits)
    return output


def model_objectives(module: nn.Module) -> SharedHeadObjectives | None:
    """The objectives a model defines itself (``module.hdkd_objectives()``, e.g. ``EarlyExitLM``), or ``None``
    for a model that returns logits."""
    method = getattr(module, "hdkd_objectives", None)
    if method is None:
        return None
    objectives = method()
    if not isinstance(objectives, SharedHeadObjectives):
        raise TypeError(f"{type(module).__name__}.hdkd_objectives() must return a SharedHeadObjectives; "
                        f"got {type(objectives).__name__}")
    return objectives


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite: their norms in one multi-tensor pass, one host sync
    (a norm that overflows counts as not finite)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm([t.detach() for t in tensors]))).all())


def _loss_and_finite(loss: Tensor, gradients: list[Tensor]) -> tuple[float, bool]:
    """``float(loss)`` and whether the loss and every gradient are finite, in one host sync (the one a plain
    step's ``float(loss)`` makes anyway): the gradients' norms in one multi-tensor pass (a norm that
    overflows its dtype counts as not finite)."""
    with torch.no_grad():
        values = torch.stack([*torch._foreach_norm(gradients), loss.detach().reshape(())]).tolist()
    return values[-1], all(map(math.isfinite, values))


def _fork_rng(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """Restore the global RNG state (CPU, and ``x``'s CUDA device) on exit."""
    return torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])


class HDKD:
    r"""Harmonized dense KD: learns the objective weights on a validation split while training.

    ``step(x, y, x_val, y_val)`` does, every ``update_every``-th call (docs/hdkd.md, "A step, in order"):

    1. virtual step :math:`\theta' = \theta - \eta\, d(\nabla_\theta L_\mathrm{train}(\theta, w))` with
       the optimizer's current lr η (and, for ``torch.optim.SGD``, its momentum buffer, dampening,
       nesterov and weight decay; other optimizers are modelled by plain SGD with their lr);
    2. hypergradient :math:`\partial L_\mathrm{val}(\theta') / \partial\varphi` (``hypergrad``:
       ``"fd"`` the loss's exact JVP along a one-sided difference of the logits, one plain forward;
       ``"jvp"`` exact forward mode, about a forward and a backward; ``"exact"`` reverse mode through the
       virtual step; ``"auto"``, the default: ``"fd"`` for float32/float64 logits, ``"jvp"`` for
       low-precision ones such as bf16 autocast; the first two cost the same for any number of
       objectives);
    3. φ update with ``weight_optimizer`` (default ``Adam(lr=weight_lr × update_every)``) on the hypergradient
       per unit of learning rate, :math:`\eta^{-1}\, \partial L_\mathrm{val}/\partial\varphi` (``per_unit_lr``, below);

    and on every call the real step. With ``reuse_inner_gradient`` (the default without DDP) an update
    step hands the gradient of step 1 to ``optimizer.step()``: the step actually taken is the virtual
    step the hypergradient differentiated (exactly so for ``torch.optim.SGD``), made with the weights
    before this update; the new weights act from the next step. This costs no forward or backward of
    its own: with ``"fd"`` a step is the gradient pass, the validation pass and one plain forward.
    With ``reuse_inner_gradient=False`` (always under DDP) the real step is ``optimizer.zero_grad()``,
    ``criterion(model(x), y, weights=w)`` with the updated weights, ``backward()``, ``optimizer.step()``.
    Steps without an update are that plain weighted step.

    Non-finite values never reach φ or the model: a hypergradient (or validation loss) that is not
    finite, e.g. from a NaN in a validation batch, skips step 3 (φ, its optimizer and the ``"balanced"``
    running mean stay as they were; counted in :attr:`skipped_updates` and the step's
    ``"update_skipped"``), and a real step whose loss or gradient is not finite is not taken (the
    parameters, the optimizer state and the BatchNorm statistics stay as they were; ``"step_skipped"``).
    Each kind is warned about once per ``HDKD`` object (a ``RuntimeWarning``).

    The hypergradient runs through ``torch.func.functional_call`` with cloned buffers (the gradient pass
    through the module itself, with its real buffers, when it doubles as the real step): BatchNorm
    running statistics change once per step, exactly as in plain training. All train-batch forwards of
    one step (gradient pass, JVP/FD passes, real step) see the same Dropout mask.

    Why per unit of learning rate: the hypergradient is :math:`-\eta\, c\, \langle \nabla L_\mathrm{val}(\theta'),
    \nabla l_o(\theta)\rangle` (:mod:`hdkd_fast.bilevel.hypergrad`), proportional to the model's lr η. A
    decay of η (10× at a multistep milestone) shrinks it by the same factor, and Adam's second moment,
    which remembers the old scale for about :math:`1/(1-\beta_2)` = 1000 steps, shrinks the φ steps with
    it: the weights freeze at the first milestone. Dividing by η (the largest lr of the optimizer's param
    groups) keeps the signal on one scale for the whole schedule; ``per_unit_lr=False`` feeds the raw
    hypergradient. :meth:`hypergradient` always returns the raw :math:`\partial L_\mathrm{val}/\partial\varphi`.

    Validation objective (``validation``):

    - ``"ce"``: :math:`L_\mathrm{val} = \sum_k \mathrm{ce}_k(\theta'; x_v, y_v)`;
    - ``"balanced"``: :math:`L_\mathrm{val} = \sum_k \mathrm{ce}_k / m_k`, :math:`m_k` the running mean
      (EMA, decay ``ema_decay``) of exit k's validation loss (the current value before the first
      update), so that the large losses of the early exits do not dominate.

    Distributed: with a ``DistributedDataParallel`` model the hypergradient runs on the local batch
    through ``model.module`` (the inner step sees the local shard's gradient, not the all-reduced
    one), the φ-gradient (and the validation losses of the EMA) are averaged over the process group,
    so φ stays identical on every rank, and the real step goes once through the DDP model.

    Models that define their own objectives: a model with a method ``hdkd_objectives()`` returning a
    :class:`~hdkd_fast.bilevel.shared_head.SharedHeadObjectives` (``hdkd_fast.lm.EarlyExitLM``) is called as
    ``model(x, **objectives.forward_kwargs)`` and returns :class:`hdkd_fast.ExitFeatures` (the exits'
    hidden states and their shared head) instead of logits; its own fused criterion defines the objectives
    (``criterion`` must be ``None``), ``y`` is what its ``target`` maps to one label per row (a causal LM's
    ``labels``), ``hypergrad="exact"`` is refused (the fused op has no second derivatives) and
    :attr:`last_logits` stays ``None``.

    Args:
        model: returns K logits (``Tensor[K, B, C]`` or a list of K ``Tensor[B, C]``), or defines its
            objectives (above); may be DDP-wrapped.
        optimizer: the model's optimizer.
        criterion: a :class:`hdkd_fast.DenseKD` (default ``DenseKD()``; ``None`` for a model that defines its
            objectives); its temperature, pairs, detach_teacher, ignore_index and backend define the objectives.
        weights: a :class:`HarmonizedWeights` (default: ``"per_exit"`` over the criterion's pairs, on the
            model's device and dtype). K comes from it, else ``criterion.num_exits``, else
            ``model.num_exits``.
        weight_optimizer: optimizer of ``weights.parameters()`` (default ``Adam(lr=weight_lr × update_every)``:
            ``weight_lr`` per training step, so that φ travels about as far whatever the interval; none when
            the weights have no parameters, e.g. ``"fixed"``).
        weight_lr: the default weight optimizer's lr per training step (1e-2); ignored with ``weight_optimizer``.
        hypergrad: ``"auto"``, ``"fd"``, ``"jvp"`` or ``"exact"``.
        update_every: update φ on every n-th ``step`` call; the others are plain weighted steps, at the cost
            of one (they need no validation batch). The training CLI's default is 16 (docs/performance.md).
        validation: ``"ce"`` or ``"balanced"``.
        ema_decay: decay of the running mean of ``"balanced"``, in [0, 1).
        reuse_inner_gradient: reuse the virtual step's gradient for the real step (above); ``None``
            (default): ``True`` unless ``model`` is DDP-wrapped, where ``True`` is an error.
        per_unit_lr: step φ on the hypergradient divided by the model's current lr η (above).
        step_length: ``"free"`` (the plain look-ahead) or ``"fixed"``: the look-ahead's virtual step keeps
            its length whatever w, so the hypergradient only chooses the step's direction
            (:func:`~hdkd_fast.bilevel.hypergrad.weight_hypergradient`; one more forward per update).
        warmup_steps: the weights stay at their start for the first ``warmup_steps`` calls (plain weighted
            steps, no validation batch); updates follow on every ``update_every``-th call after them. 0
            (default): from the first call.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        criterion: DenseKD | None = None,
        weights: HarmonizedWeights | None = None,
        weight_optimizer: torch.optim.Optimizer | None = None,
        hypergrad: str = "auto",
        update_every: int = 1,
        validation: str = "ce",
        ema_decay: float = 0.9,
        reuse_inner_gradient: bool | None = None,
        per_unit_lr: bool = True,
        step_length: str = "free",
        weight_lr: float = DEFAULT_WEIGHT_LR,
        warmup_steps: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if criterion is not None and not isinstance(criterion, DenseKD):
            raise TypeError(f"criterion must be a hdkd_fast.DenseKD or None; got {type(criterion).__name__}")
        if weights is not None and not isinstance(weights, HarmonizedWeights):
            raise TypeError(f"weights must be a HarmonizedWeights or None; got {type(weights).__name__}")
        if weight_optimizer is not None and not isinstance(weight_optimizer, torch.optim.Optimizer):
            raise TypeError(f"weight_optimizer must be a torch.optim.Optimizer or None; "
                            f"got {type(weight_optimizer).__name__}")
        check_choice(hypergrad, "hypergrad", HYPERGRAD_MODES)
        update_every = check_positive_int(update_every, "update_every", "an int >= 1")
        warmup_steps = check_count(warmup_steps, "warmup_steps", minimum=0)
        weight_lr = check_positive(weight_lr, "weight_lr")
        check_choice(step_length, "step_length", STEP_LENGTHS)
        check_choice(validation, "validation", VALIDATION_OBJECTIVES)
        if not is_real(ema_decay) or not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be a number in [0, 1); got {ema_decay!r}")
        if reuse_inner_gradient is None:
            reuse_inner_gradient = not isinstance(model, DistributedDataParallel)
        if not isinstance(reuse_inner_gradient, bool):
            raise TypeError(f"reuse_inner_gradient must be a bool or None; got {type(reuse_inner_gradient).__name__}")
        if not isinstance(per_unit_lr, bool):
            raise TypeError(f"per_unit_lr must be a bool; got {type(per_unit_lr).__name__}")
        if reuse_inner_gradient and isinstance(model, DistributedDataParallel):
            raise ValueError("reuse_inner_gradient=True is not supported with a DistributedDataParallel model: "
                             "its real step must go through the DDP model")

        self.model: nn.Module = model
        self.module: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
        self.optimizer: torch.optim.Optimizer = optimizer
        self.model_objectives: SharedHeadObjectives | None = model_objectives(self.module)
        """The objectives the model defines itself (``None``: it returns logits, weighed by :attr:`criterion`)."""
        if self.model_objectives is not None:
            if criterion is not None:
                raise ValueError(f"criterion must be None: {type(self.module).__name__} defines its objectives "
                                 "itself (hdkd_objectives())")
            if hypergrad == "exact":
                raise ValueError("hypergrad='exact' needs second derivatives, which the fused shared-head op of "
                                 f"{type(self.module).__name__} does not have; use 'fd' (or 'auto', 'jvp')")
        self.criterion: DenseKD | None = (
            None if self.model_objectives is not None else DenseKD() if criterion is None else criterion)
        self.weights: HarmonizedWeights = self._weights(weights)
        k = self.weights.num_exits
        spec = self._spec()
        num_exits = self._criterion_exits()
        if num_exits is not None and num_exits != k:
            raise ValueError(f"weights have num_exits={k} but the criterion's num_exits={num_exits}")
        if pair_mask(spec.pairs, k, detach_teacher=spec.detach_teacher) != self.weights.mask:
            raise ValueError("weights were built for other pairs than the criterion's (criterion.pairs)")
        params = list(self.weights.parameters())
        if weight_optimizer is None and params:  # the lr is per training step (below: update_every)
            weight_optimizer = torch.optim.Adam(params, lr=weight_lr * update_every)
        self.weight_optimizer: torch.optim.Optimizer | None = weight_optimizer
        self.hypergrad: str = hypergrad
        self.update_every: int = update_every
        self.warmup_steps: int = warmup_steps
        self.validation: str = validation
        self.ema_decay: float = float(ema_decay)
        self.reuse_inner_gradient: bool = reuse_inner_gradient
        self.per_unit_lr: bool = per_unit_lr
        self.step_length: str = step_length
        self.val_ema: Tensor | None = None
        self.calls: int = 0
        self.skipped_updates: int = 0
        """Weight updates skipped so far because the hypergradient was not finite."""
        self._warned: set[str] = set()
        self._buffer_dicts: list[dict[str, Tensor | None]] | None = None
        self._buffer_ids: tuple[int, ...] = ()
        self._buffer_store: list[Tensor] = []
        self._weights_cache: tuple[tuple[tuple[int, int, int], ...], LossWeights, dict[str, float]] | None = None
        self.last_logits: Logits | None = None
        """The (detached) logits of the last real step's forward (or of the gradient pass it reused), e.g.
        for training accuracy."""

    def _criterion_exits(self) -> int | None:
        """The number of exits the criterion (or the model's own objectives) was built for, if it says."""
        if self.criterion is not None:
            return self.criterion.num_exits
        assert self.model_objectives is not None
        return self.model_objectives.num_exits

    def _weights(self, weights: HarmonizedWeights | None) -> HarmonizedWeights:
        if weights is not None:
            return weights
        spec = self._spec()
        k = self._criterion_exits()
        if k is None:
            k = getattr(self.module, "num_exits", None)
        if not isinstance(k, int):
            raise ValueError("cannot tell the number of exits: pass weights=HarmonizedWeights(K, ...), "
                             "a criterion with num_exits, or a model with a num_exits attribute")
        ref = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        built = HarmonizedWeights(k, spec.pairs)
        return built if ref is None else built.to(device=ref.device, dtype=ref.dtype)

    # -- the pieces the functional core needs --------------------------------------------------

    def _checked(self, output: Any) -> Any:
        """The model's output, checked: logits, or features for a model with its own objectives."""
        if self.model_objectives is not None:
            return check_features(output, self.weights.num_exits)
        return model_logits(output, self.weights.num_exits)

    def _kwargs(self) -> dict[str, Any]:
        return {} if self.model_objectives is None else dict(self.model_objectives.forward_kwargs)

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Any:
        """The unwrapped model with ``params`` substituted and its buffers cloned (left unchanged)."""
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}
        return self._checked(functional_call(self.module, {**buffers, **params}, (x,), self._kwargs()))

    def _real_forward(self, params: dict[str, Tensor], x: Tensor) -> Any:
        """The unwrapped model itself, for ``params`` = its own parameters (``_hypergradient`` passes
        them), with its real buffers (updated as in training): no re-parametrization."""
        return self._checked(self.module(x, **self._kwargs()))

    def _spec(self) -> Objectives:
        if self.model_objectives is not None:
            return self.model_objectives
        c = self.criterion
        assert c is not None
        return ObjectiveSpec(c.temperature, c.pairs, c.detach_teacher, c.ignore_index, c.backend)

    def _val_objective(self, ce: Tensor) -> Tensor:
        if self.validation == "ce":
            return ce.sum()
        scale = ce.detach() if self.val_ema is None else self.val_ema.to(ce)
        return (ce / scale.clamp_min(torch.finfo(ce.dtype).tiny)).sum()

    def _hypergradient(self, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, *, real_forward: bool = False
                       ) -> tuple[Hypergradient, list[Tensor]]:
        named = dict(self.module.named_parameters())
        params = list(self.weights.parameters())
        with torch.enable_grad():
            out = self.weights()  # the graph of w(φ) for the chain rule below
        result = weight_hypergradient(
            self._forward, named, inner_rules(self.optimizer, named), LossWeights(out.ce.detach(), out.kd.detach()),
            self._spec(), self._val_objective, x, y, x_val, y_val, mode=self.hypergrad,
            train_forward=self._real_forward if real_forward else None, step_length=self.step_length,
        )
        with torch.enable_grad():
            grads = torch.autograd.grad(
                out, params, grad_outputs=(result.weights.ce.to(out.ce), result.weights.kd.to(out.kd)),
                allow_unused=True, materialize_grads=True,
            )
        return result, list(grads)

    # -- public API -----------------------------------------------------------------------------

    def hypergradient(self, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor) -> list[Tensor]:
        """∂L_val/∂φ for every tensor of ``weights.parameters()`` on this process's batches.

        Leaves the model (parameters, ``.grad``, buffers), the weights, both optimizers and the global
        RNG state exactly as they were. Returns ``[]`` for fixed weights.
        """
        if not list(self.weights.parameters()):
            return []
        with _fork_rng(x):
            return self._hypergradient(x, y, x_val, y_val)[1]

    def will_update(self) -> bool:
        """Whether the next :meth:`step` updates φ (and so needs its validation batch)."""
        calls = self.calls - self.warmup_steps
        return self.weight_optimizer is not None and calls >= 0 and calls % self.update_every == 0

    def step(self, x: Tensor, y: Tensor, x_val: Tensor | None = None, y_val: Tensor | None = None
             ) -> dict[str, float]:
        """One training step (bilevel weight update every ``update_every`` calls, then the real step).

        ``x_val`` and ``y_val`` are needed only when the step updates φ (:meth:`will_update`); a step
        without an update ignores them, so a caller may fetch a validation batch only for those steps.

        Returns floats: ``"loss"`` (the weighted train loss of the real step), ``"updated"`` (1.0 when φ
        was updated), ``"update_skipped"`` (1.0 when a non-finite hypergradient skipped the update),
        ``"step_skipped"`` (1.0 when a non-finite loss or gradient skipped the real step), ``"lr"``, and
        ``"weight/<objective>"`` (the weights after the update; objectives are named ``ce/k`` and
        ``kd/i-j``). On update steps also ``"val_loss"`` (L_val(θ')), ``"val_ce/k"`` and
        ``"hypergrad_norm"`` (‖∂L_val/∂φ‖, averaged over ranks under DDP).

        A step without an update costs what a plain weighted step costs (docs/performance.md): its
        forward, backward and optimizer step, one host sync (the loss and the finiteness of the loss and
        gradients, read together), a copy of the buffers into storage kept between steps (to put the
        BatchNorm statistics back if the step is skipped), and no weight computation (the weights and
        their ``"weight/…"`` values are cached until φ changes).
        """
        update = self.will_update()
        if update and (x_val is None or y_val is None):
            raise ValueError("this step updates the weights (will_update()): it needs x_val and y_val")
        self.calls += 1
        saved = self._save_buffers(refresh=update)  # put back when the real step is skipped
        stats: dict[str, float] = {"update_skipped": 0.0}
        result = None
        if update:
            assert x_val is not None and y_val is not None
            result = self._bilevel_update(x, y, x_val, y_val, stats)
        loss = self._real_step(x, y, result if self.reuse_inner_gradient else None)
        stats["loss"], finite = _loss_and_finite(loss, self._gradients())
        stats["step_skipped"] = float(not finite)
        if finite:
            self.optimizer.step()
        else:
            self._skip_real_step(saved)

        stats["updated"] = float(update and not stats["update_skipped"])
        stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        stats.update(self._current_weights()[1])
        return stats

    def _bilevel_update(self, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor,
                        stats: dict[str, float]) -> Hypergradient:
        """Steps 1–3: the hypergradient and, when it is finite, the φ update; adds the validation stats."""
        if self.reuse_inner_gradient:  # the gradient pass is the real step's forward and backward
            result, grads = self._hypergradient(x, y, x_val, y_val, real_forward=True)
        else:  # the real step replays the gradient pass's random numbers
            with _fork_rng(x):
                result, grads = self._hypergradient(x, y, x_val, y_val)
        val_ce = result.val_ce
        if isinstance(self.model, DistributedDataParallel):  # φ-gradients and validation losses, one collective
            *grads, val_ce = all_reduce_mean([*grads, val_ce], self.model.process_group)
        if _all_finite([*grads, val_ce]):  # the same decision on every rank: the values are all-reduced
            self._update_weights(grads, val_ce)
        else:
            stats["update_skipped"] = 1.0
            self.skipped_updates += 1
            self._warn_once("update", "HDKD: a non-finite hypergradient or validation loss (e.g. a NaN in a "
                            "validation batch); the weight update was skipped (counted in skipped_updates)")
        stats["val_loss"] = float(result.val_loss)
        stats.update({f"val_ce/{k}": v for k, v in enumerate(val_ce.tolist())})
        stats["hypergrad_norm"] = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
        return result

    def _real_step(self, x: Tensor, y: Tensor, reused: Hypergradient | None) -> Tensor:
        """The real step's loss, its gradient in the parameters' ``.grad``: from the gradient pass of
        ``reused``, or by its own forward and backward with the current weights."""
        self.optimizer.zero_grad(set_to_none=True)
        self.last_logits = None
        if reused is not None:
            named = dict(self.module.named_parameters())
            for name, grad in reused.train_grads.items():
                named[name].grad = grad
            if self.model_objectives is None:
                self.last_logits = reused.train_output
            return reused.train_loss
        w = self._current_weights()[0]
        spec = self._spec()
        output = self._checked(self.model(x, **self._kwargs()))
        loss = spec.weighted(output, y, w)
        loss.backward()
        if self.model_objectives is None:
            self.last_logits = spec.detach(output)
        return loss

    def _update_weights(self, grads: list[Tensor], val_ce: Tensor) -> None:
        """Step 3: φ ← weight_optimizer step with ``grads``; the ``"balanced"`` running mean takes ``val_ce``."""
        assert self.weight_optimizer is not None
        if self.validation == "balanced":
            d = self.ema_decay
            self.val_ema = val_ce.clone() if self.val_ema is None else d * self.val_ema + (1 - d) * val_ce
        params = list(self.weights.parameters())
        lr = max((float(g["lr"]) for g in self.optimizer.param_groups if g["params"]), default=0.0)
        scale = 1 / lr if self.per_unit_lr and lr > 0 else 1.0
        for p, g in zip(params, grads, strict=True):
            p.grad = (g * scale).to(p.dtype)
        self.weight_optimizer.step()
        for p in params:
            p.grad = None

    def _gradients(self) -> list[Tensor]:
        """The ``.grad`` of every parameter the optimizer steps (its flat lists: no module traversal)."""
        return [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _save_buffers(self, *, refresh: bool) -> list[tuple[Tensor, Tensor]]:
        """Copy the module's buffers into storage kept between steps; returns ``(buffer, copy)`` pairs.

        Walking the module tree costs more than the copy on a network with many BatchNorm layers (about
        0.25 ms on ``msdnet-tiny``), so the buffer dictionaries of its submodules are collected at the
        first call and again on every ``refresh`` (update steps): a buffer replaced in a dictionary (e.g.
        by ``model.to()``) is seen at once, a submodule added in between from the next update step.
        """
        if refresh or self._buffer_dicts is None:
            self._buffer_dicts = [m._buffers for m in self.module.modules() if m._buffers]
        buffers = [b for d in self._buffer_dicts for b in d.values() if b is not None]
        ids = tuple(map(id, buffers))
        if ids != self._buffer_ids:
            self._buffer_ids, self._buffer_store = ids, [torch.empty_like(b) for b in buffers]
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffer_store, [b.detach() for b in buffers])
        return list(zip(buffers, self._buffer_store, strict=True))

    def _current_weights(self) -> tuple[LossWeights, dict[str, float]]:
        """The weights (no graph) and their ``"weight/<objective>"`` stats, recomputed only when a tensor
        of :attr:`weights` was changed in place (its version counter), replaced, or moved."""
        key = tuple((id(t), t._version, t.data_ptr()) for t in (*self.weights.parameters(), *self.weights.buffers()))
        if self._weights_cache is None or self._weights_cache[0] != key:
            with torch.no_grad():
                vector = self.weights.vector()
                w = self.weights.unflatten(vector)
            names = self.weights.objective_names()
            stats = {f"weight/{n}": v for n, v in zip(names, vector.tolist(), strict=True)}
            self._weights_cache = (key, w, stats)
        return self._weights_cache[1], self._weights_cache[2]

    def _skip_real_step(self, saved: list[tuple[Tensor, Tensor]]) -> None:
        """Drop the gradients of a non-finite real step and put the buffers (BatchNorm statistics) back."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
        self._warn_once("step", "HDKD: a non-finite training loss or gradient; the model's step was skipped")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        """The whole training state: model (unwrapped), optimizer, weights, weight optimizer, the
        validation running mean and the step counter."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weights": self.weights.state_dict(),
            "weight_optimizer": None if self.weight_optimizer is None else self.weight_optimizer.state_dict(),
            "val_ema": None if self.val_ema is None else self.val_ema.clone(),
            "calls": self.calls,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same model, optimizers and weights configuration)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from HDKD.state_dict(); got {type(state).__name__}")
        missing = {"model", "optimizer", "weights", "weight_optimizer", "val_ema", "calls"} - state.keys()
        if missing:
            raise ValueError(f"state is missing the keys {sorted(missing)}")
        if (state["weight_optimizer"] is None) != (self.weight_optimizer is None):
            raise ValueError("state['weight_optimizer'] does not match this HDKD's weight optimizer")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weights.load_state_dict(state["weights"])
        if self.weight_optimizer is not None:
            self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        ema = state["val_ema"]
        self.val_ema = None if ema is None else ema.clone()
        self.calls = int(state["calls"])
        self.skipped_updates = int(state.get("skipped_updates", 0))  # absent from states saved before it existed
