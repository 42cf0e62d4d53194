"""``train(config)``: the whole run of ``hdkd-fast train``.

Per epoch: the batches of a seeded permutation (:class:`~hdkd_fast.data.EpochLoader`), augmented on the
device, one :class:`~hdkd_fast.training.methods.TrainMethod` step each (with a tqdm bar showing the loss
and every exit's running accuracy), the learning-rate schedule, the validation split's per-exit accuracy,
one line appended to ``metrics.jsonl`` (and TensorBoard scalars when ``tensorboard`` is installed), and an
atomic ``checkpoint.pt`` (model, optimizer, scheduler, method state incl. φ and its optimizer, every
rank's random-number state, epoch). At the end: ``final.json`` and the PNG plots.

Resuming (``resume=True``) restores all of it, so ``2 epochs`` and ``1 epoch + resume 1 epoch`` give
bit-identical models on the CPU.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
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
from ..data import Augment, DataBundle, EpochLoader, load_dataset, with_label_noise
from ..distill import GradientEquilibrium
from ..models.base import MultiExitModule
from ..models.zoo import build_model
from . import distributed as dist_utils
from .checkpoint import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    remove_stale_temporaries,
    restore_field,
    rng_state,
    save_atomic,
    set_rng_state,
    writing,
)
from .config import RESUME_FIELDS, TrainConfig
from .evaluate import collect_logits, final_summary, split_metrics
from .methods import Batch, TrainMethod, cycle, method_class, teacher_path
from .report import FINAL_FILE as FINAL
from .report import METRICS_FILE as METRICS

CONFIG = "config.json"
BAR_EVERY = 10
"""The progress bar's loss and accuracies are refreshed every this many steps (each refresh is a host sync)."""


