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

Every loss between exits is computed by the library's fused op (:class:`~hdkd_fast.DenseKD`,
:func:`~hdkd_fast.dense_kd_losses` and the modules of :mod:`hdkd_fast.distill`); nothing here
re-implements one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .._distributed import all_reduce_mean
from .._validation import Logits
from ..bilevel import HDKD, HarmonizedWeights
from ..distill import DBTTemperature, DenseKDUncertainty, EKDLoss, ERDELoss
from ..modules import DenseKD
from .config import TrainConfig

Batch = tuple[Tensor, Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


class TrainMethod:
    """One method: ``step(x, y, next_val)`` trains on a batch and returns ``(loss, logits)``; ``next_val()``
    draws a validation batch (only ``hdkd`` does).

    Subclasses set :attr:`name` and :attr:`criterion`, and override :meth:`loss` when the loss is not
    ``criterion(model(x), y)``, or :meth:`step` as a whole (``hdkd``). The default step is zero_grad,
    :meth:`loss`, backward, optimizer step.
    """

    name: ClassVar[str]
    criterion: nn.Module
    """The method's loss module (set by each subclass)."""

    def __init__(self, model: nn.Module, config: TrainConfig, num_exits: int, autocast: Autocast,
                 teacher: nn.Module | None = None) -> None:
        self.model = model
        self.module: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
        self.config = config
        self.num_exits = num_exits
        self.autocast = autocast
        self.optimizer: torch.optim.Optimizer | None = None
        self.teacher = teacher
        """The frozen teacher model of ``erde`` (``None`` for the other methods)."""

    # -- set-up -----------------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """Parameters of the loss itself that the model's optimizer trains (none by default)."""
        return []

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the model's optimizer exists."""
        self.optimizer = optimizer

    # -- training ---------------------------------------------------------------------------------

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logits]:
        """The loss of a batch and the logits it came from (inside autocast); by default
        ``criterion(model(x), y)``."""
        logits = self.model(x)
        return self.criterion(logits, y), logits

    def step(self, x: Tensor, y: Tensor, next_val: Callable[[], Batch]) -> tuple[float, Logits | None]:
        """One optimizer step on ``(x, y)``; returns the loss and the (detached) logits."""
        assert self.optimizer is not None, "bind() the optimizer first"
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


def _detach(logits: Logits) -> Logits:
    return logits.detach() if isinstance(logits, Tensor) else [z.detach() for z in logits]


class CrossEntropy(TrainMethod):
    """``ce``: the sum of every exit's cross-entropy (MSDNet's training loss): :class:`DenseKD` with no pairs."""

    name = "ce"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        no_pairs = torch.zeros(self.num_exits, self.num_exits, dtype=torch.bool)
        self.criterion = DenseKD(self.num_exits, pairs=no_pairs, kd_weight=0.0, backend=self.config.backend)


