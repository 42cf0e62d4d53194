"""Harmonized weights learned by bilevel optimization (docs/hdkd.md).

- :class:`HarmonizedWeights`: one learnable weight per objective (K CE terms + the selected KD pairs).
- :class:`HDKD`: the training step: virtual step, weight hypergradient, weight update, real step.
- :mod:`hdkd_fast.bilevel.hypergrad`: the functional core (:func:`weight_hypergradient`,
  :func:`virtual_step`, :func:`inner_rules`) for users who write their own loop; its
  :class:`~hdkd_fast.bilevel.hypergrad.Objectives` say what the step needs of a model's output.
- :class:`SharedHeadObjectives` (:mod:`hdkd_fast.bilevel.shared_head`): the objectives of exits that share a
  linear head, through the fused op (``hdkd_fast.lm.EarlyExitLM`` returns them from ``hdkd_objectives()``).
"""

from .hdkd import HDKD
from .hypergrad import (
    HYPERGRAD_MODES,
    Hypergradient,
    InnerRule,
    Objectives,
    inner_rules,
    virtual_step,
    weight_hypergradient,
)
from .shared_head import SharedHeadObjectives
from .weights import HarmonizedWeights

__all__ = [
    "HDKD",
    "HYPERGRAD_MODES",
    "HarmonizedWeights",
    "Hypergradient",
    "InnerRule",
    "Objectives",
    "SharedHeadObjectives",
    "inner_rules",
    "virtual_step",
    "weight_hypergradient",
]
