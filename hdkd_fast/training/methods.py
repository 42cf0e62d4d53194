"""The training methods of ``hdkd-fast train --method``: how one batch updates the model.

- ``ce``: Σ_k CE_k (MSDNet); no learned weights.
- ``dbt``: (10/K)·[½ Σ_k CE_k + ½ Σ_{k<K-1} T² KL(p_K ‖ p_k)], T adapted to the teacher (Phuong & Lampert
  2019; 10/K is the global scale of the authors' code).
- ``dkd``: Σ_k CE_k + Σ_{i<j} T² KL(p_j ‖ p_i) (dense pairs, uniform weights).
- ``hdkd``: the same objectives weighted by :class:`~hdkd_fast.HarmonizedWeights`, learned by the bilevel
  step of :class:`~hdkd_fast.HDKD` on the validation split.
- ``ekd``: the last exit teaches every earlier one + attention distillation of same-resolution features
  (Lyu, Xu, Cheng 2021).
- ``erde``: CE + KD from a frozen teacher early-exit model, an entropy term on the samples the teacher
  misclassifies (Guidez et al. 2025).
- ``dkd-uncertainty``: Σ_k CE_k + λ[Σ_p e^{−α_p} KD_p + Σ_p α_p], α learned by the model's optimizer
  (Chennupati et al. 2021).

The methods are registered in :data:`METHODS` (``@register_method``); the CLI's ``--method`` choices, the
config's check and the training run read that registry, and a method's needs from the run are class
attributes of :class:`TrainMethod` (docs/design.md, "Adding a training method"). A method's own settings
are its ``Options`` dataclass (a :class:`MethodOptions`, fields declared with :func:`option`): the config
holds the selected method's, the CLI gives every method an argument group of them (docs/methods.md).

Every loss between exits is computed by the library's fused op (:class:`~hdkd_fast.DenseKD`,
:func:`~hdkd_fast.dense_kd_losses` and the modules of :mod:`hdkd_fast.distill`); nothing here
re-implements one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .._distributed import all_reduce_mean
from .._validation import Logits, check_choice, check_count, check_nonnegative, check_positive
from ..bilevel import HDKD, HarmonizedWeights
from ..bilevel.hdkd import VALIDATION_OBJECTIVES
from ..bilevel.hypergrad import HYPERGRAD_MODES, STEP_LENGTHS
from ..bilevel.weights import PARAMETERIZATIONS
from ..distill import DBTTemperature, DenseKDUncertainty, EKDLoss, ERDELoss
from ..inference import Criterion
from ..modules import DenseKD

if TYPE_CHECKING:  # the config lies above the methods: it takes its choices from this registry
    from .config import TrainConfig

Batch = tuple[Tensor, Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
OptionCheck = Callable[[Any, str], object]
"""A check of one option's value: ``check(value, name)`` raises a ``ValueError``/``TypeError`` that names
``name`` (e.g. :func:`~hdkd_fast._validation.check_positive`)."""
DBT_SCHEDULES = ("adaptive", "constant")

_O = TypeVar("_O", bound="MethodOptions")


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, check: OptionCheck | None = None) -> Any:
    """One field of a method's :class:`MethodOptions` dataclass: its ``default``, its ``--help`` text, and
    its check: the allowed values ``choices`` (also the CLI's choices) and/or ``check(value, name)``.

    The field's name is the option's name in ``TrainConfig(...)``, ``config.json`` (under ``method_options``)
    and the CLI (``--`` + the name with ``-`` for ``_``); its annotation (``int``, ``float``, ``str``,
    ``bool``, or one of them ``| None``) is the CLI's type."""
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "check": check}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class MethodOptions:
    """The settings one training method owns (none here: the options of ``ce`` and ``dkd``).

    A method with settings declares a nested ``Options`` dataclass subclassing this one, each field made by
    :func:`option` (default, help, check); :meth:`validate` runs every field's check, and a subclass
    overrides it (calling ``super().validate()``) for checks across fields. ``TrainConfig`` holds the selected
    method's options (``config.options``), ``config.json`` records them under ``method_options``, and the CLI
    gives every method an argument group of them."""

    def validate(self: _O) -> _O:
        """Check every option (its ``choices`` and ``check``); a ``ValueError``/``TypeError`` names it."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("choices") is not None:
                check_choice(value, f.name, f.metadata["choices"])
            if f.metadata.get("check") is not None:
                f.metadata["check"](value, f.name)
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_names(cls: type[MethodOptions]) -> tuple[str, ...]:
    """The names of the options of ``cls`` (a :class:`MethodOptions` dataclass), in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))


