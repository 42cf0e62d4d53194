"""Importing ``transformers`` in a source checkout: the repository's top-level ``kernels/`` directory (the
Triton kernels, installed as ``hdkd_fast.kernels``) shadows Hugging Face's ``kernels`` package, which
transformers 5 requires and imports, whenever the repository root is on ``sys.path`` (pytest's rootdir,
``PYTHONPATH=.``). :func:`import_transformers` imports the installed ``kernels`` first with the repository
root left out of ``sys.path``, so that transformers finds it in ``sys.modules``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


def import_transformers() -> ModuleType:
    """``transformers``; ``ImportError`` when it is not installed (for ``pytest.importorskip``-style use)."""
    loaded = sys.modules.get("kernels")
    if loaded is None or Path(getattr(loaded, "__file__", "") or "").resolve().parent == ROOT / "kernels":
        sys.modules.pop("kernels", None)
        saved = sys.path[:]
        sys.path[:] = [p for p in sys.path if not _is_root(p)]
        try:
            importlib.import_module("kernels")
        except ImportError:
            pass  # not installed: transformers (< 5) does not need it
        finally:
            sys.path[:] = saved
    return importlib.import_module("transformers")
