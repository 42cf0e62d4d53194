"""Argument checks of the public loss API: every error names the argument at fault."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
from torch import Tensor

Logits = Tensor | Sequence[Tensor]
"""``Tensor[K, B, C]`` or a sequence of K ``Tensor[B, C]``."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
TEMPERATURE_RANGE = (1e-3, 1e3)
"""The supported temperatures, bounds included. Beyond them float32 cannot carry the KD losses: the
KL at temperature T is a difference of O(log C) terms of size O(1 / T²) (1 % relative error in
float32 at T = 1e3, none left at 1e4), T² overflows float32 from 1.8e19, and the native CPU kernel's
exp polynomial (coefficients ∝ 1 / T⁵) overflows below 1e-8."""


class LogitsInfo(NamedTuple):
    """Normalized logits: the tensors handed to the op and their common geometry."""

    tensors: tuple[Tensor, ...]  # (stacked [K, B, C],) or K tensors [B, C]
    stacked: bool
    num_exits: int
    batch: int
    classes: int
    dtype: torch.dtype
    device: torch.device

    def exits(self) -> list[Tensor]:
        """The K exits' ``[B, C]`` logits (views of a stacked tensor: no copy)."""
        return list(self.tensors[0].unbind(0)) if self.stacked else list(self.tensors)


def check_logits(logits: object, name: str = "logits", *, num_exits: int | None = None,
                 finite: bool = False) -> LogitsInfo:
    """Validate K exits' logits, ``Tensor[K, B, C]`` or a sequence of K ``Tensor[B, C]``: rank, a
    floating dtype, agreement of the exits in B, C, dtype and device, K = ``num_exits`` when given, and
    with ``finite=True`` no NaN or infinity (one host sync). Every error names ``name``. The one logits
    checker of the package: the loss API, the distillation losses, the evaluation and the bilevel step
    (``name="model(x)"``) all call it."""
    expected = f"{name} must be a Tensor[K, B, C] or a sequence of K Tensor[B, C]"
    if isinstance(logits, Tensor):
        if logits.dim() != 3:
            raise ValueError(f"{expected}; got a {logits.dim()}-D tensor of shape {list(logits.shape)}")
        _check_float(logits, name)
        k, b, c = logits.shape
        tensors: tuple[Tensor, ...] = (logits,)
        stacked = True
    elif isinstance(logits, Sequence) and not isinstance(logits, (str, bytes)):
        tensors = tuple(logits)
        if not tensors:
            raise ValueError(f"{name} must hold at least one exit (K >= 1); got an empty sequence")
        for k_, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{k_}] must be a Tensor; got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"{name}[{k_}] must be a Tensor[B, C]; got shape {list(t.shape)}")
            _check_float(t, f"{name}[{k_}]")
        first = tensors[0]
        for k_, t in enumerate(tensors[1:], start=1):
            if t.shape != first.shape:
                raise ValueError(
                    f"{name}[{k_}] has shape {list(t.shape)} but {name}[0] has {list(first.shape)}: "
                    "every exit must share B and C"
                )
            if t.dtype != first.dtype:
                raise TypeError(f"{name}[{k_}] has dtype {t.dtype} but {name}[0] has {first.dtype}")
            if t.device != first.device:
                raise ValueError(f"{name}[{k_}] is on {t.device} but {name}[0] is on {first.device}")
        k = len(tensors)
        b, c = first.shape
        stacked = False
    else:
        raise TypeError(f"{expected}; got {type(logits).__name__}")
    if k < 1:
        raise ValueError(f"{name} must hold at least one exit (K >= 1); got K = 0")
    if b < 1 or c < 1:
        raise ValueError(f"{name} must have B >= 1 rows and C >= 1 classes; got B = {b}, C = {c}")
    if num_exits is not None and k != num_exits:
        raise ValueError(f"{name} holds {k} exits but num_exits={num_exits}")
    if finite:
        for k_, t in enumerate(tensors):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}{'' if stacked else f'[{k_}]'} holds non-finite values")
    return LogitsInfo(tensors, stacked, int(k), int(b), int(c), tensors[0].dtype, tensors[0].device)


