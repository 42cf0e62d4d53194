"""The native backend (hdkd_fast._C: fused C++ CPU kernel, CUDA kernel when built) against the
independent float64 reference, through the public API with ``backend="native"``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import hdkd_fast as hk
from hdkd_fast.backends import native_backend
from tests.support import float64_reference as R

if "native" not in hk.available_backends("cpu"):
    if os.environ.get("HDKD_FAST_REQUIRE_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        raise RuntimeError(  # CI builds the extension: a missing build must fail, not skip
            f"HDKD_FAST_REQUIRE_EXT is set but the native backend is unavailable: "
            f"{native_backend.unavailable_reason(torch.device('cpu'))}")
    pytest.skip(f"native backend not built: {native_backend.unavailable_reason(torch.device('cpu'))}",
                allow_module_level=True)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "native" in hk.available_backends("cuda") else [])
TOL = {  # (rtol, atol) of outputs / gradients vs the float64 reference
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 2e-4),
    torch.bfloat16: (1e-2, 2e-3),
}
LOSS_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6),
            torch.float16: (2e-5, 2e-6), torch.bfloat16: (2e-5, 2e-6)}  # fp32 accumulation


def _data(k: int, b: int, c: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
          ignore: tuple[int, ...] = (1,)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000 * k + c)
    z = (3 * torch.randn(k, b, c, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    y = torch.randint(0, c, (b,), generator=gen)
    for r in ignore:
        if r < b:
            y[r] = -100
    return z, y.to(device)


def _mask(pairs: str | torch.Tensor, k: int) -> list[list[bool]]:
    return pairs.tolist() if isinstance(pairs, torch.Tensor) else R.masks(k)[pairs]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], scale: float | None = None) -> None:
    rtol, atol = tol
    expected = expected.detach().to(torch.float64).cpu()
    if scale is None:
        scale = max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual.detach().to(torch.float64).cpu(), expected, rtol=rtol, atol=atol * scale)


def _mutual_mask(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(k, k, generator=gen) < 0.6) & ~torch.eye(k, dtype=torch.bool)


# ---- losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pairs", ["dense", "last", "adjacent"])
@pytest.mark.parametrize("temperature", [4.0, 1.0, 2.5])
def test_losses_match_reference(device: str, reduction: str, pairs: str, temperature: float) -> None:
    z, y = _data(4, 7, 37, device=device)
    out = hk.dense_kd_losses(z, y, temperature=temperature, pairs=pairs, reduction=reduction, backend="native")
    ce, kd = R.losses(z.cpu(), y.cpu(), temperature=temperature, mask=R.masks(4)[pairs], reduction=reduction)
    assert out.ce is not None and ce is not None
    assert out.ce.dtype == torch.float32 and out.kd.dtype == torch.float32
    _close(out.ce, ce, TOL[torch.float32])
    _close(out.kd, kd, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("k", "c"), [(1, 7), (2, 2), (3, 1001), (5, 17), (9, 7), (33, 5)])
def test_odd_shapes_and_many_exits(device: str, k: int, c: int) -> None:
    z, y = _data(k, 5, c, device=device)
    out = hk.dense_kd_losses(z, y, temperature=3.0, backend="native")
    ce, kd = R.losses(z.cpu(), y.cpu(), temperature=3.0, mask=R.masks(k)["dense"])
    _close(out.ce, ce, TOL[torch.float32])
    _close(out.kd, kd, TOL[torch.float32])
    # and the gradient of the weighted sum
    x = z.clone().requires_grad_(True)
    hk.dense_kd(x, y, temperature=3.0, backend="native").backward()
    zr = z.cpu().double().requires_grad_(True)
    R.weighted(zr, y.cpu(), torch.ones(k), torch.ones(k, k), temperature=3.0, mask=R.masks(k)["dense"]).backward()
    assert x.grad is not None and zr.grad is not None
    _close(x.grad, zr.grad, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(device: str, dtype: torch.dtype) -> None:
    z, y = _data(4, 9, 23, dtype=dtype, device=device)
    out = hk.dense_kd_losses(z, y, temperature=4.0, backend="native")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.ce is not None and out.ce.dtype == acc and out.kd.dtype == acc
    ce, kd = R.losses(z.cpu(), y.cpu(), temperature=4.0, mask=R.masks(4)["dense"])
    _close(out.ce, ce, LOSS_TOL[dtype])
    _close(out.kd, kd, LOSS_TOL[dtype])
    x = z.clone().requires_grad_(True)
    cw, kw = torch.rand(4, dtype=acc, device=device), torch.rand(4, 4, dtype=acc, device=device)
    hk.dense_kd(x, y, ce_weight=cw, kd_weight=kw, temperature=4.0, backend="native").backward()
    assert x.grad is not None and x.grad.dtype == dtype
    zr = z.cpu().double().requires_grad_(True)
    R.weighted(zr, y.cpu(), cw.cpu(), kw.cpu(), temperature=4.0, mask=R.masks(4)["dense"]).backward()
    assert zr.grad is not None
    _close(x.grad, zr.grad, TOL[dtype])


# ---- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize("temperature", [4.0, 1.5])
def test_weighted_gradient(device: str, dtype: torch.dtype, detach_teacher: bool, temperature: float) -> None:
    k = 5
    z, y = _data(k, 8, 29, dtype=dtype, device=device, seed=1)
    pairs: str | torch.Tensor = "dense" if detach_teacher else _mutual_mask(k)
    cw = torch.rand(k, dtype=dtype, device=device)
    kw = torch.rand(k, k, dtype=dtype, device=device)
    x = z.clone().requires_grad_(True)
    loss = hk.dense_kd(x, y, ce_weight=cw, kd_weight=kw, temperature=temperature, pairs=pairs,
                       detach_teacher=detach_teacher, backend="native")
    loss.backward()
    zr = z.cpu().double().requires_grad_(True)
    ref = R.weighted(zr, y.cpu(), cw.cpu(), kw.cpu(), temperature=temperature, mask=_mask(pairs, k),
                     detach_teacher=detach_teacher)
    ref.backward()
    assert x.grad is not None and zr.grad is not None
    _close(loss, ref, TOL[dtype])
    _close(x.grad, zr.grad, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_backward_of_every_objective(device: str, reduction: str, detach_teacher: bool) -> None:
    """Arbitrary grad-outputs of (ce, kd): per-row objective weights for reduction='none'."""
    k = 4
    z, y = _data(k, 6, 19, dtype=torch.float64, device=device, seed=2)
    pairs: str | torch.Tensor = "dense" if detach_teacher else _mutual_mask(k, seed=3)
    x = z.clone().requires_grad_(True)
    out = hk.dense_kd_losses(x, y, temperature=2.0, pairs=pairs, detach_teacher=detach_teacher,
                             reduction=reduction, backend="native")
    assert out.ce is not None
    gen = torch.Generator().manual_seed(5)
    g_ce = torch.randn(out.ce.shape, generator=gen, dtype=torch.float64)
    g_kd = torch.randn(out.kd.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out.ce, out.kd), x, (g_ce.to(device), g_kd.to(device)))
    zr = z.cpu().requires_grad_(True)
    ce, kd = R.losses(zr, y.cpu(), temperature=2.0, mask=_mask(pairs, k), detach_teacher=detach_teacher,
                      reduction=reduction)
    assert ce is not None
    (ref,) = torch.autograd.grad((ce, kd), zr, (g_ce, g_kd))
    _close(out.ce, ce, TOL[torch.float64])
    _close(out.kd, kd, TOL[torch.float64])
    _close(grad, ref, TOL[torch.float64])


# ---- forward mode --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_jvp_matches_reference(device: str, reduction: str, detach_teacher: bool) -> None:
    k = 4
    z, y = _data(k, 6, 21, dtype=torch.float64, device=device, seed=4)
    pairs: str | torch.Tensor = "dense" if detach_teacher else _mutual_mask(k, seed=6)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)

    def native(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = hk.dense_kd_losses(v, y, temperature=3.0, pairs=pairs, detach_teacher=detach_teacher,
                                 reduction=reduction, backend="native")
        assert out.ce is not None
        return out.ce, out.kd

    def reference(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce, kd = R.losses(v, y.cpu(), temperature=3.0, mask=_mask(pairs, k), detach_teacher=detach_teacher,
                          reduction=reduction)
        assert ce is not None
        return ce, kd

    _, (d_ce, d_kd) = torch.func.jvp(native, (z,), (dz,))
    _, (r_ce, r_kd) = torch.func.jvp(reference, (z.cpu(),), (dz.cpu(),))
    _close(d_ce, r_ce, TOL[torch.float64])
    _close(d_kd, r_kd, TOL[torch.float64])


# ---- input forms, labels, threads ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_list_and_stacked_inputs_agree(device: str) -> None:
    z, y = _data(3, 7, 33, device=device)
    # a sequence of exits with a row stride (views of a wider buffer) is read in place
    wide = torch.zeros(3, 7, 40, device=device)
    wide[..., :33] = z
    exits = [wide[k, :, :33] for k in range(3)]
    stacked = hk.dense_kd_losses(z, y, backend="native")
    listed = hk.dense_kd_losses(exits, y, backend="native")
    assert stacked.ce is not None and listed.ce is not None
    assert torch.equal(stacked.ce, listed.ce) and torch.equal(stacked.kd, listed.kd)
    xs = [e.clone().requires_grad_(True) for e in exits]
    hk.dense_kd(xs, y, backend="native").backward()
    x = z.clone().requires_grad_(True)
    hk.dense_kd(x, y, backend="native").backward()
    assert x.grad is not None
    for k, e in enumerate(xs):
        assert e.grad is not None
        torch.testing.assert_close(e.grad, x.grad[k], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows(device: str) -> None:
    z, y = _data(3, 6, 11, device=device, ignore=(0, 3))
    out = hk.dense_kd_losses(z, y, backend="native")
    ce, kd = R.losses(z.cpu(), y.cpu(), temperature=4.0, mask=R.masks(3)["dense"])
    _close(out.ce, ce, TOL[torch.float32])
    _close(out.kd, kd, TOL[torch.float32])
    # every row ignored: CE 0 (never NaN), its gradient 0, KD unchanged
    y_all = torch.full_like(y, -100)
    x = z.clone().requires_grad_(True)
    out = hk.dense_kd_losses(x, y_all, backend="native")
    assert out.ce is not None and torch.equal(out.ce, torch.zeros_like(out.ce))
    _close(out.kd, kd, TOL[torch.float32])
    loss = hk.dense_kd(x, y_all, kd_weight=0.0, backend="native")
    loss.backward()
    assert x.grad is not None and float(loss.detach()) == 0.0 and torch.count_nonzero(x.grad) == 0
    # no target: no CE at all
    assert hk.dense_kd_losses(z, None, backend="native").ce is None


def test_thread_count_does_not_change_results() -> None:
    z, y = _data(6, 67, 301, seed=8)
    before = torch.get_num_threads()

    def run() -> list[torch.Tensor]:
        x = z.clone().requires_grad_(True)
        out = hk.dense_kd_losses(x, y, reduction="mean", backend="native")
        assert out.ce is not None
        loss = hk.dense_kd(x, y, ce_weight=torch.rand(6, generator=torch.Generator().manual_seed(1)),
                           detach_teacher=False, pairs=_mutual_mask(6), backend="native")
        loss.backward()
        assert x.grad is not None
        _, (d_ce, d_kd) = torch.func.jvp(
            lambda v: tuple(hk.dense_kd_losses(v, y, backend="native")), (z,), (torch.ones_like(z),))
        return [out.ce, out.kd, loss.detach(), x.grad, d_ce, d_kd]

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(4, before))
        multi = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a, b)


def _runnable_variants(info: dict[str, object]) -> list[str]:
    """The compiled variants this CPU can run (CPUID), lowest first."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    limit = order.index(str(info["supported_cpu_capability"]))
    return [cap for cap in order[: limit + 1] if cap in info["compiled_cpu_capabilities"]]  # type: ignore[operator]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="uses a POSIX subprocess environment")
