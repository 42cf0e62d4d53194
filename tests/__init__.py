"""The test suite: ``unit/`` (one part of the library at a time), ``integration/`` (whole commands and
processes) and ``support/`` (helpers shared with ``scripts/gpu_check.py``); README.md, "Contributing".

A package so that every module imports the helpers by one absolute name, ``from tests.support import
float64_reference``: pytest's default ``prepend`` import mode puts the repository root (the first folder
above without an ``__init__.py``) on ``sys.path`` and imports the modules as ``tests.unit.test_x``, from
any working directory; ``scripts/gpu_check.py`` puts the repository root on ``sys.path`` itself.
"""
