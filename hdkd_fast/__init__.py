"""hdkd_fast: fused dense knowledge distillation for multi-exit networks.

Public API (docs/design.md §Layers): :func:`dense_kd_losses`, :func:`dense_kd`, :class:`DenseKD`,
:func:`fused_linear_dense_kd` and :class:`FusedLinearDenseKD` (dense KD fused with a shared LM head),
:class:`KDLosses`, :class:`LossWeights`, :class:`ExitFeatures` (what a model with a shared head hands to
:class:`HDKD`), :func:`available_backends` (the backend registry:
:mod:`hdkd_fast.backends`), and the readable baseline
:class:`hdkd_fast.reference.DenseKD`. Subpackages: :mod:`hdkd_fast.models` (multi-exit networks),
:mod:`hdkd_fast.inference` (early-exit inference), :mod:`hdkd_fast.evaluation` (anytime and
budgeted accuracy, exit costs, plots), :mod:`hdkd_fast.bilevel` (:class:`HarmonizedWeights` and the
:class:`HDKD` bilevel loop), :mod:`hdkd_fast.distill` (EKD, ERDE, adaptive path weights, gradient
equilibrium, DBT), :mod:`hdkd_fast.data` (datasets of the training CLI) and :mod:`hdkd_fast.training`
(``hdkd-fast train``; imported on demand).
"""

from . import bilevel, data, distill, evaluation, inference, models, reference
from ._pairs import pair_mask
from ._types import ExitFeatures, KDLosses, LossWeights
from ._version import __version__
from .backends import available_backends
from .bilevel import HDKD, HarmonizedWeights
from .functional import dense_kd, dense_kd_losses
from .fused_linear import FusedLinearDenseKD, fused_linear_dense_kd
from .modules import DenseKD

__all__ = [
    "HDKD",
    "DenseKD",
    "ExitFeatures",
    "FusedLinearDenseKD",
    "HarmonizedWeights",
    "KDLosses",
    "LossWeights",
    "__version__",
    "available_backends",
    "bilevel",
    "data",
    "dense_kd",
    "dense_kd_losses",
    "distill",
    "evaluation",
    "fused_linear_dense_kd",
    "inference",
    "models",
    "pair_mask",
    "reference",
]
