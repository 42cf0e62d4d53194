"""``TrainConfig``: every setting of one training run (the arguments of ``hdkd-fast train``).

Written to ``config.json`` in the run directory and stored in every checkpoint, so ``--resume`` and
``hdkd-fast evaluate`` rebuild exactly the same run.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from .._validation import check_choice, check_count, check_nonnegative, check_positive
from ..backends import backend_choices
from ..bilevel.hdkd import VALIDATION_OBJECTIVES
from ..bilevel.hypergrad import HYPERGRAD_MODES, STEP_LENGTHS
from ..bilevel.weights import PARAMETERIZATIONS
from ..data.load import IDX_DATASETS
from ..data.noise import check_noise_rate
from ..evaluation import BUDGET_PROTOCOLS, DEFAULT_BUDGET_PROTOCOL
from .methods import METHODS, method_class

SCHEDULES = ("multistep", "cosine")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
DBT_SCHEDULES = ("adaptive", "constant")

RESUME_FIELDS = ("epochs", "progress", "workers")
"""The settings ``train(config, resume=True)`` takes from ``config`` (besides ``out``, and ``device``, where
the run continues); every other one comes from the checkpoint."""

NEUTRAL_FIELDS = ("out", "device", "progress", "workers")
"""The settings that say where and how a run's process works, not what it trains: its directory, the device
(``--resume`` may continue a run on another; ``amp`` and ``channels_last`` are compared as given, so ``auto``
follows the device), the progress bars and the data-loader processes (batches do not depend on them).
``hdkd-fast compare`` reuses a stored run whose every other setting equals the request."""

PAPER_EPOCHS = 300
"""MSDNet / HDKD CIFAR recipe: 300 epochs, batch 64, SGD lr 0.1 (÷10 at 50 % and 75 %), momentum 0.9,
weight decay 1e-4. The embedded digits default trains for :data:`DIGITS_EPOCHS` instead."""
DIGITS_EPOCHS = 12
IDX_EPOCHS = 15
"""The MNIST family (28×28 grayscale, 55000 training images) defaults to ``msdnet-tiny`` for this many epochs,
a CPU budget. 28×28 is CIFAR-sized, so the CIFAR stem (no early downsampling) fits; measured at 1×28×28
(:func:`hdkd_fast.evaluation.exit_costs`), ``msdnet-tiny`` has 0.80 M parameters, 4 exits and 45 MFLOPs to
its last, the CIFAR MSDNet 2.99 M, 7 exits and 128 MFLOPs (a training step about 2× slower on a CPU; pass
``--model msdnet`` for it)."""


@dataclass
class TrainConfig:
    """Settings of one run; ``None`` means "the default for the dataset" (resolved by :meth:`resolved`)."""

    method: str = "hdkd"
    dataset: str | None = None
    data_dir: str | None = None
    model: str | None = None
    out: str | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    temperature: float = 4.0
    val_size: float | None = None
    limit: int | None = None
    image_size: int | None = None
    train_size: int | None = None
    label_noise: float = 0.0
    """Symmetric noise on the training labels: each replaced, with this probability, by one of the other
    classes (:mod:`hdkd_fast.data.noise`); 0 = clean."""
    label_noise_validation: bool = False
    """The validation labels get the same noise rate too (the test labels stay clean)."""
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    backend: str = "auto"
    workers: int = 0
    # hdkd
    hypergrad: str = "auto"
    weight_lr: float = 1e-2
    weight_parameterization: str = "per_exit"
    step_length: str = "free"
    update_every: int = 16  # bench/RESULTS.md (issue 23 item 2): 1.1× a ce run, the accuracy of every step
    validation: str = "ce"
    # dbt
    dbt_schedule: str = "adaptive"
    # ekd
    feature_weight: float = 1.0
    # erde
    teacher: str | None = None
    entropy_weight: float = 1.0
    # dkd-uncertainty
    uncertainty_lambda: float = 1.0
    # any method
    gradient_equilibrium: bool = False
    budget_protocol: str = DEFAULT_BUDGET_PROTOCOL
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with the dataset-dependent defaults filled in (``dataset`` must be known)."""
        if self.dataset is None:
            raise ValueError("resolved() needs the dataset name")
        small = self.dataset == "digits"
        mnist = self.dataset in IDX_DATASETS
        epochs = DIGITS_EPOCHS if small else IDX_EPOCHS if mnist else PAPER_EPOCHS
        return dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else epochs,
            model=self.model if self.model is not None else ("msdnet-tiny" if small or mnist else "msdnet"),
        )

    def validate(self) -> TrainConfig:
        """Check every field; raise a ``ValueError``/``TypeError`` naming the offending argument."""
        method = method_class(self.method)
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_choice(self.amp, "amp", AMP_MODES)
        check_choice(self.device, "device", DEVICES)
        check_choice(self.hypergrad, "hypergrad", HYPERGRAD_MODES)
        check_choice(self.weight_parameterization, "weight_parameterization", PARAMETERIZATIONS)
        check_choice(self.step_length, "step_length", STEP_LENGTHS)
        check_choice(self.validation, "validation", VALIDATION_OBJECTIVES)
        check_choice(self.dbt_schedule, "dbt_schedule", DBT_SCHEDULES)
        check_choice(self.budget_protocol, "budget_protocol", tuple(BUDGET_PROTOCOLS))
        check_choice(self.backend, "backend", backend_choices())
        check_count(self.batch_size, "batch_size", minimum=2)  # BatchNorm trains on two samples or more
        check_count(self.update_every, "update_every")
        for name in ("epochs", "limit", "image_size", "train_size"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        check_count(self.workers, "workers", minimum=0)
        check_count(self.seed, "seed", minimum=0)
        for name in ("lr", "temperature", "weight_lr"):
            check_positive(getattr(self, name), name)
        for name in ("momentum", "weight_decay", "feature_weight", "entropy_weight", "uncertainty_lambda"):
            check_nonnegative(getattr(self, name), name)
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1]; got {self.gamma!r}")
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing fractions of the run in (0, 1); got {self.milestones}")
        check_noise_rate(self.label_noise, "label_noise (--label-noise)")
        if self.label_noise_validation and self.label_noise == 0:
            raise ValueError("label_noise_validation (--label-noise-validation) needs label_noise "
                             "(--label-noise) > 0: it gives the validation labels the same noise")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if self.val_size is not None and (not isinstance(self.val_size, numbers.Real) or self.val_size <= 0):
            raise ValueError(f"val_size must be a positive count or a fraction in (0, 1); got {self.val_size!r}")
        if method.needs_teacher and not self.teacher:
            raise ValueError(f"method {self.method!r} needs --teacher CHECKPOINT (a run directory or its "
                             "checkpoint.pt)")
        if not method.needs_teacher and self.teacher:
            teachers = " or ".join(repr(name) for name, cls in METHODS.items() if cls.needs_teacher)
            raise ValueError(f"--teacher is only used by method {teachers}, not {self.method!r}")
        return self

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        values = dict(data)
        if "milestones" in values:
            values["milestones"] = tuple(values["milestones"])
        return cls(**values)
