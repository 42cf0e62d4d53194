r"""Symmetric label noise (``hdkd-fast train --label-noise P``): how well a method learns from wrong labels.

Definition (the standard "symmetric" noise): every label :math:`y` of a split with :math:`C` classes is,
independently with probability :math:`P`, replaced by a label drawn uniformly from the :math:`C-1` *other*
classes, and kept otherwise; the noise transition matrix is :math:`T_{yy} = 1-P`,
:math:`T_{yj} = P/(C-1)` for :math:`j \ne y`. A replaced label is never the original class, so the
expected fraction of wrong labels is exactly :math:`P` (drawing from all :math:`C` classes, the other
common definition, would leave :math:`P/C` of them right).

Draws: per image :math:`i` of the split, :math:`u_i \sim U[0, 1)` and an offset :math:`o_i` uniform in
:math:`\{1, \dots, C-1\}`, from a generator seeded with ``mix_seed(seed, NOISE_STREAM, split)``; the label
becomes :math:`(y_i + o_i) \bmod C` when :math:`u_i < P`. The noisy labels are therefore a pure function of
the seed, the split and its labels in order: the same for every method, process and batch order, and the
noise of a larger :math:`P` flips a superset of the labels a smaller one flips, to the same classes.

A training run (:func:`hdkd_fast.training.train`) applies it last, to the splits it trains on: after the
validation split is held out, ``train_size`` subsets the training split and ``limit`` cuts every split, so
that every run with the same seed and data settings trains on the same images with the same noisy labels.
Only the training split is noisy unless ``validation`` (``--label-noise-validation``) makes the validation
split noisy too (with the same :math:`P`, an independent draw); the test split is always clean.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .._validation import check_real
from .load import DataBundle
from .splits import NOISE_STREAM, mix_seed

TRAIN_SPLIT, VAL_SPLIT = 0, 1
"""The sub-streams of :data:`~hdkd_fast.data.splits.NOISE_STREAM` of the training and validation splits."""


def check_noise_rate(p: object, name: str = "p") -> float:
    """``p`` as a float in [0, 1) (a rate of 1 would leave no label right); errors name ``name``."""
    rate = check_real(p, name, "a real number in [0, 1)")
    if not (math.isfinite(rate) and 0 <= rate < 1):
        raise ValueError(f"{name} must be a probability in [0, 1) (the fraction of labels replaced by another "
                         f"class); got {p}")
    return rate


def symmetric_noise(labels: Tensor, num_classes: int, p: float, *seed: int) -> Tensor:
    """``labels`` (integers in ``[0, num_classes)``) with symmetric noise of rate ``p`` drawn from ``seed``
    (any integers, see :func:`~hdkd_fast.data.splits.mix_seed`); a new int64 CPU tensor (see the module
    docstring)."""
    p = check_noise_rate(p)
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer Tensor")
    labels = labels.to(device="cpu", dtype=torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    if p > 0 and num_classes < 2:
        raise ValueError(f"label noise needs two classes or more; got num_classes={num_classes}")
    if p == 0:
        return labels.clone()
    generator = torch.Generator().manual_seed(mix_seed(*seed))
    flip = torch.rand(labels.shape, generator=generator) < p
    offset = torch.randint(1, num_classes, labels.shape, generator=generator)
    return torch.where(flip, (labels + offset) % num_classes, labels)


def with_label_noise(data: DataBundle, p: float, seed: int, *, validation: bool = False) -> DataBundle:
    """``data`` with symmetric noise of rate ``p`` on its training labels (and its validation labels when
    ``validation``), drawn from ``seed``; the test split is untouched, the images are shared."""
    splits = {"train": TRAIN_SPLIT, **({"val": VAL_SPLIT} if validation else {})}
    if check_noise_rate(p) == 0:
        return data
    noisy = {name: getattr(data, name).relabeled(
        symmetric_noise(getattr(data, name).labels, data.num_classes, p, seed, NOISE_STREAM, split))
        for name, split in splits.items()}
    return dataclasses.replace(data, **noisy)