class DenseDistillation(TrainMethod):
    """``dkd``: every exit's CE plus T²·KL from every later exit, all weights 1."""

    name = "dkd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.criterion = DenseKD(self.num_exits, temperature=self.config.temperature, pairs="dense",
                                 backend=self.config.backend)

    def log_values(self) -> dict[str, Any]:
        return {"temperature": self.criterion.temperature}


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
    mix: ClassVar[float] = 0.5
    scale_exits: ClassVar[float] = 2 * 5
    """The loss is multiplied by ``scale_exits / K`` (the authors' ``global_scale``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        adaptive = self.config.dbt_schedule == "adaptive"
        self.schedule = DBTTemperature() if adaptive else None
        scale = self.scale_exits / self.num_exits
        self.criterion = DenseKD(self.num_exits, temperature=1.0 if adaptive else self.config.temperature,
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


class HarmonizedDenseDistillation(TrainMethod):
    """``hdkd``: dense pairs weighted by :class:`HarmonizedWeights`, learned by :class:`HDKD`'s bilevel
    step on validation batches (``hypergrad``, ``weight_lr``, ``update_every``, ``validation``)."""

    name = "hdkd"
    criterion: DenseKD

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.criterion = DenseKD(self.num_exits, temperature=self.config.temperature, pairs="dense",
                                 backend=self.config.backend)
        self.hdkd: HDKD | None = None

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        super().bind(optimizer)
        ref = next(p for p in self.module.parameters() if p.is_floating_point())
        weights = HarmonizedWeights(self.num_exits, "dense").to(ref.device)
        self.hdkd = HDKD(
            self.model, optimizer, criterion=self.criterion, weights=weights,
            weight_optimizer=torch.optim.Adam(weights.parameters(), lr=self.config.weight_lr),
            hypergrad=self.config.hypergrad, update_every=self.config.update_every,
            validation=self.config.validation,
        )

    def step(self, x: Tensor, y: Tensor, next_val: Callable[[], Batch]) -> tuple[float, Logits | None]:
        assert self.hdkd is not None, "bind() the optimizer first"
        x_val, y_val = next_val()
        with self.autocast():
            stats = self.hdkd.step(x, y, x_val, y_val)
        return stats["loss"], self.hdkd.last_logits

    def log_values(self) -> dict[str, Any]:
        assert self.hdkd is not None
        with torch.no_grad():
            w = self.hdkd.weights()
        return {"temperature": self.criterion.temperature, "weights/ce": w.ce.tolist(), "weights/kd": w.kd.tolist(),
                "skipped_updates": self.hdkd.skipped_updates}

    def state_dict(self) -> dict[str, Any]:
        assert self.hdkd is not None
        state = self.hdkd.state_dict()
        return {k: v for k, v in state.items() if k not in ("model", "optimizer")}  # saved by the trainer

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.hdkd is not None and self.optimizer is not None
        self.hdkd.load_state_dict({**state, "model": self.module.state_dict(),
                                   "optimizer": self.optimizer.state_dict()})


class EmbeddedDistillation(TrainMethod):
    """``ekd`` (Lyu, Xu, Cheng 2021): the last exit teaches every earlier one (T²·KL), plus attention
    distillation between same-resolution features (``feature_weight``); see :class:`hdkd_fast.distill.EKDLoss`."""

    name = "ekd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.criterion = EKDLoss(temperature=self.config.temperature, feature_weight=self.config.feature_weight,
                                 backend=self.config.backend)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logits]:
        logits, features = self.model(x, return_features=True)
        return self.criterion(logits, features, y), logits


class EntropyRegularizedDistillation(TrainMethod):
    """``erde`` (Guidez et al. 2025): a frozen teacher early-exit model (``--teacher``) teaches the student
    exit by exit; see :class:`hdkd_fast.distill.ERDELoss`."""

    name = "erde"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.teacher is None:
            raise ValueError("method 'erde' needs a teacher model (--teacher)")
        self.teacher.eval().requires_grad_(False)
        self.criterion = ERDELoss(self.num_exits, _num_exits(self.teacher), temperature=self.config.temperature,
                                  entropy_weight=self.config.entropy_weight, backend=self.config.backend)

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Logits]:
        assert self.teacher is not None
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        logits = self.model(x)
        return self.criterion(logits, teacher_logits, y), logits


class UncertaintyWeightedDistillation(TrainMethod):
    """``dkd-uncertainty`` (Chennupati et al., BMVC 2021): dense pairs, each weighted by e^{−α_p} with a
    learned α_p (and the regularizer Σ α_p), trained with the model by its optimizer."""

    name = "dkd-uncertainty"
    criterion: DenseKDUncertainty

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ref = next(p for p in self.module.parameters() if p.is_floating_point())
        self.criterion = DenseKDUncertainty(self.num_exits, temperature=self.config.temperature,
                                            lam=self.config.uncertainty_lambda,
                                            backend=self.config.backend).to(ref.device)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.criterion.parameters())

    def log_values(self) -> dict[str, Any]:
        kd = self.criterion.path_weights().detach()
        return {"temperature": self.config.temperature, "weights/ce": [1.0] * self.num_exits, "weights/kd": kd.tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.criterion.load_state_dict(state["criterion"])


METHOD_CLASSES: dict[str, type[TrainMethod]] = {
    cls.name: cls
    for cls in (CrossEntropy, DistillationBasedTraining, DenseDistillation, HarmonizedDenseDistillation,
                EmbeddedDistillation, EntropyRegularizedDistillation, UncertaintyWeightedDistillation)
}


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
