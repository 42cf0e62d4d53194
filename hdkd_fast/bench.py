"""``hdkd-fast bench``: forward+backward of ``dense_kd`` for every available backend against the readable
loop (``reference.DenseKD``) and ``torch.compile`` of it, as a table.

A quick look for users; the measurements the project reports come from ``pytest bench/``
(pytest-benchmark), see bench/RESULTS.md. Times are medians of :class:`torch.utils.benchmark.Timer`
``blocked_autorange`` runs (synchronized on CUDA).

:func:`loss_function` is the one factory of the timed implementations, shared with ``pytest bench/``:
the backends, the readable loop, ``torch.compile`` of it, and ``"liger"``, the loop with Liger-Kernel's
``LigerKLDIVLoss`` (a Triton kernel; CUDA only) as the KL of every pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.benchmark import Timer

from . import reference
from ._validation import is_int
from .backends import available_backends
from .functional import dense_kd

TEMPERATURE = 4.0


def loss_function(impl: str, num_exits: int,
                  compile_backend: str = "inductor") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(logits, target) -> loss`` of one implementation: a backend name (``dense_kd`` with it),
    ``"reference"`` (the readable loop ``reference.DenseKD``), ``"reference_compiled"`` (``torch.compile``
    of the loop with ``compile_backend``) or ``"liger"`` (:func:`liger_loss_function`). ``pytest bench/``
    times the same functions."""
    if impl in ("reference", "reference_compiled"):
        module = reference.DenseKD(num_exits, temperature=TEMPERATURE)
        if impl == "reference_compiled":
            _raise_recompile_limit()
            return torch.compile(module, dynamic=False, backend=compile_backend)
        return module
    if impl == "liger":
        return liger_loss_function(num_exits)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dense_kd(x, y, temperature=TEMPERATURE, backend=impl)

    return loss_fn


def _raise_recompile_limit(limit: int = 1024) -> None:
    """Every compiled loop of a grid (one per K, C, dtype) recompiles the same ``forward``: past dynamo's
    default limit of 8 recompilations it would silently run the loop eagerly instead."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name since torch 2.6, and before
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), limit))
            return


def liger_unavailable_reason(device: torch.device | str) -> str | None:
    """``None`` when ``"liger"`` can run on ``device``: CUDA tensors and an importable Liger-Kernel."""
    if torch.device(device).type != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    try:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss  # noqa: F401
    except Exception as exc:  # not installed, or broken against this torch / triton
        return f"liger_kernel cannot be imported ({type(exc).__name__}: {exc})"
    return None


def liger_loss_function(num_exits: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The dense loss with Liger-Kernel's ``LigerKLDIVLoss`` applied pair by pair (the best peer
    kernel): each exit's log-softmax at T once (fp32, as the loop), ``F.cross_entropy`` per exit, and
    ``T² · LigerKLDIVLoss(log p_i, log p_j)`` (``log_target=True``, ``"batchmean"``, teacher detached)
    for every dense pair: the same value as ``reference.DenseKD``."""
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    t = TEMPERATURE

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        exits = [z.float() for z in (x.unbind(0) if isinstance(x, torch.Tensor) else x)]
        logp = [torch.log_softmax(z / t, dim=-1) for z in exits]
        loss = sum((torch.nn.functional.cross_entropy(z, y) for z in exits), exits[0].new_zeros(()))
        for j in range(1, num_exits):
            teacher = logp[j].detach()
            for i in range(j):
                loss = loss + kl(logp[i], teacher) * (t * t)
        return loss

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
        if not values or any(not is_int(v) or v < 1 for v in values):
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
