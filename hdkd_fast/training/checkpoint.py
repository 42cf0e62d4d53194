"""Atomic checkpoints, their safe loading, and the random-number state a bit-exact ``--resume`` needs.

A checkpoint is read with ``torch.load(..., weights_only=True)``: only tensors and plain containers and
numbers are unpickled, never arbitrary objects (a crafted file cannot run code), and its structure is
checked field by field, so a damaged or foreign file is a ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._validation import check_count, check_nonnegative
from .config import TrainConfig

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
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that a killed :func:`save_atomic` of ``path`` left behind; returns them."""
    target = Path(path)
    stale = sorted(target.parent.glob(f"{_temporary_prefix(target)}*.tmp"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}."


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
