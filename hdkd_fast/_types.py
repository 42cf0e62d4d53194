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
