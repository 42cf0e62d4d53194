"""The readable loop over exit pairs that :class:`hdkd_fast.DenseKD` replaces.

Swapping ``hdkd_fast.reference.DenseKD`` for ``hdkd_fast.DenseKD`` is the whole migration: same
constructor, same ``forward``. One ``F.cross_entropy`` per exit and one ``F.kl_div`` per selected
pair, each recomputing its log-softmaxes: the cost grows with the number of pairs. Kept as the
baseline of the benchmarks and as executable documentation of the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._pairs import PairSpec, pair_mask
from ._types import LossWeights
from ._validation import Logits, accumulation_dtype


class DenseKD(nn.Module):
    """``sum_k ce_weight[k] * CE(z_k, y) + sum_{i,j selected} kd_weight[i, j] * T² KL(p_j || p_i)``,
    written as a loop. Arguments as :class:`hdkd_fast.DenseKD` (``backend`` is accepted and unused)."""

    def __init__(
        self,
        num_exits: int | None = None,
        temperature: float = 4.0,
        ce_weight: float | Tensor = 1.0,
        kd_weight: float | Tensor = 1.0,
        pairs: PairSpec = "dense",
        detach_teacher: bool = True,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_exits = num_exits
        self.temperature = float(temperature)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.pairs = pairs
        self.detach_teacher = detach_teacher
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, logits: Logits, target: Tensor | None = None, weights: LossWeights | None = None) -> Tensor:
        exits = list(logits.unbind(0) if isinstance(logits, Tensor) else logits)
        exits = [z.to(accumulation_dtype(z.dtype)) for z in exits]
        k, t = len(exits), self.temperature
        ce_weight, kd_weight = (self.ce_weight, self.kd_weight) if weights is None else (weights.ce, weights.kd)
        mask = pair_mask(self.pairs, k, detach_teacher=self.detach_teacher)
        loss = exits[0].new_zeros(())
        if target is not None:
            n_valid = (target != self.ignore_index).sum().clamp(min=1)
            for i in range(k):
                ce = F.cross_entropy(exits[i], target, ignore_index=self.ignore_index, reduction="sum") / n_valid
                loss = loss + _at(ce_weight, i) * ce
        for i in range(k):
            for j in range(k):
                if mask[i][j]:
                    teacher = exits[j].detach() if self.detach_teacher else exits[j]
                    kd = F.kl_div(
                        F.log_softmax(exits[i] / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                        reduction="batchmean", log_target=True,
                    ) * t * t
                    loss = loss + _at(kd_weight, i, j) * kd
        return loss


def _at(weight: float | Tensor, *index: int) -> float | Tensor:
    return weight[index] if isinstance(weight, torch.Tensor) else weight
