"""The Hugging Face ``transformers`` package for the tests that need it (the ``[lm]`` extra)."""

from __future__ import annotations

from typing import Any

import pytest


def require_transformers() -> Any:
    """``transformers``, or skip the calling test module when it is not installed. Only ``transformers``
    itself missing skips: any other import error (a broken install, a module shadowing one of its
    dependencies) fails the module."""
    try:
        import transformers
    except ModuleNotFoundError as err:
        if err.name != "transformers":
            raise
        pytest.skip("transformers is not installed (pip install 'hdkd_fast[lm]')", allow_module_level=True)
    return transformers
