"""Atomic checkpoints and the random-number state a bit-exact ``--resume`` needs."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the same directory, flushed to disk, then renamed over
    ``path``: a reader (or a crash) sees either the old file or the complete new one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``hdkd-fast train``: a run directory (its ``checkpoint.pt``) or the
    file itself. Raises a ``ValueError`` naming the file when it is missing, unreadable or not ours."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise ValueError(f"checkpoint {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(p)!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "config" not in state:
        raise ValueError(f"checkpoint {str(p)!r} is not an hdkd-fast training checkpoint "
                         f"(version {CHECKPOINT_VERSION})")
    return state


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