class TrainMethod:
    """One method: ``step(x, y, next_val)`` trains on a batch and returns ``(loss, logits)``; ``next_val()``
    draws a validation batch (only methods with :attr:`uses_validation_batches` call it, and only on the
    steps that use one).

    Construction builds everything: :meth:`make_criterion` gives the loss module, and the loss's own
    parameters (:meth:`parameters`) join ``optimizer`` as a second parameter group without weight decay
    (always added, possibly empty, so that every method's optimizer state has the same layout).
    Subclasses set :attr:`name`, implement :meth:`make_criterion`, and override :meth:`loss` when the loss
    is not ``criterion(model(x), y)``, or :meth:`step` as a whole (``hdkd``). The default step is zero_grad,
    :meth:`loss`, backward, optimizer step. What the training run must provide is said by class attributes:
    :attr:`needs_teacher`, :attr:`uses_validation_batches`, :attr:`exit_criterion`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    """The method's settings: a :class:`MethodOptions` dataclass (none by default); ``self.options`` is the
    run's instance (``config.options``)."""
    needs_teacher: ClassVar[bool] = False
    """The method distills from a frozen teacher model: its ``Options`` must have a ``teacher`` option (the
    teacher's run directory or checkpoint), which the config requires."""
    uses_validation_batches: ClassVar[bool] = False
    """``step`` draws validation batches (each must hold two images or more per process, for BatchNorm)."""
    exit_criterion: ClassVar[Criterion] = "maxprob"
    """The confidence the budgeted evaluation of a trained model thresholds (:mod:`hdkd_fast.inference`)."""

    criterion: nn.Module
    """The method's loss module (:meth:`make_criterion`)."""
    options: MethodOptions
    """The run's options of this method (``config.options``, an instance of :attr:`Options`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, num_exits: int,
                 autocast: Autocast, teacher: nn.Module | None = None) -> None:
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher model (--teacher)")
        if not self.needs_teacher and teacher is not None:
            raise ValueError(f"method {self.name!r} takes no teacher model; got {type(teacher).__name__}")
        if not isinstance(config.options, self.Options):
            raise TypeError(f"config.options must be the options of method {self.name!r} "
                            f"({self.Options.__qualname__}); got {type(config.options).__qualname__}")
        self.options = config.options
        self.model = model
        self.module: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
        self.optimizer = optimizer
        self.config = config
        self.num_exits = num_exits
        self.autocast = autocast
        self.teacher = teacher
        """The frozen teacher model (``None`` unless :attr:`needs_teacher`)."""
        self.criterion = self.make_criterion()
        optimizer.add_param_group({"params": self.parameters(), "weight_decay": 0.0})

    # -- set-up -----------------------------------------------------------------------------------

    def make_criterion(self) -> nn.Module:
        """The loss module, on the model's device (called once, by ``__init__``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_criterion()")

    def parameters(self) -> list[nn.Parameter]:
        """Parameters of the loss itself that the model's optimizer trains (none by default)."""
        return []

    @property
    def step_period(self) -> int:
        """The number of steps after which the cost of a step repeats (1; ``hdkd``: ``update_every``): a
        timing of the method's steps covers whole periods."""
        return 1

    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(p for p in self.module.parameters() if p.is_floating_point()).device

    # -- training ---------------------------------------------------------------------------------

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logits]:
        """The loss of a batch and the logits it came from (inside autocast); by default
        ``criterion(model(x), y)``."""
        logits = self.model(x)
        return self.criterion(logits, y), logits

    def step(self, x: Tensor, y: Tensor, next_val: Callable[[], Batch]) -> tuple[float, Logits | None]:
        """One optimizer step on ``(x, y)``; returns the loss and the (detached) logits."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, logits = self.loss(x, y)
        loss.backward()
        self._average_loss_gradients()
        self.optimizer.step()
        return float(loss.detach()), _detach(logits)

    def _average_loss_gradients(self) -> None:
        """DDP all-reduces the model's gradients only: average those of the loss's own parameters."""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params or not isinstance(self.model, DistributedDataParallel):
            return
        grads = [p.grad for p in params if p.grad is not None]
        for g, mean in zip(grads, all_reduce_mean(grads, self.model.process_group), strict=True):
            g.copy_(mean)

    # -- state and logging ------------------------------------------------------------------------

    def log_values(self) -> dict[str, Any]:
        """Extra values for the epoch's metrics record (e.g. the loss weights)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_METHODS: dict[str, type[TrainMethod]] = {}
