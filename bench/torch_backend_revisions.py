"""Time the ``"torch"`` backend of several git revisions interleaved in one process, against the naive loop.

pytest-benchmark runs one implementation after the other, so a change of load between them moves the
ratio; here every round times the readable loop (``reference.DenseKD``) and each revision's backend back
to back, and the medians come from the same rounds. Each revision's ``hdkd_fast/backends/torch_backend.py``
is read with ``git show`` and swapped in for the installed one's ``losses_and_grad`` (the rest of the op,
argument checks and autograd glue, is the working tree's)::

    python bench/torch_backend_revisions.py 1d7e29d HEAD WORKTREE --threads 2 --rounds 30

``WORKTREE`` is the file as it is on disk. Shape: K = 8 exits, B = 256 rows, C = 1000 classes, fp32,
T = 4 (the bench's), forward+backward of ``dense_kd``; fresh random logits, not zeros.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hdkd_fast.backends import torch_backend
from hdkd_fast.bench import loss_function

ROOT = Path(__file__).resolve().parent.parent
MODULE = "hdkd_fast/backends/torch_backend.py"


def backend_of(revision: str, folder: Path) -> Callable[..., object]:
    """``losses_and_grad`` of ``revision``'s torch backend (relative imports made absolute)."""
    if revision == "WORKTREE":
        return torch_backend.losses_and_grad
    source = subprocess.run(["git", "show", f"{revision}:{MODULE}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = folder / f"torch_backend_{re.sub(r'[^0-9A-Za-z]', '_', revision)}.py"
    path.write_text(re.sub(r"^from \.\.(\w)", r"from hdkd_fast.\1", source, flags=re.MULTILINE))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.losses_and_grad  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="+", help="git revisions, or WORKTREE for the file on disk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k, b, c = 8, 256, 1000
    g = torch.Generator().manual_seed(8000 + c)
    x = torch.randn(k, b, c, generator=g).mul_(3).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g)
    working_tree = torch_backend.losses_and_grad
    with tempfile.TemporaryDirectory() as tmp:
        variants = {rev: backend_of(rev, Path(tmp)) for rev in args.revisions}
    torch_loss, reference = loss_function("torch", k), loss_function("reference", k)

    def run(name: str) -> None:
        if name != "reference":
            torch_backend.losses_and_grad = variants[name]  # type: ignore[assignment]
        x.grad = None
        (reference if name == "reference" else torch_loss)(x, y).backward()

    names = ["reference", *variants]
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for n in names:
            for _ in range(3):
                run(n)
        for _ in range(args.rounds):
            for n in names:
                start = time.perf_counter()
                run(n)
                times[n].append(time.perf_counter() - start)
    finally:
        torch_backend.losses_and_grad = working_tree  # type: ignore[assignment]
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(f"K={k} B={b} C={c} fp32 forward+backward, {args.threads} thread(s), median of {args.rounds} rounds")
    for n in names:
        print(f"{n:>12}  {med[n]:8.2f} ms  {med['reference'] / med[n]:5.2f}x the loop")


if __name__ == "__main__":
    sys.exit(main())
