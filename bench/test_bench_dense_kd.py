"""Forward and forward+backward of ``dense_kd``: every available backend against the readable loop
(``reference.DenseKD``), ``torch.compile`` of that loop, and one ``torch.softmax`` pass over the
same ``[K, B, C]`` tensor (a floor: any fused op must read the logits at least once).

``pytest bench/`` runs the quick CPU grid (four shapes; ``torch.compile`` of the loop only for
forward+backward, to keep a cold run, compilation included, under 3 minutes on 2 cores);
``pytest bench/ --full`` the grid K ∈ {2, 4, 8, 16} × C ∈ {10, 100, 1000} (B = 256 on CPU, 4096 on
CUDA). ``python bench/report.py RUN.json`` turns a ``--benchmark-json`` file into the ratio table of
bench/RESULTS.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

import hdkd_fast as hk
from hdkd_fast.bench import loss_function

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B = 4096 if DEVICE.type == "cuda" else 256
QUICK = {(8, 1000), (2, 100), (16, 100), (4, 10)}
GRID = [
    pytest.param(k, c, marks=[] if (k, c) in QUICK else [pytest.mark.full], id=f"K{k}-C{c}")
    for k, c in itertools.product((2, 4, 8, 16), (10, 100, 1000))
]
DTYPES = [pytest.param(torch.float32, id="fp32")] + (
    [pytest.param(torch.bfloat16, marks=pytest.mark.full, id="bf16")] if DEVICE.type == "cuda" else []
)
IMPLS = [*hk.available_backends(DEVICE), "reference", "reference_compiled", "softmax_pass"]
ROUNDS = 20


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _make_step(impl: str, k: int, dtype: torch.dtype, backward: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    if impl == "softmax_pass":
        def softmax_pass(x: torch.Tensor, y: torch.Tensor) -> None:
            torch.softmax(x, dim=-1)
        return softmax_pass
    loss_fn = loss_function(impl, k)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if backward:
            x.grad = None
            loss_fn(x, y).backward()
        else:
            with torch.no_grad():
                loss_fn(x, y)
    return step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "c"), GRID)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_dense_kd(benchmark, full_grid: bool, mode: str, impl: str, k: int, c: int, dtype: torch.dtype) -> None:
    if impl == "softmax_pass" and mode == "forward_backward":
        pytest.skip("the softmax floor is a single forward pass")
    if impl == "reference_compiled" and mode == "forward" and not full_grid:
        pytest.skip("quick grid: torch.compile is timed for forward+backward only (each compile takes ~20 s)")
    gen = torch.Generator(device=DEVICE).manual_seed(k * 1000 + c)
    x = (3 * torch.randn(k, B, c, generator=gen, device=DEVICE)).to(dtype).requires_grad_(mode == "forward_backward")
    y = torch.randint(0, c, (B,), generator=gen, device=DEVICE)
    step = _make_step(impl, k, dtype, backward=mode == "forward_backward")
    for _ in range(3):  # warm up (and compile) outside the timed rounds
        step(x, y)
    _sync()

    def timed() -> None:
        step(x, y)
        _sync()

    benchmark.group = f"dense_kd {mode} K={k} B={B} C={c} {str(dtype).removeprefix('torch.')} {DEVICE.type}"
    benchmark.extra_info.update(impl=impl, mode=mode, K=k, B=B, C=c, dtype=str(dtype), device=DEVICE.type)
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
