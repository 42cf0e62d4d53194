"""Forward and forward+backward of ``dense_kd``: every available backend against the readable loop
(``reference.DenseKD``), ``torch.compile`` of that loop, the loop with Liger-Kernel's ``LigerKLDIVLoss``
as every pair's KL (``liger``, CUDA only) and one ``torch.softmax`` pass over the same ``[K, B, C]``
tensor (``softmax_pass``, a floor: any fused op must read the logits at least once); plus the
device-to-device copy bandwidth (``test_copy_bandwidth``), the HBM floor of the GPU report.

Grids (``pytest_generate_tests``):

- CPU: ``pytest bench/`` runs the quick grid (four shapes; ``torch.compile`` of the loop only for
  forward+backward, to keep a cold run, compilation included, under 3 minutes on 2 cores);
  ``--full`` K ∈ {2, 4, 8, 16} × C ∈ {10, 100, 1000}; B = 256, fp32.
- CUDA: ``--full`` K ∈ {2, 4, 8, 16, 32} × C ∈ {100, 1000, 32000, 128256}, B = 4096, bf16 and fp32
  (the quick default: four bf16 shapes). ``torch.compile`` of the loop is timed for forward+backward
  at K ≤ 8 only (its compile grows with the K(K−1)/2 pairs: minutes at K = 32); cases whose estimated
  memory exceeds the card are skipped, and so are cases that run out of memory.
- ``--tiny``: the dry run of scripts/gpu_check.sh (K ∈ {2, 8}, C = 10, B = 8, fp32 and bf16, two rounds,
  ``torch.compile`` with the ``aot_eager`` backend).

Timing: on the CPU, 20 rounds of one synchronous call. On CUDA a round runs ``inner`` calls back to
back and synchronizes once (inner chosen so a round lasts about 2 ms), so launch latency overlaps with
device work as in a training loop; pytest-benchmark's statistics are per call either way. On CUDA each
case also records the peak memory of one call above what was allocated before it
(``extra_info["peak_extra_bytes"]``, ``torch.cuda.max_memory_allocated``) and the gradient's size.
``python bench/report.py RUN.json`` turns a ``--benchmark-json`` file into the ratio tables of
bench/RESULTS.md (and, for a CUDA run, the floors and the targets of the GPU check).
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from hdkd_fast.backends import available_backends, backend_names, runnable_backends
from hdkd_fast.bench import liger_unavailable_reason, loss_function

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
CPU_QUICK = {(8, 1000), (2, 100), (16, 100), (4, 10)}
GPU_QUICK = {(8, 1000), (2, 1000), (32, 1000), (8, 128256)}
MAIN = (8, 1000)
"""(K, C) of the issue's main targets (B = 4096, bf16, forward+backward): run first."""
COMPILE_MAX_EXITS = 8
PEERS = ["reference", "reference_compiled", "liger", "softmax_pass"]
ROUNDS = 20


def backends(tiny: bool) -> list[str]:
    """The backends to time: those ``"auto"`` may pick on this device, plus, for the dry run on the CPU,
    ``"triton"`` when it runs under the Triton interpreter."""
    return (runnable_backends if tiny else available_backends)(DEVICE)


def grid(tiny: bool) -> tuple[int, list[tuple[int, int, bool]], list[torch.dtype]]:
    """``(B, [(K, C, quick)], dtypes)`` of this device."""
    if tiny:
        return 8, [(k, 10, True) for k in (2, 8)], [torch.float32, torch.bfloat16]
    if CUDA:
        shapes = itertools.product((2, 4, 8, 16, 32), (100, 1000, 32000, 128256))
        return 4096, [(k, c, (k, c) in GPU_QUICK) for k, c in shapes], [torch.bfloat16, torch.float32]
    shapes = itertools.product((2, 4, 8, 16), (10, 100, 1000))
    return 256, [(k, c, (k, c) in CPU_QUICK) for k, c in shapes], [torch.float32]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ != "test_dense_kd":
        return
    tiny = bool(metafunc.config.getoption("--tiny"))
    b, shapes, dtypes = grid(tiny)
    params = []
    for dtype in dtypes:
        for k, c, quick in shapes:
            quick = quick and (tiny or dtype == dtypes[0])
            dt = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
            params.append(pytest.param(b, k, c, dtype, marks=[] if quick else [pytest.mark.full],
                                       id=f"{dt}-K{k}-C{c}"))
    metafunc.parametrize(("b", "k", "c", "dtype"), params)
    metafunc.parametrize("impl", [*backends(tiny), *PEERS])
    metafunc.parametrize("mode", ["forward", "forward_backward"])


def priority(item: pytest.Item) -> tuple[int]:
    """Run order on a budget: the copy bandwidth, the main target group, then the other bf16
    forward+backward cases of the fused ops and Liger, ..., the loop and its compilation last."""
    params = getattr(item, "callspec", None)
    if params is None:
        return (0,)
    p = params.params
    impl, k, c, dtype, mode = p["impl"], p["k"], p["c"], p["dtype"], p["mode"]
    fb = mode == "forward_backward"
    low = dtype != torch.bfloat16 and CUDA
    if (k, c) == MAIN and fb and not low:
        return (1,)
    if impl == "reference_compiled":
        return (7,)
    if impl == "reference":
        return (6,)
    if fb and not low and c in (MAIN[1], 128256):
        return (2,)
    if not low:
        return (3 if fb else 4,)
    return (5,)