METHODS: Mapping[str, type[TrainMethod]] = MappingProxyType(_METHODS)
"""The registry of training methods, name → class, in registration order (read-only view): the CLI's
``--method`` choices, :meth:`TrainConfig.validate <hdkd_fast.training.TrainConfig.validate>` and the
training run all read it."""

_M = TypeVar("_M", bound=type[TrainMethod])


def register_method(cls: _M) -> _M:
    """Register a :class:`TrainMethod` subclass under its ``name`` (usable as a class decorator).

    Raises:
        TypeError: ``cls`` is not a ``TrainMethod`` subclass with a non-empty string ``name``.
        ValueError: the name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, TrainMethod)):
        raise TypeError(f"cls must be a TrainMethod subclass; got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.name must be a non-empty string; got {name!r}")
    if name in _METHODS:
        raise ValueError(f"a training method named {name!r} is already registered ({_METHODS[name].__name__})")
    _check_options(cls)
    _METHODS[name] = cls
    return cls


def _check_options(cls: type[TrainMethod]) -> None:
    """``cls.Options`` must be a :class:`MethodOptions` dataclass whose every field has a default and a help
    text, with a ``teacher`` option when ``cls.needs_teacher``; an option of the same name as another
    method's must be that same field (an inherited ``Options``): one name, one flag, one meaning."""
    options = cls.Options
    where = f"{cls.__name__}.Options"
    if not (isinstance(options, type) and issubclass(options, MethodOptions) and dataclasses.is_dataclass(options)):
        raise TypeError(f"{where} must be a dataclass subclassing MethodOptions; got {options!r}")
    for f in dataclasses.fields(options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{where}.{f.name} needs a default (declare it with option(default, help))")
        if not f.metadata.get("help"):
            raise TypeError(f"{where}.{f.name} needs a help text (declare it with option(default, help))")
        for other in _METHODS.values():
            theirs = {g.name: g for g in dataclasses.fields(other.Options)}
            if f.name in theirs and theirs[f.name] is not f:
                raise ValueError(f"{where}.{f.name}: method {other.name!r} has an option of that name already "
                                 f"(one flag, --{f.name.replace('_', '-')}); rename it")
    if cls.needs_teacher and "teacher" not in option_names(options):
        raise TypeError(f"{cls.__name__}.needs_teacher is set, so {where} must have a 'teacher' option")


def unregister_method(name: str) -> None:
    """Remove the method ``name`` from the registry (e.g. a test's toy method)."""
    check_choice(name, "name", tuple(_METHODS))
    del _METHODS[name]


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_METHODS)