def _check_float(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")


def check_target(target: Tensor | None, info: LogitsInfo) -> Tensor | None:
    """Validate the shape, dtype and device of ``target`` (its values are checked by the op) and return
    it as int64, the labels every backend indexes with (uint8 / int8 / int16 / int32 are widened)."""
    if target is None:
        return None
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be an integer Tensor[B] or None; got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices; got dtype {target.dtype}")
    if target.shape != (info.batch,):
        raise ValueError(f"target must have shape [B] = [{info.batch}]; got {list(target.shape)}")
    if target.device != info.device:
        raise ValueError(f"target is on {target.device} but logits are on {info.device}")
    return target.long()


def check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise when a label is outside ``[0, C)`` and is not ``ignore_index`` (one host sync). Compared as
    int64: a narrower dtype would wrap ``ignore_index`` (uint8 reads -100 as 156)."""
    labels = target.long()
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"target holds label {first} outside [0, {num_classes}) that is not ignore_index={ignore_index}"
        )


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")


def is_int(value: object) -> bool:
    """An integer that is not a bool (``isinstance(True, int)`` holds): the test of every int argument."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value: object, name: str, what: str = "an int") -> int:
    """An int (not a bool); a ``TypeError`` "``name`` must be ``what``; got <type>" otherwise."""
    if not is_int(value):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__}")
    return int(cast(numbers.Integral, value))


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An int (not a bool) ``>= minimum``: a ``TypeError`` for another type, a ``ValueError`` below it."""
    count = check_int(value, name)
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return count


def check_positive_int(value: object, name: str, what: str = "a positive int") -> int:
    """An int (not a bool) ``>= 1``, with one ``ValueError`` "``name`` must be ``what``; got <value!r>" for a
    wrong type or value alike (the constructors' message; :func:`check_count` tells the two apart)."""
    if not is_int(value) or int(cast(numbers.Integral, value)) < 1:
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return int(cast(numbers.Integral, value))


def check_positive(value: object, name: str) -> float:
    """A finite real number ``> 0`` (not a bool)."""
    result = check_real(value, name)
    if not math.isfinite(result) or result <= 0:
        raise ValueError(f"{name} must be finite and > 0; got {value}")
    return result


def check_nonnegative(value: object, name: str) -> float:
    """A finite real number ``>= 0`` (not a bool)."""
    result = check_real(value, name)
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{name} must be finite and >= 0; got {value}")
    return result


def check_real(value: object, name: str, what: str = "a real number") -> float:
    """A real number (not a bool) as a float; a ``TypeError`` "``name`` must be ``what``; got <type>" otherwise."""
    if not is_real(value):
        raise TypeError(f"{name} must be {what}; got {type(value).__name__}")
    return float(cast(numbers.Real, value))


def check_temperature(temperature: float) -> float:
    """A real number in :data:`TEMPERATURE_RANGE` (every backend computes the losses there)."""
    result = check_real(temperature, "temperature")
    low, high = TEMPERATURE_RANGE
    if not low <= result <= high:  # also rejects NaN
        raise ValueError(f"temperature must be in [{low:g}, {high:g}]; got {temperature}")
    return result


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    return reduction


def check_ignore_index(ignore_index: int) -> int:
    return check_int(ignore_index, "ignore_index")


def check_weight(
    weight: float | Tensor, name: str, shape: tuple[int, ...], info: LogitsInfo
) -> Tensor | float:
    """A real number, or a floating tensor of exactly ``shape`` on the logits' device."""
    if isinstance(weight, Tensor):
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor; got dtype {weight.dtype}")
        if tuple(weight.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}; got {list(weight.shape)}")
        if weight.device != info.device:
            raise ValueError(f"{name} is on {weight.device} but logits are on {info.device}")
        return weight
    if not is_real(weight):
        raise TypeError(f"{name} must be a real number or a Tensor{list(shape)}; got {type(weight).__name__}")
    if not math.isfinite(float(weight)):
        raise ValueError(f"{name} must be finite; got {weight}")
    return float(weight)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/float16/bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