@pytest.fixture(autouse=True)
def _free_device_memory() -> Iterator[None]:
    yield
    if CUDA:
        gc.collect()
        torch.cuda.empty_cache()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _make_step(impl: str, k: int, backward: bool, tiny: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    if impl == "softmax_pass":
        def softmax_pass(x: torch.Tensor, y: torch.Tensor) -> None:
            torch.softmax(x, dim=-1)
        return softmax_pass
    loss_fn = loss_function(impl, k, compile_backend="aot_eager" if tiny else "inductor")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if backward:
            x.grad = None
            loss_fn(x, y).backward()
        else:
            with torch.no_grad():
                loss_fn(x, y)
    return step


def estimated_bytes(impl: str, mode: str, k: int, b: int, c: int, dtype: torch.dtype) -> int:
    """A rough upper bound of the device memory one call needs, logits included (for skipping)."""
    n, s = k * b * c, torch.tensor([], dtype=dtype).element_size()
    fb = mode == "forward_backward"
    pairs = k * (k - 1) // 2
    row = b * c * 4  # one fp32 [B, C]
    if impl == "torch":
        return n * s * 2 + 8 * n * 4
    if impl in backend_names():  # the fused ones: logits, gradient, per-row losses
        return n * s * (2 if fb else 1) + (64 << 20)
    if impl == "softmax_pass":
        return 2 * n * s
    if impl == "liger":
        return n * s + n * 4 * (4 if fb else 2) + 2 * row
    # the loop: fp32 copies of the exits, and per pair the log-softmaxes kept for backward
    return n * s + n * 4 * 2 + (pairs * 3 * row if fb else 4 * row)


def _device_memory() -> int:
    return torch.cuda.get_device_properties(DEVICE).total_memory if CUDA else 1 << 62


def _timing(step: Callable[[torch.Tensor, torch.Tensor], None], x: torch.Tensor, y: torch.Tensor,
            tiny: bool) -> tuple[int, int]:
    """``(rounds, inner)``: CPU as before; CUDA from the time of one synchronized call."""
    if tiny:
        return 2, 1
    if not CUDA:
        return ROUNDS, 1
    start = time.perf_counter()
    step(x, y)
    _sync()
    t = max(time.perf_counter() - start, 1e-6)
    inner = max(1, min(50, math.ceil(2e-3 / t)))
    rounds = max(3, min(ROUNDS, int(0.4 / (t * inner))))
    return rounds, inner


def test_dense_kd(benchmark, full_grid: bool, tiny_grid: bool, time_left: Callable[[], float],
                  mode: str, impl: str, b: int, k: int, c: int, dtype: torch.dtype) -> None:
    fb = mode == "forward_backward"
    if impl == "softmax_pass" and fb:
        pytest.skip("the softmax floor is a single forward pass")
    if impl == "reference_compiled" and not fb and (CUDA or not full_grid):
        pytest.skip("torch.compile of the loop is timed for forward+backward only (each compile takes ~20 s)")
    if impl == "reference_compiled" and CUDA and k > COMPILE_MAX_EXITS:
        pytest.skip(f"torch.compile of the loop is timed for K <= {COMPILE_MAX_EXITS} (its compile grows with K²)")
    if impl == "reference_compiled" and time_left() < 90:
        pytest.skip("less than 90 s of the bench budget left: no torch.compile")
    if impl == "liger" and (reason := liger_unavailable_reason(DEVICE)) is not None:
        pytest.skip(f"liger not available: {reason}")
    need = estimated_bytes(impl, mode, k, b, c, dtype)
    if need > 0.9 * _device_memory():
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB, more than the device's {_device_memory() / 2**30:.0f} GiB")
    gen = torch.Generator(device=DEVICE).manual_seed(k * 1000 + c)
    try:
        x = torch.randn(k, b, c, generator=gen, device=DEVICE, dtype=dtype).mul_(3).requires_grad_(fb)
        y = torch.randint(0, c, (b,), generator=gen, device=DEVICE)
        step = _make_step(impl, k, backward=fb, tiny=tiny_grid)
        for _ in range(1 if tiny_grid else 3):  # warm up (and compile) outside the timed rounds
            step(x, y)
        _sync()
        rounds, inner = _timing(step, x, y, tiny_grid)
        info = dict(impl=impl, mode=mode, K=k, B=b, C=c, dtype=str(dtype), device=DEVICE.type, inner=inner,
                    logits_bytes=x.numel() * x.element_size())
        if CUDA:
            x.grad = None
            _sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(x, y)
            _sync()
            info.update(peak_extra_bytes=torch.cuda.max_memory_allocated() - before,
                        grad_bytes=x.numel() * x.element_size())
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"out of device memory: {str(exc).splitlines()[0][:200]}")
    calls = 0

    def timed() -> None:
        nonlocal calls
        step(x, y)
        calls += 1
        if calls % inner == 0:
            _sync()

    benchmark.group = f"dense_kd {mode} K={k} B={b} C={c} {str(dtype).removeprefix('torch.')} {DEVICE.type}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=rounds, iterations=inner, warmup_rounds=0)


def test_copy_bandwidth(benchmark, tiny_grid: bool) -> None:
    """``dst.copy_(src)`` of 2 GiB on CUDA (64 MiB on the CPU, 4 MiB tiny): the bandwidth floor of the
    report, bytes read + written per second (``extra_info["bytes_moved"]`` per call)."""
    nbytes = (4 << 20) if tiny_grid else (2 << 30) if CUDA else (64 << 20)
    src = torch.randn(nbytes // 4, device=DEVICE)  # random data, not zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync()
    inner = 5 if CUDA else 1
    calls = 0

    def timed() -> None:
        nonlocal calls
        dst.copy_(src)
        calls += 1
        if calls % inner == 0:
            _sync()

    benchmark.group = f"copy bandwidth {DEVICE.type}"
    benchmark.extra_info.update(impl="copy", bytes_moved=2 * nbytes, device=DEVICE.type, inner=inner)
    benchmark.pedantic(timed, rounds=2 if tiny_grid else 20, iterations=inner, warmup_rounds=0)
