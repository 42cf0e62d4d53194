import os
import sys
import tempfile
from pathlib import Path

import torch

# Triton kernels run on the CPU under the interpreter; it must be switched on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk cache does not key the C++ it generates on ATEN_CPU_CAPABILITY: code generated
# for AVX-512 (16 floats a vector) and rebuilt under ATEN_CPU_CAPABILITY=avx2 (8) skips half of every
# vector store, which silently corrupted a compiled backward here. One cache per capability.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"hdkd_fast_torchinductor_{torch.backends.cpu.get_cpu_capability().lower()}"))

sys.path.insert(0, str(Path(__file__).parent))  # tests import float64_reference directly
