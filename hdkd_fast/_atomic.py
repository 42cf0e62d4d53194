"""Writing a file whole or not at all: checkpoints, run records, the extension cache's records.

The content goes to a new temporary file in the target's folder (``.<name>.<random>.tmp``, created
exclusively), is flushed to disk, gets its permission bits, and is renamed over the target: a reader, or a
crash at any point, sees the old file or the complete new one, never a part. A failed write removes the
temporary file and re-raises.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def temporary_prefix(target: Path) -> str:
    """The name prefix of :func:`write_atomic`'s temporary files for ``target`` (to find stale ones)."""
    return f".{target.name}."


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *, mode: int = 0o644) -> Path:
    """Call ``write(file)`` on a temporary binary file and rename it over ``path`` with permission bits
    ``mode`` (module docstring); returns ``path`` as a ``Path``."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int = 0o644) -> Path:
    """:func:`write_atomic` of ``text`` in UTF-8."""
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")), mode=mode)