def method_class(name: str) -> type[TrainMethod]:
    """The class registered as ``name``; a ``ValueError`` naming ``method`` and the choices otherwise."""
    check_choice(name, "method", method_names())
    return _METHODS[name]


def option_owners(name: str) -> tuple[str, ...]:
    """The registered methods that have the option ``name`` (none: it is no method's)."""
    return tuple(m for m, cls in _METHODS.items() if name in option_names(cls.Options))


def teacher_path(options: MethodOptions) -> str | None:
    """The teacher checkpoint of a method that :attr:`~TrainMethod.needs_teacher` (its ``teacher`` option)."""
    path = getattr(options, "teacher", None)
    return None if path is None else str(path)


def _detach(logits: Logits) -> Logits:
    return logits.detach() if isinstance(logits, Tensor) else [z.detach() for z in logits]


@register_method
class CrossEntropy(TrainMethod):
    """``ce``: the sum of every exit's cross-entropy (MSDNet's training loss): :class:`DenseKD` with no pairs."""

    name = "ce"

    def make_criterion(self) -> nn.Module:
        no_pairs = torch.zeros(self.num_exits, self.num_exits, dtype=torch.bool)
        return DenseKD(self.num_exits, pairs=no_pairs, kd_weight=0.0, backend=self.config.backend)


@register_method
class DistillationBasedTraining(TrainMethod):
    """``dbt`` (Phuong & Lampert, ICCV 2019): the final exit teaches every earlier exit,
    ``s · [(1 − C) Σ_k CE_k + C T² Σ_{k<K-1} KL(p_K ‖ p_k)]`` with C = 0.5 and the global scale
    s = 2·5/K of the authors' code (``global_scale = 2.0 * 5 / n_exits`` in their ``train_cifar.py``; it
    keeps the step size of their 5-exit setting for any K). Their distillation term is the
    cross-entropy to the teacher, which differs from the KL by the teacher's entropy: the same gradient.

    With ``dbt_schedule="adaptive"`` (the paper's) the temperature starts at 1 and grows by 5 % after every
    step whose softened teacher is too confident (:class:`hdkd_fast.distill.DBTTemperature`);
    ``"constant"`` keeps ``--temperature``.
    """

    name = "dbt"
    criterion: DenseKD

    @dataclasses.dataclass
    class Options(MethodOptions):
        dbt_schedule: str = option("adaptive", "temperature from the teacher's outputs (paper) or --temperature",
                                   choices=DBT_SCHEDULES)

    options: Options
    mix: ClassVar[float] = 0.5
    scale_exits: ClassVar[float] = 2 * 5
    """The loss is multiplied by ``scale_exits / K`` (the authors' ``global_scale``)."""

    def make_criterion(self) -> nn.Module:
        adaptive = self.options.dbt_schedule == "adaptive"
        self.schedule = DBTTemperature() if adaptive else None
        scale = self.scale_exits / self.num_exits
        return DenseKD(self.num_exits, temperature=1.0 if adaptive else self.config.temperature,
                       ce_weight=(1.0 - self.mix) * scale, kd_weight=self.mix * scale, pairs="last",
                       backend=self.config.backend)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logits]:
        logits = self.model(x)
        loss = self.criterion(logits, y)
        if self.schedule is not None:
            self.criterion.temperature = self.schedule.step(logits[-1].detach())
        return loss, logits

    def log_values(self) -> dict[str, Any]:
        return {"temperature": self.criterion.temperature}

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.criterion.temperature,
                "schedule": None if self.schedule is None else self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.criterion.temperature = float(state["temperature"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])


@register_method
class DenseDistillation(TrainMethod):
    """``dkd``: every exit's CE plus T²·KL from every later exit, all weights 1."""

    name = "dkd"

    def make_criterion(self) -> nn.Module:
        return DenseKD(self.num_exits, temperature=self.config.temperature, pairs="dense", backend=self.config.backend)

    def log_values(self) -> dict[str, Any]:
        return {"temperature": self.criterion.temperature}