def test_cpu_instruction_set_variants_agree() -> None:
    """Every compiled variant this CPU runs (DEFAULT / AVX2 / AVX512, chosen like PyTorch via
    ATEN_CPU_CAPABILITY) gives the same losses up to rounding. Variants the CPU lacks are not run:
    PyTorch's own kernels would die of SIGILL under such an ATEN_CPU_CAPABILITY."""
    info = native_backend.build_info()
    code = (
        "import torch, hdkd_fast as hk; from hdkd_fast.backends import native_backend as nb\n"
        "g = torch.Generator().manual_seed(0); z = 3 * torch.randn(4, 9, 45, generator=g)\n"
        "y = torch.randint(0, 45, (9,), generator=g); out = hk.dense_kd_losses(z, y, backend='native')\n"
        "print(nb.build_info()['cpu_capability'], *out.ce.tolist(), *out.kd.flatten().tolist())\n"
    )
    results = {}
    for cap in _runnable_variants(info):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        name, *values = proc.stdout.split()
        assert name == cap
        results[name] = torch.tensor([float(v) for v in values])
    base = results.pop("DEFAULT")
    for values in results.values():
        torch.testing.assert_close(values, base, rtol=1e-5, atol=1e-6)


def test_cpu_variant_is_clamped_to_what_the_cpu_supports() -> None:
    """A request above what the CPU supports (ATEN_CPU_CAPABILITY=avx512 on an AVX2-only CPU) runs the
    best variant the CPU has, never one it lacks; a lower request is honoured."""
    from hdkd_fast import _ext_loader

    ext = _ext_loader.extension().module
    assert ext is not None
    if set(ext.compiled_cpu_capabilities()) != {"DEFAULT", "AVX2", "AVX512"}:
        pytest.skip("needs the ahead-of-time build with every x86-64 variant")
    for requested, supported, expected in [
        ("AVX512", "AVX2", "AVX2"), ("AVX512", "DEFAULT", "DEFAULT"), ("AVX2", "DEFAULT", "DEFAULT"),
        ("AVX2", "AVX512", "AVX2"), ("DEFAULT", "AVX512", "DEFAULT"), ("AVX512", "AVX512", "AVX512"),
    ]:
        assert ext.choose_cpu_capability(requested, supported) == expected, (requested, supported)
    info = native_backend.build_info()
    assert info["cpu_capability"] == ext.choose_cpu_capability(
        info["requested_cpu_capability"], info["supported_cpu_capability"])


