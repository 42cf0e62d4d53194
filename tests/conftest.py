import os
import tempfile

import pytest
import torch

# Triton kernels run on the CPU under the interpreter; it must be switched on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk cache does not key the C++ it generates on ATEN_CPU_CAPABILITY: code generated
# for AVX-512 (16 floats a vector) and rebuilt under ATEN_CPU_CAPABILITY=avx2 (8) skips half of every
# vector store, which silently corrupted a compiled backward here. One cache per capability.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"hdkd_fast_torchinductor_{torch.backends.cpu.get_cpu_capability().lower()}"))


# ---- every backend, one shared parametrization (after TRITON_INTERPRET is set: backends import triton) ----

from hdkd_fast.backends import available_backends, runnable_backends

CPU_BACKENDS = runnable_backends("cpu")
"""Every registered backend that runs on CPU tensors here: "native" where the extension is built, "torch",
and "triton" under the interpreter. (On a GPU, scripts/gpu_check.sh runs every backend on CUDA tensors.)"""
INTERPRETED = frozenset(CPU_BACKENDS) - frozenset(available_backends("cpu"))
"""The backends that run on CPU tensors only when named, emulated (Triton's interpreter): tiny shapes."""


@pytest.fixture(params=CPU_BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each backend in turn, on CPU tensors; Triton with 16-column blocks, so that C = 37 spans three."""
    if request.param == "triton":
        monkeypatch.setenv("HDKD_FAST_TRITON_BLOCK_C", "16")
    return str(request.param)


@pytest.fixture
def max_classes(backend: str) -> int | None:
    """The largest class count a test should give ``backend`` (37 for the emulated ones, else no limit)."""
    return 37 if backend in INTERPRETED else None
