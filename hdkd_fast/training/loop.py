"""``train(config)``: the whole run of ``hdkd-fast train``.

Per epoch: the batches of a seeded permutation (:class:`~hdkd_fast.data.EpochLoader`), augmented on the
device, one :class:`~hdkd_fast.training.methods.TrainMethod` step each (with a tqdm bar showing the loss
and every exit's running accuracy), the learning-rate schedule, the validation split's per-exit accuracy,
one line appended to ``metrics.jsonl`` (and TensorBoard scalars when ``tensorboard`` is installed;
:mod:`~hdkd_fast.training.records`), and an atomic ``checkpoint.pt`` (model, optimizer, scheduler, method
state incl. φ and its optimizer, every rank's random-number state, epoch;
:mod:`~hdkd_fast.training.checkpoint`). At the end: ``final.json`` and the PNG plots
(:mod:`~hdkd_fast.training.final`). The model, data and numerics are the run's
:class:`~hdkd_fast.training.context.RunContext`.

Resuming (``resume=True``) restores all of it, so ``2 epochs`` and ``1 epoch + resume 1 epoch`` give
bit-identical models on the CPU.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .._validation import Logits
from ..backends import resolve_backend
from ..data import Augment, DataBundle, EpochLoader
from . import distributed as dist_utils
from .checkpoint import CHECKPOINT, load_teacher, restore_checkpoint, resumed_config, rng_state, save_checkpoint
from .config import TrainConfig
from .context import RunContext, run_data
from .final import SplitLogits, finish_run, split_metrics
from .methods import Batch, TrainMethod, cycle, method_class, teacher_path
from .records import MetricsLog, prepare_run_dir

BAR_EVERY = 10
"""The progress bar's loss and accuracies are refreshed every this many steps (each refresh is a host sync)."""