def train(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train one run as ``config`` says; returns the run directory.

    With ``resume=True`` the run in ``config.out`` continues from its checkpoint with the stored
    configuration (only the :data:`RESUME_FIELDS` of ``config`` are taken, to extend a run).

    Every setting, the backend, ``out``, the data and the checkpoint are checked before anything is written.
    A failed write (full disk, no permission) is an ``OSError`` whose message names the file.
    """
    ctx = dist_utils.setup(config.device)
    try:
        return _train(config, ctx, resume, log)
    finally:
        dist_utils.teardown(ctx)


def _train(config: TrainConfig, ctx: dist_utils.Context, resume: bool, log: Callable[[str], None]) -> Path:
    config, state, data, run_dir = _checked(config, ctx, resume)
    run = _Run(config, ctx, data, run_dir, state, log)
    assert config.epochs is not None  # resolved
    for epoch in range(run.start_epoch, config.epochs):
        record = run.train_epoch(epoch)
        run.end_epoch(record)
    run.finish()
    return run_dir


def _checked(config: TrainConfig, ctx: dist_utils.Context,
             resume: bool) -> tuple[TrainConfig, dict[str, Any] | None, DataBundle, Path]:
    """Every check of a run, before anything is written (a run that cannot start leaves no trace): the
    resolved configuration, the checkpoint to resume (``None`` for a new run), the data and the run directory."""
    state: dict[str, Any] | None = None
    if resume:
        config, state = _resumed(config)
    config.validate()
    if config.out:
        _check_out_dir(Path(config.out))  # before the data is read
    config, data = _settings_and_data(config, ctx)
    run_dir = Path(config.out or f"runs/{data.name}-{config.model}-{config.method}")
    _check_out_dir(run_dir)
    if state is None and (run_dir / CHECKPOINT).exists():
        raise ValueError(f"out directory {str(run_dir)!r} already holds a run; pass --resume to continue it "
                         "or choose another --out")
    return config, state, data, run_dir


def _settings_and_data(config: TrainConfig, ctx: dist_utils.Context) -> tuple[TrainConfig, DataBundle]:
    """The checks of a validated ``config`` that need the device and the data: the backend, the split sizes;
    returns the resolved configuration and the data."""
    _check_backend(config.backend, ctx.device)
    data = _run_data(config)
    config = dataclasses.replace(config, dataset=data.name).resolved().validate()
    _check_split_sizes(config, data, ctx.world_size)
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
    ctx = dist_utils.setup(config.device)
    try:
        if ctx.distributed:
            raise ValueError("step_time runs in one process; do not start it with torchrun")
        config, data = _settings_and_data(config.validate(), ctx)
        run = _Trainer(config, ctx, data)
        period = run.method.step_period
        timed = -(-CALIBRATION_STEPS // period) * period
        run.loader.set_epoch(0)
        run.val_loader.set_epoch(0)
        next_batch, next_val = cycle(lambda: iter(run.loader)), run.next_val()
        run.model.train()
        for _ in range(CALIBRATION_WARMUP):
            run.train_step(next_batch(), next_val, 0)
        _synchronize(ctx.device)
        started = time.perf_counter()
        for _ in range(timed):
            run.train_step(next_batch(), next_val, 0)
        _synchronize(ctx.device)
        return (time.perf_counter() - started) / timed
    finally:
        dist_utils.teardown(ctx)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainer:
    """The objects that train a run (model, method, optimizer, schedule, loaders, augmentation) and its
    :meth:`train_step`; :func:`step_time` times its steps, :class:`_Run` adds the epochs and the run directory."""

    def __init__(self, config: TrainConfig, ctx: dist_utils.Context, data: DataBundle) -> None:
        self.config, self.ctx, self.data = config, ctx, data
        device = self.device = ctx.device
        torch.manual_seed(config.seed)
        self.base, self.model, self.channels_last = _network(config, data, device)
        wrapped: nn.Module = self.model
        if ctx.distributed:
            wrapped = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.autocast = _autocast(config.amp, device)
        model_group = {"params": list(self.model.parameters()), "weight_decay": config.weight_decay}
        self.optimizer = torch.optim.SGD([model_group], lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov)
        self.method = _method(config, wrapped, self.optimizer, self.base.num_exits, data.num_classes, self.autocast,
                              device, data.input_shape)
        self.scheduler = _scheduler(config, self.optimizer)
        self.augment = Augment(data.mean, data.std, crop_padding=data.crop_padding, flip=data.flip)
        self.normalize = Augment(data.mean, data.std, train=False)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + ctx.rank)
        # Full batches (BatchNorm needs two samples or more) unless a split is smaller than one batch per rank.
        self.loader, self.val_loader = (
            EpochLoader(split, config.batch_size, shuffle=True, seed=config.seed + offset, rank=ctx.rank,
                        world_size=ctx.world_size, drop_last=len(split) >= config.batch_size * ctx.world_size,
                        num_workers=config.workers)
            for split, offset in ((data.train, 0), (data.val, 1))
        )
        self.step = 0

    def _to_device(self, batch: Batch, aug: Augment) -> Batch:
        images, y = batch
        x = aug(images.to(self.device, non_blocking=True), self.generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def next_val(self) -> Callable[[], Batch]:
        """The validation batches of the loader's epoch, on the device, normalized, repeated as needed."""
        return cycle(lambda: (self._to_device(b, self.normalize) for b in self.val_loader))

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

    def __init__(self, config: TrainConfig, ctx: dist_utils.Context, data: DataBundle, run_dir: Path,
                 state: dict[str, Any] | None, log: Callable[[str], None]) -> None:
        super().__init__(config, ctx, data)
        self.run_dir, self.log = run_dir, log
        self.start_epoch, self.elapsed = 0, 0.0
        if state is not None:
            self.start_epoch, self.step, self.elapsed = _restore(state, run_dir, self.model, self.optimizer,
                                                                 self.scheduler, self.method, self.generator, ctx)
            _follow_run_length(self.scheduler, config)
        if ctx.is_main:
            _prepare_run_dir(run_dir, config, fresh=state is None, log=log)
            if state is not None:
                _truncate_metrics(run_dir / METRICS, self.start_epoch)
                log(f"resuming {run_dir} after epoch {self.start_epoch}")
        self.writer = _tensorboard(run_dir) if ctx.is_main else None
        self.val_out: tuple[list[Tensor], Tensor] | None = None
        """The validation logits of the latest epoch (rank 0), reused by :meth:`finish`."""

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of method steps and the schedule's step; returns the start of its metrics record."""
        config, ctx = self.config, self.ctx
        started = time.perf_counter()
        self.loader.set_epoch(epoch)
        self.val_loader.set_epoch(epoch)
        next_val = self.next_val()
        self.model.train()
        # samples, loss sum, correct per exit; on the device, read by the host only every BAR_EVERY steps
        totals = torch.zeros(2 + self.base.num_exits, dtype=torch.float64, device=self.device)
        with _progress(len(self.loader), f"epoch {epoch + 1}/{config.epochs}", config.progress and ctx.is_main) as bar:
            for i, batch in enumerate(self.loader, start=1):
                loss, logits, y = self.train_step(batch, next_val, epoch)
                _add_batch_totals(totals, loss, logits, y)
                if not bar.disable and (i % BAR_EVERY == 1 or i == len(self.loader)):
                    mean = (totals[1:] / totals[0]).tolist()
                    bar.set_postfix_str(f"loss {mean[0]:.3f} acc " + " ".join(f"{a:.2f}" for a in mean[1:]))
                bar.update()
        self.scheduler.step()
        totals = dist_utils.all_reduce_sum(totals, ctx).cpu()
        self.elapsed += time.perf_counter() - started
        return {"epoch": epoch + 1, "step": self.step, "time_s": self.elapsed,
                "lr": self.optimizer.param_groups[0]["lr"], "train/loss": float(totals[1] / totals[0]),
                "train/top1": (totals[2:] / totals[0]).tolist()}

    def end_epoch(self, record: dict[str, Any]) -> None:
        """The validation accuracy and the method's values into ``record``; on rank 0 the metrics line and the
        checkpoint."""
        config, ctx = self.config, self.ctx
        if ctx.is_main:
            self.val_out = self._logits(self.data.val)
            val = split_metrics(*self.val_out)
            record.update({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"]})
        record.update(self.method.log_values())
        rngs = dist_utils.gather_objects(rng_state(self.generator), ctx)
        if ctx.is_main:
            _append_metrics(self.run_dir / METRICS, record, self.writer)
            save_atomic({"version": CHECKPOINT_VERSION, "config": config.to_json(), "epoch": record["epoch"],
                         "step": self.step, "time_s": self.elapsed, "num_classes": self.data.num_classes,
                         "input_shape": list(self.data.input_shape), "model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "method": self.method.state_dict(), "rng": rngs}, self.run_dir / CHECKPOINT)
            self.log(f"epoch {record['epoch']}/{config.epochs}: loss {record['train/loss']:.4f}, val top-1 "
                     + " ".join(f"{100 * a:.1f}" for a in record["val/top1"]) + f" ({self.elapsed:.0f} s)")
        dist_utils.barrier(ctx)

    def finish(self) -> None:
        """``final.json`` and the plots (rank 0), then close the TensorBoard writer."""
        if self.ctx.is_main:
            _finish(self.run_dir, self.config, self.base, self.model, self.data, self.elapsed, self.device,
                    self.autocast, self.channels_last, self.log, self.val_out)
            if self.writer is not None:
                self.writer.close()
        dist_utils.barrier(self.ctx)

    def _logits(self, dataset: Any) -> tuple[list[Tensor], Tensor]:
        return _logits(self.model, dataset, self.normalize, self.config, self.device, self.autocast,
                       self.channels_last)


def _resumed(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The stored configuration of the run in ``config.out`` with the :data:`RESUME_FIELDS` of ``config``
    (``epochs`` only when given), and its checkpoint."""
    if not config.out:
        raise ValueError("resume needs the run directory (--out)")
    state = load_checkpoint(config.out)
    stored = TrainConfig.from_json(state["config"])
    taken = {name: getattr(config, name) for name in RESUME_FIELDS if getattr(config, name) is not None}
    config = dataclasses.replace(stored, out=config.out, **taken)
    if config.epochs is not None and config.epochs < int(state["epoch"]):
        raise ValueError(f"--epochs {config.epochs} is below the {state['epoch']} epochs the checkpoint in "
                         f"{config.out!r} has already trained")
    return config, state


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


def _prepare_run_dir(run_dir: Path, config: TrainConfig, *, fresh: bool, log: Callable[[str], None]) -> None:
    """Create the run directory, delete what a killed checkpoint write left behind and, for a new run, the
    logs of an earlier start that never wrote a checkpoint; then write ``config.json``."""
    with writing(run_dir, "create the run directory"):
        run_dir.mkdir(parents=True, exist_ok=True)
    with writing(run_dir, "clean up the run directory"):
        stale = remove_stale_temporaries(run_dir / CHECKPOINT)
        if fresh:
            for name in (METRICS, FINAL):
                (run_dir / name).unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write in {run_dir}")
    with writing(run_dir / CONFIG):
        (run_dir / CONFIG).write_text(json.dumps(config.to_json(), indent=2) + "\n")


def evaluate_run(run_dir: str | Path, *, device: str = "auto", log: Callable[[str], None] = print) -> Path:
    """Write ``final.json`` (and the plots) of a run from its last checkpoint, e.g. one that was stopped."""
    state = load_checkpoint(run_dir)
    config = TrainConfig.from_json(state["config"])
    ctx = dist_utils.setup(device)
    if ctx.distributed:
        raise ValueError("evaluate runs in one process; do not start it with torchrun")
    data = _run_data(config)
    base, model, channels_last = _network(config, data, ctx.device)
    restore_field(run_dir, "model", model.load_state_dict, state["model"])
    _finish(Path(run_dir), config, base, model, data, float(state["time_s"]), ctx.device,
            _autocast(config.amp, ctx.device), channels_last, log)
    return Path(run_dir)


def _finish(run_dir: Path, config: TrainConfig, base: MultiExitModule, model: nn.Module, data: DataBundle,
            elapsed: float, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager[Any]],
            channels_last: bool, log: Callable[[str], None],
            val_out: tuple[list[Tensor], Tensor] | None = None) -> None:
    """``final.json`` (test accuracy per exit, exit costs, budgeted curve) and the plots of a run;
    ``val_out``: the validation logits of the final model when the last epoch already computed them."""
    normalize = Augment(data.mean, data.std, train=False)
    if val_out is None:
        val_out = _logits(model, data.val, normalize, config, device, autocast, channels_last)
    test_out = _logits(model, data.test, normalize, config, device, autocast, channels_last)
    summary = {"method": config.method, "dataset": data.name, "model": config.model,
               "num_exits": base.num_exits, "epochs": config.epochs, "train_time_s": elapsed,
               **final_summary(base, val_out, test_out, data.input_shape,
                               criterion=method_class(config.method).exit_criterion,
                               protocol=config.budget_protocol)}
    with writing(run_dir / FINAL):
        (run_dir / FINAL).write_text(json.dumps(summary, indent=2) + "\n")
    with writing(run_dir, "write the plots in"):
        _write_plots(run_dir, log)


def _method(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, num_exits: int,
            num_classes: int, autocast: Callable[[], contextlib.AbstractContextManager[Any]], device: torch.device,
            input_shape: tuple[int, ...] | None = None) -> TrainMethod:
    """The run's training method (its teacher loaded from a finished run when the method needs one)."""
    cls = method_class(config.method)
    path = teacher_path(config.options) if cls.needs_teacher else None
    teacher = load_teacher(path, num_classes, input_shape).to(device) if path else None
    return cls(model, optimizer, config, num_exits, autocast, teacher=teacher)


def load_teacher(path: str, num_classes: int, input_shape: tuple[int, ...] | None = None) -> MultiExitModule:
    """The frozen model of a finished run (its directory or ``checkpoint.pt``), for ``erde``; it must predict
    ``num_classes`` classes and (when given) take images of ``input_shape``."""
    state = load_checkpoint(path)
    cfg = TrainConfig.from_json(state["config"])
    if state["num_classes"] != num_classes:
        raise ValueError(f"teacher {path!r} predicts {state['num_classes']} classes but the data has {num_classes}")
    if input_shape is not None and tuple(state["input_shape"]) != tuple(input_shape):
        raise ValueError(f"teacher {path!r} takes images of shape {tuple(state['input_shape'])} but the data's are "
                         f"{tuple(input_shape)}")
    weights: dict[str, Tensor] = state["model"]
    if cfg.gradient_equilibrium:
        weights = GradientEquilibrium.wrapped_state_dict(weights)
    teacher = build_model(cfg.model or "", num_classes, tuple(state["input_shape"]))
    restore_field(path, "model", teacher.load_state_dict, weights)
    return teacher.eval().requires_grad_(False)


def _run_data(config: TrainConfig) -> DataBundle:
    """The run's data set, with at most ``config.limit`` images per split (the first ones; for smoke tests
    and demos), then the label noise of ``config.label_noise`` (:mod:`hdkd_fast.data.noise`)."""
    data = load_dataset(config.dataset, config.data_dir, val_size=config.val_size, seed=config.seed,
                        image_size=config.image_size, train_size=config.train_size)
    if config.limit is not None:
        limit = config.limit
        cut = {name: getattr(data, name) for name in ("train", "val", "test")}
        data = dataclasses.replace(data, **{name: ds.subset(torch.arange(min(limit, len(ds))))
                                            for name, ds in cut.items()})
    return with_label_noise(data, config.label_noise, config.seed, validation=config.label_noise_validation)


def _network(config: TrainConfig, data: DataBundle, device: torch.device) -> tuple[MultiExitModule, nn.Module, bool]:
    """The run's multi-exit model, the module that trains (the model, or its ``GradientEquilibrium``
    wrapper) on ``device``, and whether it uses channels-last (default: on CUDA)."""
    base = build_model(config.model or "", data.num_classes, data.input_shape)
    model: nn.Module = GradientEquilibrium(base) if config.gradient_equilibrium else base
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return base, model, channels_last


def _autocast(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """bf16 autocast on CUDA (``amp="auto"`` or ``"bf16"``) or on the CPU when asked (``"bf16"``)."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")

    def make() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    return make


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


def _logits(model: nn.Module, dataset: Any, normalize: Augment, config: TrainConfig, device: torch.device,
            autocast: Callable[[], contextlib.AbstractContextManager[Any]],
            channels_last: bool) -> tuple[list[Tensor], Tensor]:
    return collect_logits(model, dataset, normalize, batch_size=max(config.batch_size, 256), device=device,
                          autocast=autocast, channels_last=channels_last)


def _add_batch_totals(totals: Tensor, loss: float, logits: Logits | None, y: Tensor) -> None:
    """Add ``[samples, loss · samples, correct at exit 1..K]`` of one batch (correct = 0 when unknown)."""
    totals[0] += y.numel()
    totals[1] += loss * y.numel()
    if logits is not None:
        totals[2:] += torch.stack([(z.argmax(dim=1) == y).sum() for z in logits]).to(totals.dtype)


def _restore(state: dict[str, Any], run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, method: TrainMethod, generator: torch.Generator,
             ctx: dist_utils.Context) -> tuple[int, int, float]:
    """Load the checkpoint ``state`` of ``run_dir`` into the run's objects; returns (epoch, step, time)."""
    rngs = state["rng"]
    if len(rngs) != ctx.world_size:
        raise ValueError(f"the checkpoint was written by {len(rngs)} processes; resume it with as many "
                         f"(this run has {ctx.world_size})")
    for field, target in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("method", method)):
        restore_field(run_dir, field, target.load_state_dict, state[field])
    restore_field(run_dir, "rng", lambda rng: set_rng_state(rng, generator), rngs[ctx.rank])
    return int(state["epoch"]), int(state["step"]), float(state["time_s"])


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Drop the records of epochs after the checkpoint (written before a crash)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (epoch := _record_epoch(line)) is not None and epoch <= epochs]
    with writing(path):
        path.write_text("".join(line + "\n" for line in kept))


def _record_epoch(line: str) -> int | None:
    """The epoch of a metrics line; ``None`` for a line a crash cut off while it was written."""
    try:
        return int(json.loads(line).get("epoch", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def _append_metrics(path: Path, record: dict[str, Any], writer: Any) -> None:
    with writing(path), path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    if writer is None:
        return
    epoch = record["epoch"]
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(key, value, epoch)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            for k, v in enumerate(value):
                writer.add_scalar(f"{key}/exit{k + 1}", v, epoch)
    writer.flush()


def _tensorboard(run_dir: Path) -> Any:
    """A TensorBoard writer when ``tensorboard`` is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


def _write_plots(run_dir: Path, log: Callable[[str], None]) -> None:
    try:
        from .report import write_run_plots

        paths = write_run_plots(run_dir)
    except ImportError as exc:  # matplotlib missing: the run itself is complete
        log(f"plots skipped: {exc}")
        return
    log("plots: " + ", ".join(str(p) for p in paths))
