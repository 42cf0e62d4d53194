"""The test suite, a package so that its modules import the shared helpers by one absolute name.

- ``tests/unit/``: one part of the library at a time, in process (ops and backends against the float64
  reference, the bilevel math, data readers, models, evaluation, registries, import layers, docs links);
- ``tests/integration/``: whole commands and processes (the CLI, ``compare``, training end to end,
  distributed runs, ``pip install``, the examples, the Triton AOT compile, ``scripts/gpu_check.py``);
- ``tests/support/``: helpers shared by both and by ``scripts/gpu_check.py`` (no tests), imported as
  ``from tests.support import float64_reference``.

pytest's default ``prepend`` import mode puts the repository root (the first folder above without an
``__init__.py``) on ``sys.path`` and imports the test modules as ``tests.unit.test_x``, so the helpers
import from any working directory; ``scripts/gpu_check.py`` puts the repository root on ``sys.path`` itself.
"""
