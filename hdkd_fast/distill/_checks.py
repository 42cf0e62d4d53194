"""Argument checks shared by :mod:`hdkd_fast.distill`; every error names the argument at fault."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from torch import Tensor

from ..backends import BACKENDS


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_nonnegative(value: object, name: str) -> float:
    """A finite real number ``>= 0`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{name} must be finite and >= 0; got {value}")
    return result


def check_backend(backend: object) -> str:
    """``"auto"`` or one of :data:`hdkd_fast.BACKENDS`."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}; got {backend!r}")
    return str(backend)


def as_exit_list(logits: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    """The exits of ``logits`` (a ``Tensor[K, B, C]`` or a sequence of K ``Tensor[B, C]``) as a list.

    Only the container is checked here; shapes, dtypes and devices are checked where they are combined.
    """
    if isinstance(logits, Tensor):
        if logits.dim() != 3:
            raise ValueError(
                f"{name} must be a Tensor[K, B, C] or a sequence of K Tensor[B, C]; got shape {list(logits.shape)}"
            )
        return list(logits.unbind(0))
    if isinstance(logits, (str, bytes)) or not isinstance(logits, Sequence):
        raise TypeError(
            f"{name} must be a Tensor[K, B, C] or a sequence of K Tensor[B, C]; got {type(logits).__name__}"
        )
    tensors = list(logits)
    for k, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{k}] must be a Tensor; got {type(t).__name__}")
    return tensors


def check_positive(value: object, name: str) -> float:
    """A finite real number ``> 0`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result) or result <= 0:
        raise ValueError(f"{name} must be finite and > 0; got {value}")
    return result