@register_method
class HarmonizedDenseDistillation(TrainMethod):
    """``hdkd``: dense pairs weighted by :class:`HarmonizedWeights`, learned by :class:`HDKD`'s bilevel
    step on validation batches (``hypergrad``, ``weight_lr``, ``update_every``, ``validation``).

    ``weight_lr`` is per training step: φ is updated on every ``update_every``-th step with Adam at
    ``weight_lr × update_every``, so that it travels about as far over a run as with an update on every
    step (at ``update_every=8`` without the factor the weights barely moved and the early exits lost
    1.4–2.4 points of test top-1 on Fashion-MNIST; bench/RESULTS.md)."""

    name = "hdkd"
    uses_validation_batches = True
    criterion: DenseKD

    @dataclasses.dataclass
    class Options(MethodOptions):
        hypergrad: str = option("auto", "auto: fd (one-sided difference of the logits) for float32 logits, jvp "
                                "under bf16", choices=HYPERGRAD_MODES)
        weight_lr: float = option(1e-2, "Adam lr of the weights φ per training step: an update every n steps "
                                  "takes n× this lr", check=check_positive)
        weight_parameterization: str = option(
            "per_exit", "per_exit: each exit's CE and KD weights sum to 1; softmax: all weights share one fixed "
            "sum; gated: CE weights fixed, one gate per KD pair; bounded: per_exit's start, each weight kept "
            "within 0.4-1.6x of it; fixed: no learning", choices=PARAMETERIZATIONS)
        step_length: str = option("free", "fixed: the look-ahead step keeps its length, so the weights only "
                                  "choose its direction", choices=STEP_LENGTHS)
        # bench/RESULTS.md (issue 23 item 2): 1.1× a ce run, the accuracy of every step
        update_every: int = option(16, "update φ on every n-th step; the others cost a dkd step", check=check_count)
        validation: str = option("ce", "the validation objective of the weights: Σ_k CE_k (ce), or each exit's "
                                 "CE over its running mean (balanced)", choices=VALIDATION_OBJECTIVES)
        weight_warmup_steps: int = option(0, "the weights stay at their start for this many training steps, then "
                                          "learn", check=functools.partial(check_count, minimum=0))

    options: Options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        weights = HarmonizedWeights(self.num_exits, "dense", parameterization=o.weight_parameterization)
        weights = weights.to(self.device())
        self.hdkd = HDKD(
            self.model, self.optimizer, criterion=self.criterion, weights=weights,
            weight_lr=o.weight_lr, hypergrad=o.hypergrad, update_every=o.update_every, validation=o.validation,
            step_length=o.step_length, warmup_steps=o.weight_warmup_steps,
        )

    def make_criterion(self) -> nn.Module:
        return DenseKD(self.num_exits, temperature=self.config.temperature, pairs="dense", backend=self.config.backend)

    @property
    def step_period(self) -> int:
        return self.options.update_every

    def step(self, x: Tensor, y: Tensor, next_val: Callable[[], Batch]) -> tuple[float, Logits | None]:
        # A validation batch only for the steps that update the weights (every update_every-th): the others
        # cost what a dkd step costs. The batches drawn depend on the step count alone (HDKD.calls, saved
        # in the checkpoint), so a resumed run draws the same ones.
        x_val, y_val = next_val() if self.hdkd.will_update() else (None, None)
        with self.autocast():
            stats = self.hdkd.step(x, y, x_val, y_val)
        return stats["loss"], self.hdkd.last_logits

    def log_values(self) -> dict[str, Any]:
        with torch.no_grad():
            w = self.hdkd.weights()
        return {"temperature": self.criterion.temperature, "weights/ce": w.ce.tolist(), "weights/kd": w.kd.tolist(),
                "skipped_updates": self.hdkd.skipped_updates}

    def state_dict(self) -> dict[str, Any]:
        state = self.hdkd.state_dict()
        return {k: v for k, v in state.items() if k not in ("model", "optimizer")}  # saved by the trainer

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hdkd.load_state_dict({**state, "model": self.module.state_dict(),
                                   "optimizer": self.optimizer.state_dict()})


