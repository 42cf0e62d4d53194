"""Pair selections: which (student i, teacher j) exit pairs carry a distillation loss."""

from __future__ import annotations

import torch
from torch import Tensor

PairSpec = str | Tensor
"""``"dense"``, ``"last"``, ``"adjacent"`` or a boolean ``Tensor[K, K]`` mask."""

PairMask = tuple[tuple[bool, ...], ...]
"""Hashable K×K mask: ``mask[i][j]`` is True when exit ``i`` learns from exit ``j``."""

PAIR_MODES = ("dense", "last", "adjacent")


def pair_mask(pairs: PairSpec, num_exits: int, *, detach_teacher: bool = True) -> PairMask:
    """Return the K×K selection mask of ``pairs`` as nested tuples of bools.

    - ``"dense"``: every ``i < j`` (each exit learns from every later exit; HDKD);
    - ``"last"``: ``j = K - 1`` and ``i < K - 1`` (the final exit teaches; DBT / EKD);
    - ``"adjacent"``: ``j = i + 1``;
    - a boolean ``Tensor[K, K]``: used as given. It must be strictly upper-triangular while
      ``detach_teacher=True`` (a deep exit is never pulled toward a shallow one); with
      ``detach_teacher=False`` any off-diagonal pair is allowed (mutual learning).
    """
    k = num_exits
    if isinstance(pairs, str):
        if pairs == "dense":
            return tuple(tuple(i < j for j in range(k)) for i in range(k))
        if pairs == "last":
            return tuple(tuple(i < j == k - 1 for j in range(k)) for i in range(k))
        if pairs == "adjacent":
            return tuple(tuple(j == i + 1 for j in range(k)) for i in range(k))
        raise ValueError(f"pairs must be one of {PAIR_MODES} or a boolean Tensor[K, K]; got {pairs!r}")
    if not isinstance(pairs, Tensor):
        raise TypeError(f"pairs must be a string or a boolean Tensor[K, K]; got {type(pairs).__name__}")
    if pairs.dtype != torch.bool:
        raise TypeError(f"pairs mask must have dtype torch.bool; got {pairs.dtype}")
    if pairs.shape != (k, k):
        raise ValueError(f"pairs mask must have shape [{k}, {k}] for {k} exits; got {list(pairs.shape)}")
    rows: list[list[bool]] = pairs.detach().cpu().tolist()
    if any(rows[i][i] for i in range(k)):
        raise ValueError("pairs mask must be False on the diagonal: an exit cannot distil from itself")
    if detach_teacher and any(rows[i][j] for i in range(k) for j in range(i)):
        raise ValueError(
            "pairs mask selects pairs below the diagonal (a later exit learning from an earlier one) "
            "while detach_teacher=True; use a strictly upper-triangular mask, or detach_teacher=False "
            "for mutual learning"
        )
    return tuple(tuple(bool(v) for v in row) for row in rows)


def mask_tensor(mask: PairMask, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The mask as a ``Tensor[K, K]`` of 0/1 in ``dtype`` on ``device``."""
    return torch.tensor(mask, dtype=dtype, device=device)


def selected_pairs(mask: PairMask) -> tuple[tuple[int, int], ...]:
    """The selected ``(student i, teacher j)`` pairs of ``mask`` in row-major order."""
    return tuple((i, j) for i, row in enumerate(mask) for j, on in enumerate(row) if on)
