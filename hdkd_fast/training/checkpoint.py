"""Checkpoints of a training run: what one holds (:func:`save_checkpoint`), its atomic write, its safe
loading, restoring a run from it (:func:`restore_checkpoint`, :func:`resumed_config`), the random-number
state a bit-exact ``--resume`` needs, and the frozen model of a finished run (:func:`load_teacher`).

A checkpoint is read with ``torch.load(..., weights_only=True)``: only tensors and plain containers and
numbers are unpickled, never arbitrary objects (a crafted file cannot run code), and its structure is
checked field by field, so a damaged or foreign file is a ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from .._atomic import temporary_prefix, write_atomic
from .._validation import check_count, check_nonnegative
from ..distill import GradientEquilibrium
from ..models.base import MultiExitModule
from ..models.zoo import build_model
from .config import RESUME_FIELDS, TrainConfig

if TYPE_CHECKING:  # annotations only: the context and the methods lie above the checkpoints
    from .context import RunContext
    from .methods import TrainMethod

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
RNG_KEYS = ("python", "torch", "cuda", "data")
"""The entries of one rank's random-number state (:func:`rng_state`)."""
_STATE_DICTS = ("model", "optimizer", "scheduler", "method")
"""Checkpoint fields that are ``state_dict()`` objects (dicts with string keys)."""


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the same directory, flushed to disk, then renamed over
    ``path``: a reader (or a crash) sees either the old file or the complete new one, never a part.
    A failed write (full disk, no permission) removes the temporary file and raises an ``OSError``
    naming ``path`` and the cause (see :func:`writing`)."""
    target = Path(path)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda fh: torch.save(obj, fh), mode=0o600)
    return target


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that a killed :func:`save_atomic` of ``path`` left behind; returns them."""
    target = Path(path)
    stale = sorted(target.parent.glob(f"{temporary_prefix(target)}*.tmp"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], action: str = "write") -> Iterator[None]:
    """Re-raise a failed write (full disk, no permission, a file in the way) as one ``OSError`` whose
    message (``strerror``) names ``path`` and the cause: ``cannot write 'run/final.json': No space left
    on device``. ``torch.save`` reports a failed write as a ``RuntimeError`` raised while handling the
    ``OSError`` (``[enforce fail at inline_container.cc] ... unexpected pos``); the cause is that OSError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        code, cause = _write_error(exc)
        message = f"cannot {action} {str(path)!r}: {cause}"
        raise (OSError(message) if code is None else OSError(code, message)) from exc


def _write_error(exc: BaseException) -> tuple[int | None, str]:
    """The errno and text of the first ``OSError`` in the chain of ``exc``, else ``(None, its first line)``."""
    link: BaseException | None = exc
    while link is not None:
        if isinstance(link, OSError) and link.strerror:
            return link.errno, link.strerror
        link = link.__cause__ or link.__context__
    return None, _first_line(exc)


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file of ``path``: a run directory's ``checkpoint.pt``, or ``path`` itself."""
    p = Path(path)
    return p / CHECKPOINT if p.is_dir() else p


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``hdkd-fast train``: a run directory (its ``checkpoint.pt``) or the
    file itself. Raises a ``ValueError`` naming the file when it is missing, unreadable, holds anything
    but tensors and plain data, is not ours, or has a missing or malformed field."""
    p = checkpoint_file(path)
    if not p.is_file():
        raise ValueError(f"checkpoint {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(p)!r} cannot be read ({type(exc).__name__}: {_load_error(exc)})") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "config" not in state:
        raise ValueError(f"checkpoint {str(p)!r} is not an hdkd-fast training checkpoint "
                         f"(version {CHECKPOINT_VERSION})")
    try:
        _check_fields(state)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {str(p)!r} is damaged: {exc}") from exc
    return state


def _check_fields(state: dict[str, Any]) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the first missing or malformed field of a checkpoint."""
    missing = [name for name in ("config", "epoch", "step", "time_s", "num_classes", "input_shape", *_STATE_DICTS,
                                 "rng") if name not in state]
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing")
    if not isinstance(state["config"], dict):
        raise TypeError(f"field 'config' must be a dict; got {type(state['config']).__name__}")
    try:
        TrainConfig.from_json(state["config"]).validate()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"field 'config': {exc}") from exc
    check_count(state["epoch"], "field 'epoch'", minimum=0)
    check_count(state["step"], "field 'step'", minimum=0)
    check_nonnegative(state["time_s"], "field 'time_s'")
    check_count(state["num_classes"], "field 'num_classes'")
    shape = state["input_shape"]
    if not isinstance(shape, (list, tuple)) or not shape:
        raise TypeError(f"field 'input_shape' must be a non-empty list of sizes; got {shape!r}")
    for size in shape:
        check_count(size, "field 'input_shape'")
    for name in _STATE_DICTS:
        value = state[name]
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise TypeError(f"field {name!r} must be a state dict (string keys); got {type(value).__name__}")
    if not all(isinstance(t, Tensor) for t in state["model"].values()):
        raise TypeError("field 'model' must map parameter names to tensors")
    _check_rngs(state["rng"])


