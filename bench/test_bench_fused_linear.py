"""Memory and time of dense KD over a shared LM head: ``FusedLinearDenseKD`` (``fused``: chunked, no K×N×V
logits) against the materialized path (``materialized``: ``hidden @ W.T + b`` then ``dense_kd``) and the
naive per-pair loop on the same logits (``loop``: ``reference.DenseKD``). One training step each: forward
and backward into the hidden states, the head and its bias; T = 4, dense pairs, 1 % ignored tokens.

Grids: ``pytest bench/`` one quick shape (K = 2, N = 512, V = 8000, H = 256); ``--full`` the issue's grid,
V ∈ {32000, 128256} × N ∈ {2048, 8192} × K ∈ {2, 4, 8}, H = 1024 (fp32 on the CPU, bf16 hidden states
and head on CUDA); ``--tiny`` a dry run. A case whose estimated memory exceeds 80 % of what the machine
has free (or of the GPU) is skipped with the estimate in its reason; on the CPU a full-grid step costs
about 3·2·K·N·V·H flops (11 s at K = 2, N = 2048, V = 32000 on 2 cores), so run the cells you can afford
with ``-k``.

Peak extra memory (``extra_info["peak_extra_bytes"]``; ``bench/peak_memory.py``): on the CPU each case
first runs this file as a script in a fresh process, which builds the inputs and measures one step's peak
resident set above the resident set before it (``VmHWM`` after a reset), as the kernel counts it,
allocator caching included. On CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before
the step.
Time: pytest-benchmark in the test process, rounds of one step after a warm-up step (on the CPU with
``--full``: one round, no warm-up; every step of the materialized paths faults its fresh logits in anyway).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import pytest
import torch
from peak_memory import available_bytes, cuda_peak, peak_in_subprocess, peak_rss

import hdkd_fast as hk

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
IMPLS = ("fused", "materialized", "loop")
H_FULL = 1024
QUICK = (2, 512, 8000, 256)
TINY = (2, 16, 50, 8)


def cases(full: bool, tiny: bool) -> list[tuple[int, int, int, int]]:
    """``(K, N, V, H)`` of this run."""
    if tiny:
        return [TINY]
    if full:
        return [(k, n, v, H_FULL) for v in (32000, 128256) for n in (2048, 8192) for k in (2, 4, 8)]
    return [QUICK]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" not in metafunc.fixturenames:
        return
    full, tiny = bool(metafunc.config.getoption("--full")), bool(metafunc.config.getoption("--tiny"))
    params = [pytest.param(s, id=f"K{s[0]}-N{s[1]}-V{s[2]}-H{s[3]}") for s in cases(full, tiny)]
    metafunc.parametrize("shape", params)
    metafunc.parametrize("impl", IMPLS)


def inputs(k: int, n: int, v: int, h: int, dtype: torch.dtype, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(hidden [K, N, H], weight [V, H], bias [V], target [N])``, the first three requiring grad."""
    g = torch.Generator(device=device).manual_seed(k * n + v)
    hidden = torch.randn(k, n, h, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5).requires_grad_()
    bias = torch.randn(v, generator=g, device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g, device=device)
    target[:: 100] = -100
    return hidden, weight, bias, target


def make_step(impl: str, k: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """One training step of ``impl``: the loss and its backward into hidden, weight and bias."""
    fused = hk.FusedLinearDenseKD(k)
    loop = hk.reference.DenseKD(k)

    def step(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor) -> None:
        for t in (hidden, weight, bias):
            t.grad = None
        if impl == "fused":
            loss = fused(hidden, weight, target, bias)
        else:
            logits = torch.addmm(bias, hidden.flatten(0, 1), weight.t()).view(k, hidden.shape[1], -1)
            loss = hk.dense_kd(logits, target) if impl == "materialized" else loop(logits, target)
        loss.backward()
    return step


def estimated_bytes(impl: str, k: int, n: int, v: int, h: int) -> int:
    """A rough upper bound of one step's extra memory in fp32 (for skipping), inputs' gradients included."""
    logits = k * n * v * 4
    grads = (k * n * h + v * h + v) * 4
    if impl == "fused":
        return hk.fused_linear.DEFAULT_CHUNK_BUDGET_BYTES + 2 * grads
    if impl == "materialized":  # logits, the kept gradient, its scaled copy in backward
        return 3 * logits + 2 * grads
    return (4 + k) * logits + 2 * grads  # the loop: log-softmaxes per exit and per pair, their gradients


def measure_peak_rss(impl: str, k: int, n: int, v: int, h: int) -> dict[str, int]:
    """In this process: the inputs, a tiny warm-up of ``impl`` (loads the extension), then one step with
    the kernel's peak-RSS counter reset (``peak_memory.peak_rss``)."""
    make_step(impl, 2)(*inputs(2, 8, 16, 8, torch.float32, DEVICE))
    tensors = inputs(k, n, v, h, torch.float32, DEVICE)
    step = make_step(impl, k)
    return peak_rss(lambda: step(*tensors))


def test_fused_linear_dense_kd(benchmark, tiny_grid: bool, full_grid: bool, impl: str,
                               shape: tuple[int, int, int, int]) -> None:
    k, n, v, h = shape
    need = estimated_bytes(impl, k, n, v, h)
    if need > 0.8 * available_bytes(DEVICE):
        pytest.skip(f"needs ~{need / 1e9:.1f} GB (logits alone {k * n * v * 4 / 1e9:.1f} GB), more than 80 % of "
                    f"the {available_bytes(DEVICE) / 1e9:.1f} GB available")
    dtype = torch.bfloat16 if CUDA and not tiny_grid else torch.float32
    info: dict[str, object] = dict(impl=impl, K=k, N=n, V=v, H=h, dtype=str(dtype), device=DEVICE.type,
                                   logits_bytes=k * n * v * 4)
    if not CUDA:
        args = ["--impl", impl, "--k", str(k), "--n", str(n), "--v", str(v), "--h", str(h)]
        info.update(peak_in_subprocess(__file__, args))
    tensors = inputs(k, n, v, h, dtype, DEVICE)
    step = make_step(impl, k)
    if not full_grid or CUDA:  # the full CPU grid times the first step: a step costs seconds to minutes there
        step(*tensors)
    if CUDA:
        info["peak_extra_bytes"] = cuda_peak(lambda: step(*tensors))

    def timed() -> None:
        step(*tensors)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"fused linear dense KD K={k} N={n} V={v} H={h} {DEVICE.type}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=1 if full_grid or tiny_grid else 5, iterations=1, warmup_rounds=0)


def main() -> None:
    """``python bench/test_bench_fused_linear.py --impl fused --k 4 --n 2048 --v 32000 --h 1024``: the peak
    RSS measurement of one case, printed as one JSON line."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    for name in ("k", "n", "v", "h"):
        parser.add_argument(f"--{name}", type=int, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    result = measure_peak_rss(args.impl, args.k, args.n, args.v, args.h)
    print(json.dumps({**result, "step_s": round(time.perf_counter() - start, 3)}))


if __name__ == "__main__":
    main()
