"""Triton kernels of hdkd_fast, installed as ``hdkd_fast.kernels`` (``package_dir`` in setup.py).

Each kernel file holds its ``@triton.jit`` kernels plus one launcher; the autograd glue lives in
``hdkd_fast._autograd`` and the dispatch in ``hdkd_fast.backends``. No kernel has landed yet.
"""
