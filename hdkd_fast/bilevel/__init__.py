"""Harmonized weights learned by bilevel optimization (docs/hdkd.md).

- :class:`HarmonizedWeights`: one learnable weight per objective (K CE terms + the selected KD pairs).
- :class:`HDKD`: the training step: virtual step, weight hypergradient, weight update, real step.
- :mod:`hdkd_fast.bilevel.hypergrad`: the functional core (:func:`weight_hypergradient`,
  :func:`virtual_step`, :func:`inner_rules`) for users who write their own loop.
"""

from .hdkd import HDKD
from .hypergrad import HYPERGRAD_MODES, Hypergradient, InnerRule, inner_rules, virtual_step, weight_hypergradient
from .weights import HarmonizedWeights

__all__ = [
    "HDKD",
    "HYPERGRAD_MODES",
    "HarmonizedWeights",
    "Hypergradient",
    "InnerRule",
    "inner_rules",
    "virtual_step",
    "weight_hypergradient",
]
