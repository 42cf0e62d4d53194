"""``hdkd-fast bench``: forward+backward of ``dense_kd`` for every available backend against the readable
loop (``reference.DenseKD``) and ``torch.compile`` of it, as a table.

A quick look for users; the measurements the project reports come from ``pytest bench/``
(pytest-benchmark), see bench/RESULTS.md. Times are medians of :class:`torch.utils.benchmark.Timer`
``blocked_autorange`` runs (synchronized on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.benchmark import Timer

from . import reference
from .backends import available_backends
from .functional import dense_kd

TEMPERATURE = 4.0


def loss_function(impl: str, num_exits: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(logits, target) -> loss`` of one implementation: a backend name (``dense_kd`` with it),
    ``"reference"`` (the readable loop ``reference.DenseKD``) or ``"reference_compiled"`` (``torch.compile``
    of the loop). ``pytest bench/`` times the same functions."""
    if impl in ("reference", "reference_compiled"):
        module = reference.DenseKD(num_exits, temperature=TEMPERATURE)
        return torch.compile(module, dynamic=False) if impl == "reference_compiled" else module

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dense_kd(x, y, temperature=TEMPERATURE, backend=impl)

    return loss_fn


def _training_step(impl: str, k: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    loss_fn = loss_function(impl, k)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x.grad = None
        loss_fn(x, y).backward()

    return step


def time_ms(fn: Callable[[torch.Tensor, torch.Tensor], None], x: torch.Tensor, y: torch.Tensor,
            min_run_time: float = 0.3) -> float:
    """Median milliseconds of ``fn(x, y)`` after three warm-up calls (which include any compilation)."""
    for _ in range(3):
        fn(x, y)
    timer = Timer("fn(x, y)", globals={"fn": fn, "x": x, "y": y})
    return float(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)


def run_table(*, exits: Sequence[int], classes: Sequence[int], batch: int | None = None, device: str = "auto",
              dtype: str = "float32", compile_reference: bool = True) -> str:
    """The Markdown table: one row per (K, C, implementation), with the speed-up over the loop."""
    for name, values in (("exits", exits), ("classes", classes)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be positive ints; got {list(values)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    b = batch if batch is not None else (4096 if dev.type == "cuda" else 256)
    if b < 1:
        raise ValueError(f"batch must be >= 1; got {b}")
    dt = getattr(torch, dtype)
    impls = [*available_backends(dev), "reference"] + (["reference_compiled"] if compile_reference else [])
    lines = [f"dense_kd forward+backward, B={b}, T={TEMPERATURE}, dense pairs, {dtype}, {dev.type}",
             "", "| K | C | implementation | median ms | × vs loop |", "|---:|---:|---|---:|---:|"]
    gen = torch.Generator(device=dev).manual_seed(0)
    for k in exits:
        for c in classes:
            x = (3 * torch.randn(k, b, c, generator=gen, device=dev)).to(dt).requires_grad_()
            y = torch.randint(0, c, (b,), generator=gen, device=dev)
            times = {impl: time_ms(_training_step(impl, k), x, y) for impl in impls}
            for impl, t in sorted(times.items(), key=lambda kv: kv[1]):
                lines.append(f"| {k} | {c} | {impl} | {t:.3f} | {times['reference'] / t:.2f} |")
    return "\n".join(lines)
