"""Result and weight containers of the public API (pytree-friendly NamedTuples)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class KDLosses(NamedTuple):
    """Per-objective losses of :func:`hdkd_fast.dense_kd_losses`.

    ``ce``: ``Tensor[K]`` (``[K, B]`` with ``reduction="none"``), one cross-entropy per exit,
    or ``None`` when no target was given.
    ``kd``: ``Tensor[K, K]`` (``[K, K, B]`` with ``reduction="none"``); ``kd[i, j]`` is the
    distillation loss of student exit ``i`` from teacher exit ``j``, zero outside the selected pairs.
    """

    ce: Tensor | None
    kd: Tensor


class LossWeights(NamedTuple):
    """Weights of every objective: ``L = sum_k ce[k] * ce_k + sum_ij kd[i, j] * kd_ij``.

    ``ce``: ``Tensor[K]``; ``kd``: ``Tensor[K, K]`` (entries outside the selected pairs are unused).
    """

    ce: Tensor
    kd: Tensor


class ExitFeatures(NamedTuple):
    r"""K exits' hidden states at the input of one shared linear head, and that head: the exits' logits
    would be :math:`z_k = h_k W^\top + b`. What a model hands to :class:`hdkd_fast.HDKD` instead of logits
    when ``K × N × V`` of them are too many to hold (``EarlyExitLM(...)(ids, return_features=True)``).

    ``hidden``: K ``Tensor[N, H]`` (one row per predicting position); ``weight``: ``Tensor[V, H]``;
    ``bias``: ``Tensor[V]`` or ``None``.
    """

    hidden: list[Tensor]
    weight: Tensor
    bias: Tensor | None
