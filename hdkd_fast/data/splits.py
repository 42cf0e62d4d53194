"""Seeded, reproducible splits: every split and epoch order is a pure function of integers.

Random streams are separated by a stream id: the generator of a split or epoch is
``torch.Generator().manual_seed(mix_seed(seed, stream, ...))``, so the validation split of seed 0 and
the epoch-0 order of seed 0 are independent draws, and any Python int is a valid seed.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .._validation import is_real

VAL_STREAM = 1
"""Stream id of the validation split held out from the training set."""
TEST_STREAM = 2
"""Stream id of the test split held out where a dataset has none (its seed is fixed, see :func:`load_dataset`)."""
EPOCH_STREAM = 3
"""Stream id of the epoch orders of :class:`~hdkd_fast.data.EpochLoader`."""
STATS_STREAM = 4
"""Stream id of the image sample that channel statistics are estimated on."""
TRAIN_SUBSET_STREAM = 5
"""Stream id of the training subset of ``load_dataset(train_size=...)``."""
NOISE_STREAM = 6
"""Stream id of the label noise of :mod:`hdkd_fast.data.noise` (one sub-stream per split)."""

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from any integers: SplitMix64's finalizer chained over them (negative ints wrap mod 2**64)."""
    state = 0
    for value in values:
        z = ((state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def seeded_permutation(n: int, *seed: int) -> Tensor:
    """``randperm(n)`` (int64, CPU) drawn from a generator seeded with ``mix_seed(*seed)``."""
    generator = torch.Generator().manual_seed(mix_seed(*seed))
    return torch.randperm(n, generator=generator)


def holdout_size(value: int | float | None, total: int, *, default: int | float, name: str = "val_size") -> int:
    """How many of ``total`` images a holdout of ``value`` takes (``None`` means ``default``).

    An int is a count in ``[0, total)``; a float is a fraction in ``(0, 1)``, rounded to the nearest count and
    at least 1. At least one image always stays on the other side. Errors name the argument ``name``.
    """
    if value is None:
        value = default
    if not is_real(value):
        raise TypeError(f"{name} must be an int (a number of images) or a float in (0, 1); got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        count = int(value)
        if count < 0:
            raise ValueError(f"{name} must be >= 0; got {count}")
    else:
        fraction = float(value)
        if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
            raise ValueError(f"{name} as a fraction must be in (0, 1); got {fraction}")
        count = max(1, round(fraction * total))
    if count >= total:
        raise ValueError(
            f"{name} = {value} holds out {count} images but the split it is taken from has only {total}: "
            "at least one must remain"
        )
    return count


def random_holdout(total: int, count: int, *seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(total)`` into ``(kept, held)``: ``held`` is ``count`` indices of a seeded permutation.

    Both are sorted, so a subset keeps the original order of the images.
    """
    permutation = seeded_permutation(total, *seed)
    return permutation[count:].sort().values, permutation[:count].sort().values


def stratified_holdout(labels: Tensor, fraction: float, *seed: int) -> tuple[Tensor, Tensor]:
    """Split like :func:`random_holdout`, holding out ``round(fraction * n_c)`` images of every class ``c``."""
    generator = torch.Generator().manual_seed(mix_seed(*seed))
    held = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        take = round(fraction * members.numel())
        held.append(members[torch.randperm(members.numel(), generator=generator)[:take]])
    held_mask = torch.zeros(labels.numel(), dtype=torch.bool)
    if held:
        held_mask[torch.cat(held)] = True
    return torch.nonzero(~held_mask).flatten(), torch.nonzero(held_mask).flatten()
