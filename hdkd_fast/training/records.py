"""The files a training run writes besides its checkpoint: ``config.json`` (at the start), one
``metrics.jsonl`` line per epoch (and TensorBoard scalars when ``tensorboard`` is installed), and
``final.json`` (at the end). Their readers and checks are in :mod:`hdkd_fast.training.report`.

Every write goes through :func:`~hdkd_fast.training.checkpoint.writing`: a failed one (full disk, no
permission) is an ``OSError`` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._atomic import write_text_atomic
from .checkpoint import CHECKPOINT, remove_stale_temporaries, writing
from .config import TrainConfig
from .report import FINAL_FILE, METRICS_FILE

CONFIG = "config.json"


def prepare_run_dir(run_dir: Path, config: TrainConfig, *, fresh: bool, log: Callable[[str], None]) -> None:
    """Create the run directory, delete what a killed checkpoint write left behind and, for a new run, the
    logs of an earlier start that never wrote a checkpoint; then write ``config.json``."""
    with writing(run_dir, "create the run directory"):
        run_dir.mkdir(parents=True, exist_ok=True)
    with writing(run_dir, "clean up the run directory"):
        stale = remove_stale_temporaries(run_dir / CHECKPOINT)
        if fresh:
            for name in (METRICS_FILE, FINAL_FILE):
                (run_dir / name).unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write in {run_dir}")
    with writing(run_dir / CONFIG):
        write_text_atomic(run_dir / CONFIG, json.dumps(config.to_json(), indent=2) + "\n")


class MetricsLog:
    """The run's ``metrics.jsonl``, one JSON object per epoch, and the same scalars to TensorBoard (in
    ``tensorboard/``) when it is installed. A resumed run first drops the records of the epochs after its
    checkpoint (``resumed_after``), written before a crash."""

    def __init__(self, run_dir: Path, *, resumed_after: int | None = None) -> None:
        self.path = run_dir / METRICS_FILE
        if resumed_after is not None:
            _truncate(self.path, resumed_after)
        self.writer = _tensorboard(run_dir)

    def append(self, record: dict[str, Any]) -> None:
        """One epoch's line (``record["epoch"]``: 1, 2, ...); lists of numbers go to TensorBoard per exit."""
        with writing(self.path), self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        epoch = record["epoch"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, value, epoch)
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                for k, v in enumerate(value):
                    self.writer.add_scalar(f"{key}/exit{k + 1}", v, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_final(run_dir: Path, summary: dict[str, Any]) -> Path:
    """``final.json``: the run's test results (:func:`hdkd_fast.training.final.finish_run`)."""
    path = run_dir / FINAL_FILE
    with writing(path):
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    return path


def _truncate(path: Path, epochs: int) -> None:
    """Drop the records of the epochs after ``epochs``, and a last line a crash cut off."""
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


def _tensorboard(run_dir: Path) -> Any:
    """A TensorBoard writer when ``tensorboard`` is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
