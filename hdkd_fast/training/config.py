"""``TrainConfig``: every setting of one training run (the arguments of ``hdkd-fast train``).

The settings every run has are fields of :class:`TrainConfig`; the selected method's own settings are its
``options`` (an instance of the method's ``Options`` dataclass, :class:`~hdkd_fast.training.methods.MethodOptions`),
so a method with a new setting is edited in one place (docs/methods.md). Written to ``config.json`` in the
run directory (the options under ``method_options``) and stored in every checkpoint, so ``--resume`` and
``hdkd-fast evaluate`` rebuild exactly the same run; a ``config.json`` or checkpoint of the flat layout
before method options (every method's options beside the shared settings) is still read.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._validation import check_choice, check_count, check_nonnegative, check_positive
from ..backends import backend_choices
from ..data.load import IDX_DATASETS
from ..data.noise import check_noise_rate
from ..evaluation import BUDGET_PROTOCOLS, DEFAULT_BUDGET_PROTOCOL
from .methods import METHODS, MethodOptions, method_class, option_names, option_owners, teacher_path

SCHEDULES = ("multistep", "cosine")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
OPTIONS_KEY = "method_options"
"""The key of the method's options in ``config.json`` and in a checkpoint's ``config``."""

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


@dataclass(init=False)
class TrainConfig:
    """Settings of one run; ``None`` means "the default for the dataset" (resolved by :meth:`resolved`).

    ``TrainConfig(method="hdkd", update_every=4, epochs=2)``: keywords are the shared settings (the fields
    below) and the options of ``method`` (its ``Options`` fields, e.g. ``update_every``), which go into
    :attr:`options`; ``options=`` gives them as an instance (keywords then override its fields). An option
    of another method is a ``ValueError`` naming the methods that have it; :meth:`for_method` switches the
    method (``dataclasses.replace(config, method=...)`` keeps the old method's options and is refused)."""

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
    gradient_equilibrium: bool = False
    budget_protocol: str = DEFAULT_BUDGET_PROTOCOL
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    options: MethodOptions = field(default_factory=MethodOptions)
    """The options of :attr:`method`: an instance of its ``Options`` (``config.json``: ``method_options``)."""

    def __init__(self, method: str = "hdkd", *, options: MethodOptions | None = None, **settings: Any) -> None:
        cls = options_class(method)
        for f in dataclasses.fields(TrainConfig):
            if f.name in ("method", "options"):
                continue
            if f.name in settings:
                setattr(self, f.name, settings.pop(f.name))
            else:
                setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else f.default)
        self.method = method
        check_method_options(settings, [method])
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise TypeError(f"options must be the Options of method {method!r} ({cls.__qualname__}); got "
                            f"{type(options).__qualname__} (config.for_method() switches a config's method)")
        self.options = dataclasses.replace(options, **settings)  # a copy: configs never share one

    def for_method(self, method: str, options: MethodOptions | None = None) -> TrainConfig:
        """A copy that trains ``method`` with ``options`` (default: this config's options when ``method`` is
        :attr:`method`, else the method's defaults); every shared setting is kept."""
        if options is None:
            options = self.options if method == self.method else options_class(method)()
        return dataclasses.replace(self, method=method, options=options)

    def settings(self) -> dict[str, Any]:
        """Every setting by name, flat: the shared ones (JSON values, as :meth:`to_json`) and the method's
        options (their names are unique among the registered methods)."""
        out = self.to_json()
        return {**out.pop(OPTIONS_KEY), **out}

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
        """Check every field and the method's options; raise a ``ValueError``/``TypeError`` naming the
        offending argument."""
        method = method_class(self.method)
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_choice(self.amp, "amp", AMP_MODES)
        check_choice(self.device, "device", DEVICES)
        check_choice(self.budget_protocol, "budget_protocol", tuple(BUDGET_PROTOCOLS))
        check_choice(self.backend, "backend", backend_choices())
        check_count(self.batch_size, "batch_size", minimum=2)  # BatchNorm trains on two samples or more
        for name in ("epochs", "limit", "image_size", "train_size"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        check_count(self.workers, "workers", minimum=0)
        check_count(self.seed, "seed", minimum=0)
        for name in ("lr", "temperature"):
            check_positive(getattr(self, name), name)
        for name in ("momentum", "weight_decay"):
            check_nonnegative(getattr(self, name), name)
        if not isinstance(self.options, method.Options):  # set by hand after construction
            raise TypeError(f"options must be the Options of method {self.method!r}; got "
                            f"{type(self.options).__qualname__}")
        self.options.validate()
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
        if method.needs_teacher and not teacher_path(self.options):
            raise ValueError(f"method {self.method!r} needs --teacher CHECKPOINT (a run directory or its "
                             "checkpoint.pt)")
        return self

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``config.json``: the shared settings, with the options under ``method_options``."""
        shared = {name: getattr(self, name) for name in SHARED_SETTINGS}
        return {"method": self.method, OPTIONS_KEY: self.options.to_json(), **shared,
                "milestones": list(self.milestones), "extra": copy.deepcopy(self.extra)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config of a :meth:`to_json` object; one of the flat layout before method options (no
        ``method_options``: every method's options beside the shared settings) takes the options of its
        method and drops the other methods'."""
        values = dict(data)
        method = values.get("method", "hdkd")
        if OPTIONS_KEY in values:
            given = values.pop(OPTIONS_KEY)
            if not isinstance(given, Mapping):
                raise TypeError(f"{OPTIONS_KEY} must be a JSON object; got {type(given).__name__}")
            options = dict(given)
            known = set(option_names(options_class(method)))
            unknown = sorted(set(options) - known)
            if unknown:
                raise ValueError(f"unknown {OPTIONS_KEY} {unknown} of method {method!r}")
        else:  # the flat layout
            values, flat = split_flat_options(values)
            options = {name: value for name, value in flat.items() if method in option_owners(name)}
        unknown = sorted(set(values) - set(SHARED_SETTINGS))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        if "milestones" in values:
            values["milestones"] = tuple(values["milestones"])
        return cls(**values, **options)


def split_flat_options(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` of the flat layout before method options, split into the shared settings (and unknown
    names) and the options of any registered method."""
    owned = {name for name in values if name not in SHARED_SETTINGS and option_owners(name)}
    return ({name: value for name, value in values.items() if name not in owned},
            {name: value for name, value in values.items() if name in owned})


def options_class(method: str) -> type[MethodOptions]:
    """The ``Options`` of the registered ``method`` (a ``ValueError`` naming ``method`` and the choices
    otherwise); its option names must not be shared settings (a ``TypeError`` naming the clash)."""
    cls = method_class(method).Options
    clash = sorted(set(option_names(cls)) & set(SHARED_SETTINGS))
    if clash:
        raise TypeError(f"method {method!r} declares the option(s) {clash}, which are settings of every run "
                        "(TrainConfig fields): rename them")
    return cls


def check_method_options(given: Iterable[str], methods: Sequence[str]) -> None:
    """Every name of ``given`` must be an option of one of ``methods``: an option of another method is a
    ``ValueError`` naming the methods that have it (``--teacher is only used by method 'erde', not 'ce'``),
    any other name a ``TypeError``."""
    for name in given:
        owners = option_owners(name)
        if any(m in owners for m in methods):
            continue
        if not owners:
            raise TypeError(f"TrainConfig got an unknown setting {name!r}: neither a setting of every run nor "
                            f"an option of a method ({', '.join(METHODS)})")
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} is only used by method {' or '.join(map(repr, owners))}, not "
                         f"{' or '.join(map(repr, methods))}")


SHARED_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "options")
"""The settings of every run (the :class:`TrainConfig` fields besides the method's ``options``)."""
