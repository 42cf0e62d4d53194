r"""HDKD's neighbours, as building blocks usable from Python and from ``hdkd-fast train --method ...``.

- :class:`EKDLoss` (method ``ekd``): Lyu, Xu, Cheng et al. 2021, "Embedded Knowledge Distillation in
  Depth-level Dynamic Neural Network": last-exit KD plus same-resolution attention distillation
  (:class:`AttentionDistillation`, :func:`attention_map`).
- :class:`ERDELoss` (method ``erde``): Guidez et al. 2025, "Entropy-Regularized Distillation for
  Early-exit": a frozen teacher early-exit model trains a student exit by exit (:func:`match_exits`),
  with an entropy term on the teacher's mistakes.
- :class:`DenseKDUncertainty` (method ``dkd-uncertainty``): Chennupati et al., BMVC 2021, "Adaptive
  Distillation": one learnable uncertainty weight per KD pair (:class:`AdaptivePathWeighting` for any paths).
- :class:`GradientEquilibrium` (``--gradient-equilibrium``): Li et al., ICCV 2019 (IMTA): the gradient of
  every exit into the shared trunk is rescaled (:func:`gradient_rescale`).
- :class:`DBTTemperature` and :func:`dbt_temperature`: the temperature of Phuong & Lampert, ICCV 2019,
  "Distillation-Based Training for Multi-Exit Architectures".

Every KL between exits goes through the fused op (:func:`hdkd_fast.dense_kd_losses`,
:func:`hdkd_fast.dense_kd`, :class:`hdkd_fast.DenseKD`).
"""

from .adaptive import AdaptivePathWeighting, DenseKDUncertainty
from .ekd import AttentionDistillation, EKDLoss, attention_map, attention_pairs
from .equilibrium import GradientEquilibrium, gradient_rescale
from .erde import ERDELoss, match_exits
from .schedules import DBTTemperature, dbt_temperature

__all__ = [
    "AdaptivePathWeighting",
    "AttentionDistillation",
    "DBTTemperature",
    "DenseKDUncertainty",
    "EKDLoss",
    "ERDELoss",
    "GradientEquilibrium",
    "attention_map",
    "attention_pairs",
    "dbt_temperature",
    "gradient_rescale",
    "match_exits",
]
