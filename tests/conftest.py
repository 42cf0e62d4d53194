import os
import sys
from pathlib import Path

import torch

# Triton kernels run on the CPU under the interpreter; it must be switched on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests import float64_reference directly
