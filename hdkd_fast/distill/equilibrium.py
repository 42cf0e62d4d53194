r"""Gradient equilibrium (Li et al., ICCV 2019, "Improved Techniques for Training Adaptive Deep Networks", IMTA).

In a multi-exit network the trunk up to exit i feeds the K - i exits i, ..., K-1, so with the plain sum of
the exit losses its gradient is the **sum** of K - i terms, and the early blocks get the largest, most
conflicting updates. IMTA's code (``kalviny/IMTA``, ``models/msdnet_ge.py``, ``MSDNet.forward``) rescales
the gradient at every exit with an identity-forward op::

    x = blocks[i](x)
    x[-1] = gradient_rescale(x[-1], 1.0 / (nBlocks - i))   # what exit i's head reads
    pred = classifier[i](x)
    x[-1] = gradient_rescale(x[-1], nBlocks - i - 1)        # what the next block reads

:class:`GradientEquilibrium` applies exactly this to a model of :mod:`hdkd_fast.models` without editing it,
and :func:`gradient_rescale` is the op.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._validation import check_real
from ..models.base import ExitCallback, MultiExitModule, supports_exit_maps


class _GradientRescale(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(x: Tensor, scale: float) -> Tensor:
        # An alias of x (same storage and version counter) that autograd does not treat as a view of x, so
        # the output gets this Function's own backward/jvp and may be modified in place like any tensor.
        return x.detach()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: Tensor, scale: float) -> tuple[Tensor, int | None]:
        """Batching rule: the op is elementwise, so it applies to the batched tensor as it is."""
        return gradient_rescale(x, scale), in_dims[0]


class _GradientRescaleWithJvp(_GradientRescale):
    """:class:`_GradientRescale` plus forward mode (Dynamo cannot trace a Function with a custom ``jvp``)."""

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, _scale_t: None) -> Tensor:
        return x_t * ctx.scale


def gradient_rescale(x: Tensor, scale: float) -> Tensor:
    r"""Identity in the forward pass; multiplies the gradient flowing back into ``x`` by ``scale``.

    The value of the result equals ``x`` bit for bit. Reverse mode: :math:`\bar x = s\,\bar y`. Forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) scales the tangent the same way, :math:`\dot y =
    s\,\dot x`, so the two modes stay transposes of each other (:math:`\langle u, J v\rangle = \langle J^T
    u, v\rangle`) for the modified graph; this is what the bilevel ``"jvp"`` hypergradient of
    :class:`hdkd_fast.HDKD` relies on to match ``"exact"`` on a model wrapped by
    :class:`GradientEquilibrium`. Works under ``torch.vmap`` and ``torch.compile`` (where, as for the
    fused op, forward mode is unavailable inside compiled code).

    Args:
        x: any tensor.
        scale: a finite real number (0 blocks the gradient, a negative value reverses it).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor; got {type(x).__name__}")
    value = check_real(scale, "scale")
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite; got {scale}")
    fn = _GradientRescale if torch.compiler.is_compiling() else _GradientRescaleWithJvp
    out: Tensor = fn.apply(x, value)
    return out


class GradientEquilibrium(MultiExitModule):
    r"""Gradient equilibrium (IMTA, Li et al. ICCV 2019) around a multi-exit model; combinable with any loss.

    ``GradientEquilibrium(model)(x, return_features=False)`` returns exactly what ``model`` returns (same
    values, bit for bit); only the backward pass changes. With K exits and :math:`s_i` the trunk tensor
    exit i's head reads (0-based i), as in IMTA's code:

    - the head of exit i reads :math:`r(s_i, \tfrac{1}{K-i})`;
    - the rest of the trunk reads :math:`r\big(r(s_i, \tfrac{1}{K-i}), K-i-1\big)`,

    where :math:`r` is :func:`gradient_rescale`. The gradient arriving at :math:`s_i` is therefore
    :math:`\big(g^{\mathrm{head}}_i + (K-i-1)\, g^{\mathrm{later}}_i\big) / (K-i)`, and unrolled over the
    exits: **every exit j >= i contributes its own gradient scaled by exactly 1/(K - i)** at :math:`s_i`.
    The parameters of the trunk between exit i-1 and exit i thus receive
    :math:`\frac{1}{K-i} \sum_{j \ge i} \partial L_j / \partial \theta` (the *mean* over the exits that
    depend on them instead of the sum; the last stage is unchanged), and every head's own parameters
    receive their unscaled gradient. The factors 1/(K-i) and K-i-1 are the ``1.0 / (nBlocks - i)`` and
    ``nBlocks - i - 1`` of ``kalviny/IMTA`` (``models/msdnet_ge.py``).

    Supported models: every :class:`~hdkd_fast.models.MultiExitModule` that implements the hook
    :meth:`~hdkd_fast.models.MultiExitModule.forward_exits_mapped`, which applies the two rescalings:

    - :class:`~hdkd_fast.models.StagedMultiExit` (``MSDNet``, ``MultiExitResNet``): the rescaling acts on
      ``model.exit_feature(state)`` inside the stage loop. For a list state (``MSDNet``) only the tensor the
      head reads (the coarsest scale) is rescaled and the other scales pass unscaled, exactly as IMTA's
      code; the closed form above then holds for the gradient through that scale.
    - models built by :func:`~hdkd_fast.models.attach_exits`: forward hooks rescale the output of each
      hooked module ``at[i]`` (before the exit head reads it, and again for the rest of the backbone) for
      the duration of the wrapper's forward only; a backbone that also reads the batch around a hooked
      module (a residual shortcut) gets that path unscaled. The final exit (the backbone's output) has
      factor 1.

    ``num_exits``, ``forward_exits`` (hence :class:`hdkd_fast.inference.EarlyExit` and
    :func:`hdkd_fast.evaluation.exit_costs`) work on the wrapper. The wrapped model is ``self.model`` (its
    ``state_dict`` keys get the prefix ``model.``; save ``wrapper.model.state_dict()`` for a checkpoint that
    loads without the wrapper). Outputs of the rescaling op may be modified in place like any tensor.

    Raises:
        TypeError: for a model without the hook (the type is named).
    """

    def __init__(self, model: MultiExitModule) -> None:
        super().__init__()
        if not supports_exit_maps(model):
            raise TypeError(
                "GradientEquilibrium needs a MultiExitModule that implements forward_exits_mapped (StagedMultiExit "
                f"models such as MSDNet and MultiExitResNet, models built by attach_exits); got a model of type "
                f"{type(model).__name__}"
            )
        self.model = model

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    @staticmethod
    def wrapped_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The wrapped model's ``state_dict`` from the wrapper's (e.g. a checkpoint's), to load it unwrapped."""
        return {key.removeprefix("model."): value for key, value in state.items()}

    def forward_exits(self, x: Tensor, on_exit: ExitCallback) -> None:
        k_total = self.model.num_exits

        def into_head(k: int, s: Tensor) -> Tensor:
            return _rescaled(s, 1.0 / (k_total - k))

        def onward(k: int, s: Tensor) -> Tensor:
            return _rescaled(s, float(k_total - k - 1))

        self.model.forward_exits_mapped(x, on_exit, into_head, onward)


def _rescaled(s: Tensor, scale: float) -> Tensor:
    """``gradient_rescale(s, scale)``, or ``s`` itself for a factor 1 (no op in the graph)."""
    return s if scale == 1.0 else gradient_rescale(s, scale)
