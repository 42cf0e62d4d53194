"""Argument checks shared by :mod:`hdkd_fast.distill`; every error names the argument at fault."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._validation import check_count, check_nonnegative, check_positive
from ..backends import check_backend

__all__ = ["as_exit_list", "check_backend", "check_count", "check_nonnegative", "check_positive"]


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