# ---- errors ------------------------------------------------------------------------------------

def test_bad_input_is_rejected_before_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the native kernel must not be reached with bad input")

    monkeypatch.setattr(native_backend, "losses_and_grad", fail)
    monkeypatch.setattr(native_backend, "jvp", fail)
    z, y = _data(3, 5, 7)
    cases = [
        (ValueError, lambda: hk.dense_kd_losses(z[0], y, backend="native")),  # wrong rank
        (ValueError, lambda: hk.dense_kd_losses([z[0], z[1, :, :6]], y, backend="native")),  # C mismatch
        (TypeError, lambda: hk.dense_kd_losses([z[0], z[1].double()], y, backend="native")),  # dtype mismatch
        (TypeError, lambda: hk.dense_kd_losses(z.long(), y, backend="native")),  # not floating
        (ValueError, lambda: hk.dense_kd_losses(z, y, temperature=0.0, backend="native")),
        (ValueError, lambda: hk.dense_kd_losses(z, y, temperature=float("nan"), backend="native")),
        (ValueError, lambda: hk.dense_kd_losses(z, y[:4], backend="native")),  # B mismatch
        (ValueError, lambda: hk.dense_kd_losses(z, torch.full_like(y, 7), backend="native")),  # label >= C
        (ValueError, lambda: hk.dense_kd_losses(z, torch.full_like(y, -1), backend="native")),  # negative label
        (ValueError, lambda: hk.dense_kd_losses(z, y, reduction="avg", backend="native")),
        (ValueError, lambda: hk.dense_kd(z, y, ce_weight=torch.ones(4), backend="native")),  # weight shape
        (ValueError, lambda: hk.dense_kd(z, y, kd_weight=torch.ones(3), backend="native")),
        (ValueError, lambda: hk.dense_kd_losses(z, y, pairs=torch.ones(3, 3, dtype=torch.bool), backend="native")),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()


def test_info_reports_the_build() -> None:
    from hdkd_fast import info

    text = info.format_info(info.collect())
    assert "hdkd_fast._C  ahead of time for torch" in text and "[auto -> native]" in text