def train(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train one run as ``config`` says; returns the run directory.

    With ``resume=True`` the run in ``config.out`` continues from its checkpoint with the stored
    configuration (only the :data:`RESUME_FIELDS` of ``config`` are taken, to extend a run).

    Every setting, the backend, ``out``, the data and the checkpoint are checked before anything is written.
    A failed write (full disk, no permission) is an ``OSError`` whose message names the file.
    """
    dist = dist_utils.setup(config.device)
    try:
        return _train(config, dist, resume, log)
    finally:
        dist_utils.teardown(dist)


def _train(config: TrainConfig, dist: dist_utils.Context, resume: bool, log: Callable[[str], None]) -> Path:
    config, state, data, run_dir = _checked(config, dist, resume)
    run = _Run(config, dist, data, run_dir, state, log)
    assert config.epochs is not None  # resolved
    for epoch in range(run.start_epoch, config.epochs):
        record = run.train_epoch(epoch)
        run.end_epoch(record)
    run.finish()
    return run_dir


def _checked(config: TrainConfig, dist: dist_utils.Context,
             resume: bool) -> tuple[TrainConfig, dict[str, Any] | None, DataBundle, Path]:
    """Every check of a run, before anything is written (a run that cannot start leaves no trace): the
    resolved configuration, the checkpoint to resume (``None`` for a new run), the data and the run directory."""
    state: dict[str, Any] | None = None
    if resume:
        config, state = resumed_config(config)
    config.validate()
    if config.out:
        _check_out_dir(Path(config.out))  # before the data is read
    config, data = _settings_and_data(config, dist)
    run_dir = Path(config.out or f"runs/{data.name}-{config.model}-{config.method}")
    _check_out_dir(run_dir)
    if state is None and (run_dir / CHECKPOINT).exists():
        raise ValueError(f"out directory {str(run_dir)!r} already holds a run; pass --resume to continue it "
                         "or choose another --out")
    return config, state, data, run_dir


def _settings_and_data(config: TrainConfig, dist: dist_utils.Context) -> tuple[TrainConfig, DataBundle]:
    """The checks of a validated ``config`` that need the device and the data: the backend, the split sizes;
    returns the resolved configuration and the data."""
    _check_backend(config.backend, dist.device)
    data = run_data(config)
    config = dataclasses.replace(config, dataset=data.name).resolved().validate()
    _check_split_sizes(config, data, dist.world_size)
    return config, data


CALIBRATION_WARMUP = 3
"""Steps :func:`step_time` trains before it starts the clock (lazy initialisation, kernel selection)."""
CALIBRATION_STEPS = 20
"""Steps :func:`step_time` times (rounded up to a multiple of the method's
:attr:`~hdkd_fast.training.methods.TrainMethod.step_period`: whole HDKD periods)."""


def step_time(config: TrainConfig) -> float:
    """Seconds per training step of the run ``config`` describes, measured in this process on its own data,
    model, method, device and threads: :data:`CALIBRATION_WARMUP` steps, then the mean of
    :data:`CALIBRATION_STEPS` timed ones (the device synchronized before each clock read). A step is what
    an epoch repeats and a run's ``train_time_s`` counts: a batch's transfer and augmentation and the method's
    step (HDKD's validation batch and bilevel update included). Nothing is written; ``config.out`` is not
    used."""
    dist = dist_utils.setup(config.device)
    try:
        if dist.distributed:
            raise ValueError("step_time runs in one process; do not start it with torchrun")
        config, data = _settings_and_data(config.validate(), dist)
        run = _Trainer(config, dist, data)
        period = run.method.step_period
        timed = -(-CALIBRATION_STEPS // period) * period
        run.loader.set_epoch(0)
        run.val_loader.set_epoch(0)
        next_batch, next_val = cycle(lambda: iter(run.loader)), run.next_val()
        run.context.model.train()
        for _ in range(CALIBRATION_WARMUP):
            run.train_step(next_batch(), next_val, 0)
        _synchronize(dist.device)
        started = time.perf_counter()
        for _ in range(timed):
            run.train_step(next_batch(), next_val, 0)
        _synchronize(dist.device)
        return (time.perf_counter() - started) / timed
    finally:
        dist_utils.teardown(dist)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainer:
    """What trains a run: its :class:`RunContext` (model, data, numerics) and the optimizer, method, schedule,
    loaders and augmentation, with :meth:`train_step`; :func:`step_time` times its steps, :class:`_Run` adds
    the epochs and the run directory."""

    def __init__(self, config: TrainConfig, dist: dist_utils.Context, data: DataBundle) -> None:
        device = dist.device
        torch.manual_seed(config.seed)
        self.context = context = RunContext.build(config, dist, data)
        wrapped: nn.Module = context.model
        if dist.distributed:
            wrapped = DistributedDataParallel(context.model,
                                              device_ids=[device.index] if device.type == "cuda" else None)
        model_group = {"params": list(context.model.parameters()), "weight_decay": config.weight_decay}
        self.optimizer = torch.optim.SGD([model_group], lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov)
        self.method = _method(context, wrapped, self.optimizer)
        self.scheduler = _scheduler(config, self.optimizer)
        self.augment = Augment(data.mean, data.std, crop_padding=data.crop_padding, flip=data.flip)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + dist.rank)
        # Full batches (BatchNorm needs two samples or more) unless a split is smaller than one batch per rank.
        self.loader, self.val_loader = (
            EpochLoader(split, config.batch_size, shuffle=True, seed=config.seed + offset, rank=dist.rank,
                        world_size=dist.world_size, drop_last=len(split) >= config.batch_size * dist.world_size,
                        num_workers=config.workers)
            for split, offset in ((data.train, 0), (data.val, 1))
        )
        self.step = 0
        self.elapsed = 0.0

    def _to_device(self, batch: Batch, aug: Augment) -> Batch:
        images, y = batch
        device = self.context.device
        x = aug(images.to(device, non_blocking=True), self.generator)
        if self.context.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)

    def next_val(self) -> Callable[[], Batch]:
        """The validation batches of the loader's epoch, on the device, normalized, repeated as needed."""
        return cycle(lambda: (self._to_device(b, self.context.normalize) for b in self.val_loader))

    def train_step(self, batch: Batch, next_val: Callable[[], Batch],
                   epoch: int) -> tuple[float, Logits | None, Tensor]:
        """One method step on the (CPU, uint8) ``batch`` of ``epoch``; returns its loss, logits and labels."""
        x, y = self._to_device(batch, self.augment)
        loss, logits = self.method.step(x, y, next_val)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at epoch {epoch + 1}, step "
                                     f"{self.step + 1}; lower --lr or check the data")
        self.step += 1
        return loss, logits, y


class _Run(_Trainer):
    """One training run's three phases: set-up (``__init__``: the :class:`_Trainer`, restored state, run
    directory), :meth:`train_epoch` + :meth:`end_epoch` (validation accuracy, metrics line, checkpoint) per
    epoch, and :meth:`finish` (``final.json`` and the plots)."""

    def __init__(self, config: TrainConfig, dist: dist_utils.Context, data: DataBundle, run_dir: Path,
                 state: dict[str, Any] | None, log: Callable[[str], None]) -> None:
        super().__init__(config, dist, data)
        self.run_dir, self.log = run_dir, log
        self.start_epoch = 0
        if state is not None:
            self.start_epoch = restore_checkpoint(state, run_dir, self)
            _follow_run_length(self.scheduler, config)
        self.metrics: MetricsLog | None = None
        """``metrics.jsonl`` (and TensorBoard), written by rank 0."""
        if dist.is_main:
            prepare_run_dir(run_dir, config, fresh=state is None, log=log)
            self.metrics = MetricsLog(run_dir, resumed_after=None if state is None else self.start_epoch)
            if state is not None:
                log(f"resuming {run_dir} after epoch {self.start_epoch}")
        self.val_out: SplitLogits | None = None
        """The validation logits of the latest epoch (rank 0), reused by :meth:`finish`."""

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of method steps and the schedule's step; returns the start of its metrics record."""
        context = self.context
        config, dist = context.config, context.dist
        started = time.perf_counter()
        self.loader.set_epoch(epoch)
        self.val_loader.set_epoch(epoch)
        next_val = self.next_val()
        context.model.train()
        # samples, loss sum, correct per exit; on the device, read by the host only every BAR_EVERY steps
        totals = torch.zeros(2 + context.base.num_exits, dtype=torch.float64, device=context.device)
        with _progress(len(self.loader), f"epoch {epoch + 1}/{config.epochs}", config.progress and dist.is_main) as bar:
            for i, batch in enumerate(self.loader, start=1):
                loss, logits, y = self.train_step(batch, next_val, epoch)
                _add_batch_totals(totals, loss, logits, y)
                if not bar.disable and (i % BAR_EVERY == 1 or i == len(self.loader)):
                    mean = (totals[1:] / totals[0]).tolist()
                    bar.set_postfix_str(f"loss {mean[0]:.3f} acc " + " ".join(f"{a:.2f}" for a in mean[1:]))
                bar.update()
        self.scheduler.step()
        totals = dist_utils.all_reduce_sum(totals, dist).cpu()
        self.elapsed += time.perf_counter() - started
        return {"epoch": epoch + 1, "step": self.step, "time_s": self.elapsed,
                "lr": self.optimizer.param_groups[0]["lr"], "train/loss": float(totals[1] / totals[0]),
                "train/top1": (totals[2:] / totals[0]).tolist()}

    def end_epoch(self, record: dict[str, Any]) -> None:
        """The validation accuracy and the method's values into ``record``; on rank 0 the metrics line and the
        checkpoint."""
        context = self.context
        if self.metrics is not None:  # rank 0
            self.val_out = context.logits(context.data.val)
            val = split_metrics(*self.val_out)
            record.update({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"]})
        record.update(self.method.log_values())
        rngs = dist_utils.gather_objects(rng_state(self.generator), context.dist)
        if self.metrics is not None:
            self.metrics.append(record)
            save_checkpoint(self.run_dir / CHECKPOINT, self, record["epoch"], rngs)
            self.log(f"epoch {record['epoch']}/{context.config.epochs}: loss {record['train/loss']:.4f}, val top-1 "
                     + " ".join(f"{100 * a:.1f}" for a in record["val/top1"]) + f" ({self.elapsed:.0f} s)")
        dist_utils.barrier(context.dist)

    def finish(self) -> None:
        """``final.json`` and the plots (rank 0), then close the metrics log."""
        if self.metrics is not None:
            finish_run(self.context, self.run_dir, self.elapsed, self.log, self.val_out)
            self.metrics.close()
        dist_utils.barrier(self.context.dist)


def _check_backend(backend: str, device: torch.device) -> None:
    """Raise a ``ValueError`` (one line) when the fused op's ``backend`` cannot run on ``device``."""
    try:
        resolve_backend(backend, device)
    except RuntimeError as exc:  # names the backend, why it cannot run and those that can
        raise ValueError(str(exc)) from exc


def _check_out_dir(path: Path) -> None:
    """Raise a ``ValueError`` naming ``path`` when it cannot be a run directory: it is a file, it lies
    under a file, or its nearest existing parent directory is not writable."""
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            where = "" if existing == path else f" lies under {str(existing)!r}, which"
            raise ValueError(f"--out {str(path)!r}{where} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--out {str(path)!r}: cannot write in {str(existing)!r} (permission denied)")
        return


def _check_split_sizes(config: TrainConfig, data: DataBundle, world_size: int) -> None:
    """Every batch a step trains on must hold two images or more (BatchNorm in training mode needs them):
    the training split's, and ``hdkd``'s validation batches."""
    splits = [("training", len(data.train), "--limit")]
    if method_class(config.method).uses_validation_batches:
        splits.append(("validation", len(data.val), "--val-size, --limit"))
    for name, size, options in splits:
        smallest = min(config.batch_size, math.ceil(size / world_size))
        if smallest < 2:
            raise ValueError(f"the {name} split has {size} image(s) for {world_size} process(es): method "
                             f"{config.method!r} needs batches of 2 or more per process (BatchNorm); "
                             f"use more images ({options})")


def _method(context: RunContext, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainMethod:
    """The run's training method on ``model`` (the model, or its DDP wrapper) and ``optimizer``; its teacher
    loaded from a finished run when the method needs one."""
    config, data = context.config, context.data
    cls = method_class(config.method)
    path = teacher_path(config.options) if cls.needs_teacher else None
    teacher = load_teacher(path, data.num_classes, data.input_shape).to(context.device) if path else None
    return cls(model, optimizer, config, context.base.num_exits, context.autocast, teacher=teacher)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    assert config.epochs is not None
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=_milestones(config), gamma=config.gamma)


def _milestones(config: TrainConfig) -> list[int]:
    assert config.epochs is not None
    return sorted({max(1, round(f * config.epochs)) for f in config.milestones})


def _follow_run_length(scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig) -> None:
    """After ``--resume --epochs N`` changed the run's length: the restored multistep schedule takes the
    milestones of the new length (``--milestones`` are fractions of the run), and the lr is set to what
    they give at this epoch when that differs from the restored one."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):
        return  # cosine keeps its restored period: a finished cosine run has no lr left to extend
    old, new = scheduler.milestones, collections.Counter(_milestones(config))
    scheduler.milestones = new
    passed = scheduler.last_epoch

    def decays(counts: collections.Counter[int]) -> int:
        return sum(n for m, n in counts.items() if m <= passed)

    if decays(old) != decays(new):
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * scheduler.gamma ** decays(new)


def _add_batch_totals(totals: Tensor, loss: float, logits: Logits | None, y: Tensor) -> None:
    """Add ``[samples, loss · samples, correct at exit 1..K]`` of one batch (correct = 0 when unknown)."""
    totals[0] += y.numel()
    totals[1] += loss * y.numel()
    if logits is not None:
        totals[2:] += torch.stack([(z.argmax(dim=1) == y).sum() for z in logits]).to(totals.dtype)


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()
