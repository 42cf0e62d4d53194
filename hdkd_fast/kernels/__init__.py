"""Triton kernels of hdkd_fast.

Each kernel file holds its ``@triton.jit`` kernels plus one launcher; the autograd glue lives in
``hdkd_fast._autograd`` and the dispatch in ``hdkd_fast.backends`` (``triton_backend``).

- :mod:`.dense_kd_fwd` — ``dense_kd_forward``: one launch computes every exit's CE, every selected
  pair's KD loss (per row) and, optionally, the weighted logits gradient (student and, with
  ``detach_teacher=False``, teacher terms);
- :mod:`.dense_kd_jvp` — ``dense_kd_jvp``: the forward-mode derivative of every objective along
  logit tangents, in one pass after the row statistics;
- :mod:`._common` — the exit table (K exits read in place through int64 offsets, no stacking copy),
  tile loads, the online-softmax statistics pass and the block-size heuristics.

Importing this package imports ``triton``; under ``TRITON_INTERPRET=1`` (set before the import) the
kernels run on CPU tensors through the Triton interpreter.
"""