def _check_rngs(rngs: object) -> None:
    if not isinstance(rngs, list) or not rngs:
        raise TypeError("field 'rng' must be a non-empty list (one random-number state per process)")
    for rank, entry in enumerate(rngs):
        where = f"field 'rng'[{rank}]"
        if not isinstance(entry, dict) or set(entry) != set(RNG_KEYS):
            raise ValueError(f"{where} must be a dict with the keys {list(RNG_KEYS)}")
        if not isinstance(entry["torch"], Tensor) or not isinstance(entry["data"], Tensor):
            raise TypeError(f"{where}: 'torch' and 'data' must be generator-state tensors")
        if not isinstance(entry["cuda"], list) or not all(isinstance(t, Tensor) for t in entry["cuda"]):
            raise TypeError(f"{where}: 'cuda' must be a list of generator-state tensors")
        if not isinstance(entry["python"], tuple):
            raise TypeError(f"{where}: 'python' must be the tuple of random.getstate()")


class Resumable(Protocol):
    """What a checkpoint saves and restores: a training run's objects and counters."""

    step: int
    """Training steps done."""
    elapsed: float
    """Seconds of training so far."""

    @property
    def context(self) -> RunContext: ...  # the configuration, the data, the model, the process
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler: ...
    @property
    def method(self) -> TrainMethod: ...
    @property
    def generator(self) -> torch.Generator: ...  # the data generator (augmentation)


def _parts(run: Resumable) -> dict[str, Any]:
    """The checkpoint's state-dict fields (:data:`_STATE_DICTS`) and the objects they come from."""
    return {"model": run.context.model, "optimizer": run.optimizer, "scheduler": run.scheduler, "method": run.method}


def save_checkpoint(path: str | os.PathLike[str], run: Resumable, epoch: int, rngs: list[dict[str, Any]]) -> Path:
    """Write the checkpoint of ``run`` after ``epoch`` epochs atomically (:func:`save_atomic`); ``rngs``: every
    rank's :func:`rng_state`, in rank order. Its fields: ``version, config, epoch, step, time_s, num_classes,
    input_shape, model, optimizer, scheduler, method, rng``."""
    context = run.context
    state = {"version": CHECKPOINT_VERSION, "config": context.config.to_json(), "epoch": epoch, "step": run.step,
             "time_s": run.elapsed, "num_classes": context.data.num_classes,
             "input_shape": list(context.data.input_shape),
             **{name: part.state_dict() for name, part in _parts(run).items()}, "rng": rngs}
    return save_atomic(state, path)


def restore_checkpoint(state: dict[str, Any], path: str | os.PathLike[str], run: Resumable) -> int:
    """Load the checkpoint ``state`` (read from ``path``) into ``run``: its objects, this rank's
    random-number state, ``run.step`` and ``run.elapsed``; returns the epochs it had trained."""
    rngs, dist = state["rng"], run.context.dist
    if len(rngs) != dist.world_size:
        raise ValueError(f"the checkpoint was written by {len(rngs)} processes; resume it with as many "
                         f"(this run has {dist.world_size})")
    for field, target in _parts(run).items():
        restore_field(path, field, target.load_state_dict, state[field])
    restore_field(path, "rng", lambda rng: set_rng_state(rng, run.generator), rngs[dist.rank])
    run.step, run.elapsed = int(state["step"]), float(state["time_s"])
    return int(state["epoch"])


def resumed_config(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
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


def restore_field(path: str | os.PathLike[str], field: str, load: Callable[[Any], object], value: Any) -> None:
    """``load(value)`` (e.g. ``model.load_state_dict``), a mismatch raised as one ``ValueError`` line naming
    the checkpoint file and the field."""
    try:
        load(value)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {str(checkpoint_file(path))!r}: field {field!r} does not fit this run "
                         f"({type(exc).__name__}: {_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _load_error(exc: BaseException) -> str:
    """The informative line of a ``torch.load`` error (a weights-only refusal names the blocked global)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), _first_line(exc))


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random-number state a training step draws from: Python's, torch's CPU and CUDA
    generators (Dropout, initialization) and the data ``generator`` (shuffling is seeded per epoch;
    augmentation draws from it)."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["data"])
