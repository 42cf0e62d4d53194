r"""ERDE: a frozen teacher early-exit model trains a smaller student early-exit model, exit by exit.

Entropy-Regularized Distillation for Early-exit (Guidez et al., 2025): student exit k learns from the
matching teacher exit (:func:`match_exits`) with temperature KL plus cross-entropy, except on the samples
the teacher exit gets wrong, where the KL term is replaced by an entropy term that *raises* the student's
prediction entropy. Entropy-threshold exiting (:class:`hdkd_fast.inference.EarlyExit` with
``criterion="entropy"``) then lets those samples go on to later exits instead of answering them early.
The paper's exact entropy term is not public; :class:`ERDELoss` documents the form used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._validation import (
    accumulation_dtype,
    check_count,
    check_ignore_index,
    check_int,
    check_logits,
    check_nonnegative,
    check_temperature,
)
from ..backends import check_backend
from ..functional import dense_kd_losses


def match_exits(num_student: int, num_teacher: int) -> list[int]:
    r"""The teacher exit each student exit learns from: ``result[k]`` is a teacher exit index.

    Equal counts map exit k to exit k. Otherwise exit k (relative depth :math:`(k+1)/K_s`) maps to the
    teacher exit of nearest relative depth :math:`(j+1)/K_t`, ties toward the deeper one:
    :math:`j = \max\big(0, \lfloor (k+1) K_t / K_s + \tfrac12 \rfloor - 1\big)`. The last student exit
    always maps to the last teacher exit. E.g. ``match_exits(3, 7) == [1, 4, 6]``,
    ``match_exits(4, 2) == [0, 0, 1, 1]``.
    """
    ks = check_count(num_student, "num_student")
    kt = check_count(num_teacher, "num_teacher")
    if ks == kt:
        return list(range(ks))
    # round half up of (k + 1) * kt / ks in integers: floor((2 (k + 1) kt + ks) / (2 ks))
    return [max(0, (2 * (k + 1) * kt + ks) // (2 * ks) - 1) for k in range(ks)]


def _check_match(match: Sequence[int], num_student: int, num_teacher: int) -> tuple[int, ...]:
    if isinstance(match, (str, bytes)) or not isinstance(match, Sequence):
        raise TypeError(f"match must be a sequence of teacher exit indices; got {type(match).__name__}")
    if len(match) != num_student:
        raise ValueError(f"match must hold one teacher exit per student exit ({num_student}); got {len(match)}")
    checked = []
    for k, j in enumerate(match):
        checked.append(check_int(j, f"match[{k}]"))
        if not 0 <= checked[-1] < num_teacher:
            raise ValueError(f"match[{k}] = {j} is not a teacher exit index in [0, {num_teacher})")
    return tuple(checked)


def _normalized_neg_entropy(logits: Tensor) -> Tensor:
    r""":math:`-H(\mathrm{softmax}(z)) / \log C` per row of ``logits [B, C]``, in [-1, 0] (C >= 2)."""
    log_p = torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)), dim=1)
    return (log_p.exp() * log_p).sum(dim=1) / math.log(logits.shape[1])


class ERDELoss(nn.Module):
    r"""Teacher-to-student early-exit distillation with an entropy term on the teacher's mistakes (ERDE).

    ``forward(student_logits, teacher_logits, target)`` takes the :math:`K_s` exits of the student and the
    :math:`K_t` exits of the frozen teacher (detached here) on the same batch and returns

    .. math:: L = \sum_{k<K_s} \mathrm{ce}_k + \frac{1}{B} \sum_{k<K_s} \sum_b \Big[
              (1 - m_{kb})\, \gamma\, T^2\, \mathrm{KL}\big(p^t_{\pi(k), b} \,\|\, p^s_{k, b}\big)
              + m_{kb}\, \eta\, \frac{-H\big(\mathrm{softmax}(z^s_{k, b})\big)}{\log C} \Big]

    - :math:`\mathrm{ce}_k` is the mean CE of student exit k over the rows whose label is not ``ignore_index``;
    - :math:`\pi(k)` = ``match[k]`` (default :func:`match_exits`), :math:`p = \mathrm{softmax}(z / T)`;
    - :math:`m_{kb} = 1` when teacher exit :math:`\pi(k)` misclassifies sample b
      (:math:`\arg\max_c z^t_{\pi(k), b, c} \ne y_b`; rows with ``ignore_index`` labels count as correct);
    - :math:`H(q) = -\sum_c q_c \log q_c` at temperature 1, the quantity ``EarlyExit(criterion="entropy")``
      thresholds; divided by :math:`\log C` it lies in [0, 1], so the term lies in [-1, 0] and minimizing it
      **raises** the student's entropy on the teacher's mistakes. Its gradient is
      :math:`\partial / \partial z = q \odot (\log q + H) / \log C` with :math:`q = \mathrm{softmax}(z)`.
      This is our reading of the paper, whose exact form is not public.

    Both sums over b divide by the full batch size B (as ``batchmean`` KD does). The KD of every student
    exit from its teacher exit comes from **one** fused :func:`hdkd_fast.dense_kd_losses` call on the
    concatenated exits ``[student..., teacher...]`` with the pair mask ``mask[k, K_s + π(k)]`` and
    ``reduction="none"`` (per-row values, so the mistakes can be masked out); the same call gives the CE rows.
    With a teacher right on every sample this is plain per-exit KD + CE.

    Args:
        num_student_exits: :math:`K_s`.
        num_teacher_exits: :math:`K_t`.
        temperature: T > 0 of the KD term.
        kd_weight: γ >= 0.
        entropy_weight: η >= 0.
        match: optional explicit map student exit -> teacher exit (length :math:`K_s`).
        ignore_index: label value whose rows are left out of the CE (and never count as teacher mistakes).
        backend: backend of the fused op (see :func:`hdkd_fast.available_backends`).

    Teacher logits of another dtype than the student's are cast to the student's dtype.
    """

    def __init__(
        self,
        num_student_exits: int,
        num_teacher_exits: int,
        temperature: float = 4.0,
        kd_weight: float = 1.0,
        entropy_weight: float = 1.0,
        *,
        match: Sequence[int] | None = None,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_student_exits = check_count(num_student_exits, "num_student_exits")
        self.num_teacher_exits = check_count(num_teacher_exits, "num_teacher_exits")
        ks, kt = self.num_student_exits, self.num_teacher_exits
        self.match: tuple[int, ...] = (
            tuple(match_exits(ks, kt)) if match is None else _check_match(match, ks, kt)
        )
        self.temperature = check_temperature(temperature)
        self.kd_weight = check_nonnegative(kd_weight, "kd_weight")
        self.entropy_weight = check_nonnegative(entropy_weight, "entropy_weight")
        self.ignore_index = check_ignore_index(ignore_index)
        self.backend = check_backend(backend)
        pairs = torch.zeros(ks + kt, ks + kt, dtype=torch.bool)
        pairs[torch.arange(ks), ks + torch.tensor(self.match)] = True
        self._pairs = pairs  # host tensor: the op reads masks on the host

    def forward(
        self, student_logits: Tensor | Sequence[Tensor], teacher_logits: Tensor | Sequence[Tensor], target: Tensor
    ) -> Tensor:
        student = check_logits(student_logits, "student_logits").exits()
        teacher = check_logits(teacher_logits, "teacher_logits").exits()
        ks, kt = self.num_student_exits, self.num_teacher_exits
        if len(student) != ks:
            raise ValueError(f"student_logits hold {len(student)} exits but this ERDELoss was built for {ks}")
        if len(teacher) != kt:
            raise ValueError(f"teacher_logits hold {len(teacher)} exits but this ERDELoss was built for {kt}")
        first = student[0]
        if first.dim() != 2:
            raise ValueError(f"student_logits[0] must be a Tensor[B, C]; got shape {list(first.shape)}")
        for j, t in enumerate(teacher):
            if t.shape != first.shape:
                raise ValueError(
                    f"teacher_logits[{j}] has shape {list(t.shape)} but student_logits[0] has {list(first.shape)}: "
                    "teacher and student must see the same batch and classes"
                )
            if t.device != first.device:
                raise ValueError(f"teacher_logits[{j}] is on {t.device} but student_logits[0] is on {first.device}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"teacher_logits[{j}] must be a floating tensor; got dtype {t.dtype}")
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be an integer Tensor[B] (ERDE needs labels); got {type(target).__name__}")
        batch, classes = first.shape
        if classes < 2:
            raise ValueError(f"ERDE needs C >= 2 classes (the entropy is divided by log C); got C = {classes}")
        teacher = [t.detach().to(first.dtype) for t in teacher]
        out = dense_kd_losses(
            [*student, *teacher], target, temperature=self.temperature, pairs=self._pairs,
            ignore_index=self.ignore_index, reduction="none", backend=self.backend,
        )
        assert out.ce is not None
        match = torch.tensor(self.match, device=first.device)
        n_valid = (target != self.ignore_index).sum().clamp(min=1)
        ce = out.ce[:ks].sum(dim=1) / n_valid  # [K_s]: mean over the labelled rows
        kd = out.kd[torch.arange(ks, device=first.device), ks + match]  # [K_s, B]
        teacher_pred = torch.stack([t.argmax(dim=1) for t in teacher])  # [K_t, B]
        wrong = (teacher_pred[match] != target) & (target != self.ignore_index)  # [K_s, B]
        neg_entropy = torch.stack([_normalized_neg_entropy(z) for z in student])  # [K_s, B]
        rows = torch.where(wrong, self.entropy_weight * neg_entropy, self.kd_weight * kd)
        return ce.sum() + rows.sum() / batch

    def extra_repr(self) -> str:
        return (f"num_student_exits={self.num_student_exits}, num_teacher_exits={self.num_teacher_exits}, "
                f"match={self.match}, temperature={self.temperature}, kd_weight={self.kd_weight}, "
                f"entropy_weight={self.entropy_weight}")
