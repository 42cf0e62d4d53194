r"""Temperature schedules for distillation-based training of multi-exit networks (DBT).

Distillation-Based Training (Phuong & Lampert, ICCV 2019, "Distillation-Based Training for Multi-Exit
Architectures") distils the last exit into every earlier one (``pairs="last"``) with the loss
:math:`(1 - C) \sum_k \mathrm{CE}_k + C\, T^2 \sum_{k<K-1} \mathrm{CE}(p_{K-1}, p_k)` (C = 0.5 in their
CIFAR configuration; their cross-entropy to the detached teacher differs from KL by the teacher's
entropy, which has no gradient, so ``hk.dense_kd(logits, y, ce_weight=1 - C, kd_weight=C, pairs="last",
temperature=T)`` trains the same). The temperature is **not** an epoch schedule: it adapts to the teacher.
The authors' code (``mary-phuong/multiexit-distillation``, ``main.py``, ``DistillationBasedLoss``) starts
at T = 1 and, after every training step, multiplies T by 1.05 whenever the mean over the batch of the
softened teacher's largest probability, :math:`\mathrm{mean}_b \max_c \mathrm{softmax}(z_{K-1}/T)_{b,c}`,
exceeds 0.5; T never decreases. :class:`DBTTemperature` implements that rule; :func:`dbt_temperature` is a
deterministic per-epoch alternative for runs that want a fixed, reproducible schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import accumulation_dtype, check_count, check_positive

SCHEDULES = ("geometric", "linear")


def dbt_temperature(
    epoch: int, num_epochs: int, *, start: float = 1.0, end: float = 4.0, schedule: str = "geometric"
) -> float:
    r"""A fixed per-epoch temperature schedule from ``start`` (epoch 0) to ``end`` (the last epoch).

    With progress :math:`t = e / (E - 1)` (:math:`t = 0` when E = 1):

    - ``"geometric"`` (default): :math:`T = T_0 (T_1 / T_0)^t`, the multiplicative growth of DBT's rule
      (:class:`DBTTemperature`) spread evenly over the run instead of driven by the teacher;
    - ``"linear"``: :math:`T = T_0 + (T_1 - T_0)\, t`.

    Args:
        epoch: the current epoch, 0 <= epoch < num_epochs.
        num_epochs: E >= 1.
        start, end: :math:`T_0, T_1 > 0` (``end < start`` anneals downward).
        schedule: ``"geometric"`` or ``"linear"``.
    """
    n = check_count(num_epochs, "num_epochs")
    e = check_count(epoch, "epoch", minimum=0)
    if e >= n:
        raise ValueError(f"epoch must be in [0, num_epochs) = [0, {n}); got {epoch}")
    t0, t1 = check_positive(start, "start"), check_positive(end, "end")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    progress = e / (n - 1) if n > 1 else 0.0
    if schedule == "geometric":
        return t0 * (t1 / t0) ** progress
    return t0 + (t1 - t0) * progress


class DBTTemperature:
    r"""DBT's adaptive temperature (Phuong & Lampert 2019): raise T while the softened teacher is too confident.

    ``step(teacher_logits)``, called once per training step after the loss used :attr:`temperature`,
    computes :math:`m = \mathrm{mean}_b \max_c \mathrm{softmax}(z_b / T)_c` of the teacher (the last
    exit's logits ``[B, C]``, read without gradient) and sets :math:`T \leftarrow \rho T` when
    :math:`m > q`; it returns the temperature for the next step. T never decreases.

    Args:
        initial: the starting temperature (DBT: 1.0).
        target_max_prob: q in (0, 1) (DBT: 0.5). It must exceed 1/C, the limit of m as T grows.
        factor: ρ > 1 (DBT: 1.05).
        sync: under an initialized ``torch.distributed`` process group, average m over the ranks (one
            all-reduce of a scalar) so that every rank keeps the same T.

    ``state_dict()`` / ``load_state_dict()`` hold T, for resuming a run.
    """

    def __init__(
        self, initial: float = 1.0, target_max_prob: float = 0.5, factor: float = 1.05, *, sync: bool = True
    ) -> None:
        self.temperature = check_positive(initial, "initial")
        q = check_positive(target_max_prob, "target_max_prob")
        if q >= 1:
            raise ValueError(f"target_max_prob must be in (0, 1); got {target_max_prob}")
        rho = check_positive(factor, "factor")
        if rho <= 1:
            raise ValueError(f"factor must be > 1; got {factor}")
        self.target_max_prob = q
        self.factor = rho
        self.sync = bool(sync)

    def mean_max_prob(self, teacher_logits: Tensor) -> float:
        r""":math:`\mathrm{mean}_b \max_c \mathrm{softmax}(z_b / T)_c` at the current T (averaged over ranks
        with ``sync``)."""
        if not isinstance(teacher_logits, Tensor):
            raise TypeError(f"teacher_logits must be a Tensor[B, C]; got {type(teacher_logits).__name__}")
        if teacher_logits.dim() != 2 or teacher_logits.shape[0] < 1:
            raise ValueError(f"teacher_logits must be a Tensor[B, C] with B >= 1; got shape "
                             f"{list(teacher_logits.shape)}")
        if not teacher_logits.dtype.is_floating_point:
            raise TypeError(f"teacher_logits must be a floating tensor; got dtype {teacher_logits.dtype}")
        classes = teacher_logits.shape[1]
        if self.target_max_prob <= 1.0 / classes:
            raise ValueError(
                f"target_max_prob = {self.target_max_prob} must exceed 1/C = 1/{classes}: the teacher's largest "
                "probability never falls below 1/C, so the temperature would grow without bound"
            )
        with torch.no_grad():
            z = teacher_logits.detach().to(accumulation_dtype(teacher_logits.dtype))
            m = torch.softmax(z / self.temperature, dim=1).amax(dim=1).mean()
            if self.sync and dist.is_available() and dist.is_initialized():
                dist.all_reduce(m)
                m = m / dist.get_world_size()
        return float(m)

    def step(self, teacher_logits: Tensor) -> float:
        """Update T from the teacher's logits of this step (see the class docstring); return the new T."""
        if self.mean_max_prob(teacher_logits) > self.target_max_prob:
            self.temperature *= self.factor
        return self.temperature

    def state_dict(self) -> dict[str, float]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.temperature = check_positive(state["temperature"], "state['temperature']")

    def __repr__(self) -> str:
        return (f"DBTTemperature(temperature={self.temperature}, target_max_prob={self.target_max_prob}, "
                f"factor={self.factor})")
