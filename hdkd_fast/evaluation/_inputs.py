"""Argument checks of the evaluation functions beyond the logits (those go through
:func:`hdkd_fast._validation.check_logits`); every error names the argument at fault."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def labels(y: Tensor, name: str, exits: list[Tensor]) -> Tensor:
    """Class indices ``[N]`` in ``[0, C)`` on the logits' device."""
    n, c = exits[0].shape
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be an integer Tensor[N]; got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices; got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape [N] = [{n}] to match the logits; got {list(y.shape)}")
    if y.device != exits[0].device:
        raise ValueError(f"{name} is on {y.device} but the logits are on {exits[0].device}")
    if bool(((y < 0) | (y >= c)).any()):
        raise ValueError(f"{name} holds labels outside [0, {c})")
    return y


def per_exit_values(values: Sequence[float] | Tensor, name: str, num_exits: int) -> Tensor:
    """K finite, non-negative numbers as a float64 tensor on the CPU."""
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of K = {num_exits} values; got shape {list(values.shape)}")
        out = values.detach().to("cpu", torch.float64)
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        try:
            out = torch.tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of numbers") from err
    else:
        raise TypeError(f"{name} must be a sequence of K numbers or a 1-D tensor; got {type(values).__name__}")
    if out.numel() != num_exits:
        raise ValueError(f"{name} must hold one value per exit (K = {num_exits}); got {out.numel()}")
    if not all(math.isfinite(v) and v >= 0 for v in out.tolist()):
        raise ValueError(f"{name} must be finite and non-negative; got {out.tolist()}")
    return out
