"""Argument checks of the evaluation functions; every error names the argument at fault."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import Logits


def exit_logits(logits: Logits, name: str) -> list[Tensor]:
    """The K exits' ``[N, C]`` logits (views of a stacked tensor; no copy), checked for shape and finiteness."""
    if isinstance(logits, Tensor):
        if logits.dim() != 3:
            raise ValueError(
                f"{name} must be a Tensor[K, N, C] or a list of K Tensor[N, C]; got shape {list(logits.shape)}"
            )
        exits = list(logits.unbind(0))
    elif isinstance(logits, Sequence) and not isinstance(logits, (str, bytes)):
        exits = list(logits)
        for k, z in enumerate(exits):
            if not isinstance(z, Tensor):
                raise TypeError(f"{name}[{k}] must be a Tensor; got {type(z).__name__}")
            if z.dim() != 2:
                raise ValueError(f"{name}[{k}] must be a Tensor[N, C]; got shape {list(z.shape)}")
    else:
        raise TypeError(f"{name} must be a Tensor[K, N, C] or a list of K Tensor[N, C]; got {type(logits).__name__}")
    if not exits:
        raise ValueError(f"{name} must hold at least one exit")
    for k, z in enumerate(exits):
        if z.shape != exits[0].shape or z.device != exits[0].device:
            raise ValueError(
                f"{name}[{k}] has shape {list(z.shape)} on {z.device}, {name}[0] {list(exits[0].shape)} on "
                f"{exits[0].device}: every exit must share N, C and the device"
            )
        if not z.dtype.is_floating_point:
            raise TypeError(f"{name}[{k}] must be a floating tensor; got {z.dtype}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"{name}[{k}] holds non-finite values")
    if exits[0].shape[0] < 1 or exits[0].shape[1] < 1:
        raise ValueError(f"{name} must have N >= 1 samples and C >= 1 classes; got shape {list(exits[0].shape)}")
    return exits


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