@register_method
class EmbeddedDistillation(TrainMethod):
    """``ekd`` (Lyu, Xu, Cheng 2021): the last exit teaches every earlier one (T²·KL), plus attention
    distillation between same-resolution features (``feature_weight``); see :class:`hdkd_fast.distill.EKDLoss`."""

    name = "ekd"

    @dataclasses.dataclass
    class Options(MethodOptions):
        feature_weight: float = option(1.0, "attention-distillation weight", check=check_nonnegative)

    options: Options

    def make_criterion(self) -> nn.Module:
        return EKDLoss(temperature=self.config.temperature, feature_weight=self.options.feature_weight,
                       backend=self.config.backend)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logits]:
        logits, features = self.model(x, return_features=True)
        return self.criterion(logits, features, y), logits


@register_method
class EntropyRegularizedDistillation(TrainMethod):
    """``erde`` (Guidez et al. 2025): a frozen teacher early-exit model (``--teacher``) teaches the student
    exit by exit; see :class:`hdkd_fast.distill.ERDELoss`."""

    name = "erde"
    needs_teacher = True
    exit_criterion = "entropy"
    teacher: nn.Module

    @dataclasses.dataclass
    class Options(MethodOptions):
        teacher: str | None = option(None, "run directory or checkpoint.pt of the teacher (required)")
        entropy_weight: float = option(1.0, "entropy-term weight", check=check_nonnegative)

    options: Options

    def make_criterion(self) -> nn.Module:
        self.teacher.eval().requires_grad_(False)
        return ERDELoss(self.num_exits, _num_exits(self.teacher), temperature=self.config.temperature,
                        entropy_weight=self.options.entropy_weight, backend=self.config.backend)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logits]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        logits = self.model(x)
        return self.criterion(logits, teacher_logits, y), logits


@register_method
class UncertaintyWeightedDistillation(TrainMethod):
    """``dkd-uncertainty`` (Chennupati et al., BMVC 2021): dense pairs, each weighted by e^{−α_p} with a
    learned α_p (and the regularizer Σ α_p), trained with the model by its optimizer."""

    name = "dkd-uncertainty"
    criterion: DenseKDUncertainty

    @dataclasses.dataclass
    class Options(MethodOptions):
        uncertainty_lambda: float = option(1.0, "λ, the weight of the distillation terms",
                                           check=check_nonnegative)

    options: Options

    def make_criterion(self) -> nn.Module:
        return DenseKDUncertainty(self.num_exits, temperature=self.config.temperature,
                                  lam=self.options.uncertainty_lambda, backend=self.config.backend).to(self.device())

    def parameters(self) -> list[nn.Parameter]:
        return list(self.criterion.parameters())

    def log_values(self) -> dict[str, Any]:
        kd = self.criterion.path_weights().detach()
        return {"temperature": self.config.temperature, "weights/ce": [1.0] * self.num_exits, "weights/kd": kd.tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.criterion.load_state_dict(state["criterion"])


def _num_exits(model: nn.Module) -> int:
    k = getattr(model, "num_exits", None)
    if not isinstance(k, int):
        raise TypeError(f"the teacher model must have a num_exits attribute; got {type(model).__name__}")
    return k


def cycle(make: Callable[[], Iterator[Batch]]) -> Callable[[], Batch]:
    """A ``next_val`` callable that restarts ``make()`` whenever it runs out."""
    it: Iterator[Batch] = make()

    def next_batch() -> Batch:
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = make()
            return next(it)

    return next_batch
