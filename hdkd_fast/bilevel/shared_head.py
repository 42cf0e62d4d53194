r"""The bilevel step's :class:`~hdkd_fast.bilevel.hypergrad.Objectives` for exits that share a linear head
(early-exit language models), computed by the fused op without the ``K × N × V`` logits.

The model's output is :class:`hdkd_fast.ExitFeatures` ``(h_1..h_K, W, b)``; the objectives are those of
:func:`hdkd_fast.fused_linear_dense_kd` on :math:`z_k = h_k W^\top + b`. The ``"fd"`` hypergradient
differentiates them exactly along a finite difference of the features (:meth:`SharedHeadObjectives.fd_dual`):
:math:`\dot h_k \approx (h_k(\theta + \varepsilon u) - h_k(\theta)) / \varepsilon`, and likewise
:math:`\dot W`, :math:`\dot b` (the head's own tangent, up to rounding), then the fused op's forward mode —
the same construction as the logits' difference of :class:`~hdkd_fast.bilevel.hypergrad.ObjectiveSpec`, one
level earlier. With a detached teacher, ``kd[i, j]``'s tangent then moves with the student alone, as the
training gradient does; a plain difference of the losses would also move the teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._pairs import PairSpec
from .._types import ExitFeatures, KDLosses, LossWeights
from ..fused_linear import FusedLinearDenseKD, fused_linear_dense_kd
from .hypergrad import difference_dual


def check_features(output: object, num_exits: int) -> ExitFeatures:
    """``output`` (a model's), checked to be :class:`hdkd_fast.ExitFeatures` of ``num_exits`` exits."""
    if not isinstance(output, ExitFeatures):
        raise TypeError(f"the model must return hdkd_fast.ExitFeatures here; got {type(output).__name__}")
    if len(output.hidden) != num_exits:
        raise ValueError(f"the model returned {len(output.hidden)} exits' features; expected {num_exits}")
    return output


@dataclass(frozen=True)
class SharedHeadObjectives:
    """Objectives of exits sharing a linear head, for :class:`hdkd_fast.HDKD`.

    Args:
        criterion: the :class:`hdkd_fast.FusedLinearDenseKD` whose temperature, pairs, teacher detaching,
            ignored label, vocabulary size, chunk size and backend define the objectives (its own
            weights are not used: the bilevel step supplies them).
        target: maps the labels ``y`` that :meth:`hdkd_fast.HDKD.step` receives to ``Tensor[N]``, one
            label per feature row (a causal LM shifts them: ``y[:, 1:].reshape(-1)``).
        forward_kwargs: the keyword arguments that make the model's forward return
            :class:`hdkd_fast.ExitFeatures` (``{"return_features": True}`` for ``EarlyExitLM``).
    """

    criterion: FusedLinearDenseKD
    target: Callable[[Tensor], Tensor]
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_exits(self) -> int | None:
        return self.criterion.num_exits

    @property
    def pairs(self) -> PairSpec:
        return self.criterion.pairs

    @property
    def detach_teacher(self) -> bool:
        return self.criterion.detach_teacher

    def _losses(self, output: ExitFeatures, y: Tensor, pairs: PairSpec) -> KDLosses:
        c = self.criterion
        return fused_linear_dense_kd(
            output.hidden, output.weight, self.target(y), output.bias, temperature=c.temperature, pairs=pairs,
            detach_teacher=c.detach_teacher, ignore_index=c.ignore_index, vocab_size=c.vocab_size,
            chunk_size=c.chunk_size, backend=c.backend,
        )

    def losses(self, output: ExitFeatures, y: Tensor) -> KDLosses:
        return self._losses(output, y, self.pairs)

    def weighted(self, output: ExitFeatures, y: Tensor, weights: LossWeights) -> Tensor:
        return self.criterion(output.hidden, output.weight, self.target(y), output.bias, weights=weights)

    def cross_entropy(self, output: ExitFeatures, y: Tensor) -> Tensor:
        k = len(output.hidden)
        ce = self._losses(output, y, torch.zeros(k, k, dtype=torch.bool)).ce  # no pairs: no KD work
        assert ce is not None
        return ce

    def detach(self, output: ExitFeatures) -> ExitFeatures:
        return ExitFeatures([h.detach() for h in output.hidden], output.weight.detach(),
                            None if output.bias is None else output.bias.detach())

    def dtype(self, output: ExitFeatures) -> torch.dtype:
        return output.hidden[0].dtype

    def fd_dual(self, base: ExitFeatures, moved: ExitFeatures, eps: float) -> ExitFeatures:
        bias = None if base.bias is None or moved.bias is None else difference_dual(base.bias, moved.bias, eps)
        return ExitFeatures([difference_dual(b, m, eps) for b, m in zip(base.hidden, moved.hidden, strict=True)],
                            difference_dual(base.weight, moved.weight, eps), bias)
