"""The ``"triton"`` backend against the independent float64 loop reference.

On machines without CUDA, tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton is imported, so
the kernels run on CPU tensors through the Triton interpreter: shapes stay tiny and the column block is
forced down to 16 (``HDKD_FAST_TRITON_BLOCK_C``) so that C > 16 exercises several column blocks. On a
CUDA machine the same tests run on the GPU and add larger shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton")

import hdkd_fast as hk
from hdkd_fast.backends import get_backend, torch_backend
from hdkd_fast.backends import triton_backend as TB
from tests.support import float64_reference as R

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
RUNNABLE = TB.unavailable_reason(DEVICE) is None
if not RUNNABLE:  # (the offline sm_90 compile is tests/integration/test_triton_aot.py)
    pytest.skip(f"triton backend unavailable here: {TB.unavailable_reason(DEVICE)}", allow_module_level=True)

F64 = {"rtol": 1e-9, "atol": 1e-11}
F32 = {"rtol": 2e-4, "atol": 2e-5}
BIG_C = (1001, 32000) if CUDA else ()


@pytest.fixture(autouse=True)
def small_column_blocks(monkeypatch):
    """Several column blocks even for tiny C (the interpreter is slow on big tiles)."""
    if not CUDA:
        monkeypatch.setenv("HDKD_FAST_TRITON_BLOCK_C", "16")


def draw(k, b, c, *, seed, dtype=torch.float64, ignored=1):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(k, b, c, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    y[torch.randperm(b, generator=g)[:ignored]] = -100
    return z.to(DEVICE), y.to(DEVICE)


def random_mask(k, seed, upper):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(k, k, generator=g) < 0.5) & ~torch.eye(k, dtype=torch.bool)
    if upper:
        m = torch.triu(m, diagonal=1)
    return m


def mask_of(pairs, k):
    return R.masks(k)[pairs] if isinstance(pairs, str) else pairs.tolist()


def ref_losses(z, y, pairs, **opts):
    """The float64 reference on CPU (tiny loops), results moved to the test device."""
    k = z.shape[0]
    ce, kd = R.losses(z.cpu(), None if y is None else y.cpu(), mask=mask_of(pairs, k), **opts)
    return (None if ce is None else ce.to(DEVICE)), kd.to(DEVICE)


# (K, C, T, pairs, reduction): K in {1, 2, 3, 5, 17}, odd C (C > 16 = several blocks), every pair mode
CASES = [
    (1, 7, 2.5, "dense", "mean"),
    (2, 2, 1.0, "last", "sum"),
    (3, 37, 4.0, "dense", "none"),
    (3, 33, 1.0, "adjacent", "mean"),
    (5, 19, 2.5, "random", "none"),
    (5, 50, 4.0, "last", "mean"),
    (17, 21, 2.0, "dense", "mean"),
    (17, 5, 3.0, "random", "none"),
]


@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize(("k", "c", "t", "pairs", "reduction"), CASES)
def test_losses_and_backward_match_reference(k, c, t, pairs, reduction, detach_teacher):
    seed = 1000 * k + 10 * c + int(detach_teacher)
    z, y = draw(k, 3 if k > 5 else 5, c, seed=seed, ignored=1 + k % 2)
    if pairs == "random":
        pairs = random_mask(k, seed, upper=detach_teacher)
    opts = dict(temperature=t, detach_teacher=detach_teacher, ignore_index=-100, reduction=reduction)
    z_lib = z.clone().requires_grad_()
    z_ref = z.cpu().clone().requires_grad_()
    got = hk.dense_kd_losses(z_lib, y, pairs=pairs, backend="triton", **opts)
    want = R.losses(z_ref, y.cpu(), mask=mask_of(pairs, k), **opts)
    assert got.ce.dtype == got.kd.dtype == torch.float64
    assert_close(got.ce.cpu(), want[0].detach(), **F64)
    assert_close(got.kd.cpu(), want[1].detach(), **F64)
    # random cotangents: per-objective weights, and per-row weights [K, B] / [K, K, B] for "none"
    g = torch.Generator().manual_seed(seed + 1)
    cot_ce = torch.randn(got.ce.shape, generator=g, dtype=torch.float64)
    cot_kd = torch.randn(got.kd.shape, generator=g, dtype=torch.float64)
    (grad_lib,) = torch.autograd.grad(
        (got.ce * cot_ce.to(DEVICE)).sum() + (got.kd * cot_kd.to(DEVICE)).sum(), z_lib
    )
    (grad_ref,) = torch.autograd.grad((want[0] * cot_ce).sum() + (want[1] * cot_kd).sum(), z_ref)
    assert_close(grad_lib.cpu(), grad_ref, **F64)


@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize("listed", [False, True])
@pytest.mark.parametrize("with_target", [True, False])
def test_dense_kd_weighted_gradient_from_forward(detach_teacher, listed, with_target):
    k, c = 5, 23
    z, y = draw(k, 7, c, seed=11 + listed, ignored=2)
    y = y if with_target else None
    g = torch.Generator().manual_seed(3)
    ce_w = torch.rand(k, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    kd_w = torch.rand(k, k, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    opts = dict(temperature=2.5, detach_teacher=detach_teacher)
    if listed:
        exits = [t.clone().requires_grad_() for t in z.unbind(0)]
        loss = hk.dense_kd(exits, y, ce_weight=ce_w, kd_weight=kd_w, backend="triton", **opts)
        *gz_list, gce, gkd = torch.autograd.grad(loss, (*exits, ce_w, kd_w))
        gz = torch.stack(gz_list)
    else:
        x = z.clone().requires_grad_()
        loss = hk.dense_kd(x, y, ce_weight=ce_w, kd_weight=kd_w, backend="triton", **opts)
        gz, gce, gkd = torch.autograd.grad(loss, (x, ce_w, kd_w))
    z_ref = z.cpu().clone().requires_grad_()
    yc = None if y is None else y.cpu()
    ref = R.weighted(z_ref, yc, ce_w.detach().cpu(), kd_w.detach().cpu(), mask=R.masks(k)["dense"], **opts)
    (gz_ref,) = torch.autograd.grad(ref, z_ref)
    assert_close(loss.cpu(), ref.detach(), **F64)
    assert_close(gz.cpu(), gz_ref, **F64)
    ce, kd = R.losses(z.cpu(), yc, mask=R.masks(k)["dense"], **opts)
    assert_close(gce.cpu(), ce if ce is not None else torch.zeros(k, dtype=torch.float64), **F64)
    assert_close(gkd.cpu(), kd, **F64)  # the loss vector is the weight gradient


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_backend_direct_per_row_weights_and_loss_only(reduction, detach_teacher):
    """``losses_and_grad`` called directly: per-row weights (as in the backward of reduction="none"),
    per-objective weights, loss-only mode; the torch backend (itself checked against the reference
    in test_dense_kd.py) gives the expected gradient, the reference the expected losses."""
    k, b, c = 4, 4, 21
    z, y = draw(k, b, c, seed=77 + len(reduction), ignored=2)
    mask = hk.pair_mask("dense" if detach_teacher else random_mask(k, 5, upper=False), k,
                        detach_teacher=detach_teacher)
    g = torch.Generator().manual_seed(9)
    weights = [
        (torch.rand(k, generator=g, dtype=torch.float64), torch.rand(k, k, generator=g, dtype=torch.float64)),
        (torch.rand(k, b, generator=g, dtype=torch.float64), torch.rand(k, k, b, generator=g, dtype=torch.float64)),
        (None, torch.rand(k, k, b, generator=g, dtype=torch.float64)),
        (torch.rand(k, b, generator=g, dtype=torch.float64), None),
    ]
    opts = dict(temperature=2.0, mask=mask, detach_teacher=detach_teacher, ignore_index=-100, reduction=reduction)
    want = R.losses(z.cpu(), y.cpu(), mask=[list(r) for r in mask], temperature=2.0,
                    detach_teacher=detach_teacher, reduction=reduction)
    ce, kd, grad = TB.losses_and_grad(z, y, None, None, compute_grad=False, **opts)  # loss only
    assert grad is None
    assert_close(ce.cpu(), want[0], **F64)
    assert_close(kd.cpu(), want[1], **F64)
    for ce_w, kd_w in weights:
        ce_w = None if ce_w is None else ce_w.to(DEVICE)
        kd_w = None if kd_w is None else kd_w.to(DEVICE)
        ce, kd, grad = TB.losses_and_grad(list(z.unbind(0)), y, ce_w, kd_w, compute_grad=True, **opts)
        _, _, grad_torch = torch_backend.losses_and_grad(z, y, ce_w, kd_w, compute_grad=True, **opts)
        assert grad is not None and grad.shape == z.shape and grad.dtype == z.dtype
        assert_close(grad, grad_torch, **F64)
        assert_close(kd.cpu(), want[1], **F64)


@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize(("k", "c", "t", "pairs", "reduction", "with_target"), [
    (1, 7, 2.5, "dense", "mean", True),
    (2, 17, 1.0, "last", "sum", True),
    (3, 40, 4.0, "dense", "none", True),
    (5, 19, 2.5, "random", "mean", False),
    (17, 9, 2.0, "adjacent", "mean", True),
])
def test_jvp_matches_reference(k, c, t, pairs, reduction, with_target, detach_teacher):
    seed = 31 * k + c + int(detach_teacher)
    z, y = draw(k, 5, c, seed=seed, ignored=2)
    y = y if with_target else None
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64).to(DEVICE)
    if pairs == "random":
        pairs = random_mask(k, seed, upper=detach_teacher)
    opts = dict(temperature=t, detach_teacher=detach_teacher, reduction=reduction)
    yc = None if y is None else y.cpu()

    def lib(x):
        out = hk.dense_kd_losses(x, y, pairs=pairs, backend="triton", **opts)
        return (out.kd,) if y is None else (out.kd, out.ce)

    def ref(x):
        ce, kd = R.losses(x, yc, mask=mask_of(pairs, k), **opts)
        return (kd,) if yc is None else (kd, ce)

    _, tan = torch.func.jvp(lib, (z,), (dz,))
    _, tan_ref = torch.func.jvp(ref, (z.cpu(),), (dz.cpu(),))
    assert len(tan) == len(tan_ref)
    for got, want in zip(tan, tan_ref, strict=True):
        assert_close(got.cpu(), want, **F64)


def test_jvp_direct_listed_tangents():
    k, c = 3, 21
    z, y = draw(k, 4, c, seed=4)
    dz = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = hk.pair_mask("dense", k)
    opts = dict(temperature=3.0, mask=mask, detach_teacher=True, ignore_index=-100, reduction="none")
    got = TB.jvp(list(z.unbind(0)), list(dz.unbind(0)), y, **opts)
    want = torch_backend.jvp(z, dz, y, **opts)
    assert_close(got[0], want[0], **F64)
    assert_close(got[1], want[1], **F64)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 2e-5)])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol, detach_teacher):
    k, c = 3, 45
    z, y = draw(k, 7, c, seed=9, dtype=dtype)
    x = [t.clone().requires_grad_() for t in z.unbind(0)]
    got = hk.dense_kd_losses(x, y, temperature=2.5, detach_teacher=detach_teacher, backend="triton")
    assert got.ce.dtype == torch.float32 and got.kd.dtype == torch.float32
    z64 = z.double().cpu().requires_grad_()
    want = R.losses(z64, y.cpu(), temperature=2.5, mask=R.masks(k)["dense"], detach_teacher=detach_teacher)
    assert_close(got.ce.double().cpu(), want[0].detach(), rtol=tol, atol=tol)
    assert_close(got.kd.double().cpu(), want[1].detach(), rtol=tol, atol=tol)
    loss = hk.dense_kd(x, y, temperature=2.5, detach_teacher=detach_teacher, backend="triton")
    g = torch.stack(torch.autograd.grad(loss, x))
    assert g.dtype == dtype
    (g_ref,) = torch.autograd.grad(want[0].sum() + want[1].sum(), z64)
    assert_close(g.double().cpu(), g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())
    # forward mode in low precision too (tangents in the input dtype)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    _, tan = torch.func.jvp(lambda a: hk.dense_kd_losses(a, y, temperature=2.5, backend="triton").kd, (z,), (dz,))
    _, tan_ref = torch.func.jvp(lambda a: R.losses(a, y.cpu(), temperature=2.5, mask=R.masks(k)["dense"])[1],
                                (z.double().cpu(),), (dz.double().cpu(),))
    assert_close(tan.double().cpu(), tan_ref, rtol=10 * tol, atol=10 * tol * tan_ref.abs().max().item())


@pytest.mark.parametrize("c", [2, 300, *BIG_C])
def test_default_block_size_and_extreme_c(monkeypatch, c):
    """The launcher's own block size (no override), C = 2 (one tiny block) to C above one block."""
    monkeypatch.delenv("HDKD_FAST_TRITON_BLOCK_C", raising=False)
    z, y = draw(3, 3, c, seed=c, dtype=torch.float32)
    x = z.clone().requires_grad_()
    got = hk.dense_kd_losses(x, y, temperature=2.0, backend="triton")
    want = ref_losses(z, y, "dense", temperature=2.0)
    assert_close(got.ce.double(), want[0], **F32)
    assert_close(got.kd.double(), want[1], **F32)
    loss = hk.dense_kd(x, y, temperature=2.0, backend="triton")
    (g,) = torch.autograd.grad(loss, x)
    (g_t,) = torch.autograd.grad(hk.dense_kd(x, y, temperature=2.0, backend="torch"), x)
    assert_close(g, g_t, **F32)


def test_k33_padded_to_64():
    k, c = 33, 5
    z, y = draw(k, 2, c, seed=33)
    got = hk.dense_kd_losses(z, y, pairs="last", temperature=2.0, backend="triton")
    want = torch_backend.losses_and_grad(z, y, None, None, temperature=2.0, mask=hk.pair_mask("last", k),
                                         detach_teacher=True, ignore_index=-100, reduction="mean",
                                         compute_grad=False)
    assert_close(got.ce, want[0], **F64)
    assert_close(got.kd, want[1], **F64)


def test_strided_exits_without_copy():
    """Exits that are views with different row strides / offsets (and a non-contiguous stack)."""
    k, b, c = 3, 5, 19
    z, y = draw(k, b, c, seed=12)
    big = torch.zeros(b, 3 * c + 4, dtype=torch.float64, device=DEVICE)
    big[:, 2:2 + c] = z[0]
    other = torch.zeros(2 * b, c + 1, dtype=torch.float64, device=DEVICE)
    other[::2, 1:] = z[2]
    exits = [big[:, 2:2 + c], z[1].clone(), other[::2, 1:]]
    want = torch_backend.losses_and_grad(z, y, None, None, temperature=2.0, mask=hk.pair_mask("dense", k),
                                         detach_teacher=True, ignore_index=-100, reduction="none",
                                         compute_grad=False)
    got = hk.dense_kd_losses(exits, y, temperature=2.0, reduction="none", backend="triton")
    assert_close(got.ce, want[0], **F64)
    assert_close(got.kd, want[1], **F64)
    transposed = z.transpose(0, 1).contiguous().transpose(0, 1)  # [K, B, C] with stride(0) = C
    got = hk.dense_kd_losses(transposed, y, temperature=2.0, reduction="none", backend="triton")
    assert_close(got.kd, want[1], **F64)


def test_ignore_index_rows():
    z, y = draw(3, 5, 7, seed=1, ignored=0)
    y[:] = -100
    x = z.clone().requires_grad_()
    out = hk.dense_kd_losses(x, y, backend="triton")
    assert torch.equal(out.ce, torch.zeros(3, dtype=torch.float64, device=DEVICE))
    loss = hk.dense_kd(x, y, backend="triton")
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()
    assert_close(loss, out.kd.sum(), **F64)
    y2 = y.clone()
    y2[:] = torch.tensor([0, 7, 3, 7, 6])
    out = hk.dense_kd_losses(z, y2, ignore_index=7, backend="triton")
    want = ref_losses(z, y2, "dense", temperature=4.0, ignore_index=7)
    assert_close(out.ce, want[0], **F64)


def test_torch_func_grad_and_vmap():
    k, c = 3, 17
    z, y = draw(k, 4, c, seed=21)
    opts = dict(temperature=2.5, detach_teacher=False)

    def ref_sum(x):
        ce, kd = R.losses(x, y.cpu(), mask=R.masks(k)["dense"], **opts)
        return ce.sum() + kd.sum()

    g = torch.func.grad(lambda x: hk.dense_kd(x, y, backend="triton", **opts))(z)
    assert_close(g.cpu(), torch.func.grad(ref_sum)(z.cpu()), **F64)
    zs = torch.stack([z, z.flip(-1)], dim=1)  # [K, 2, B, C]
    got = torch.vmap(lambda a: hk.dense_kd(a, y, backend="triton", **opts), in_dims=1)(zs)
    want = torch.stack([ref_sum(zs[:, n].cpu()) for n in range(2)])
    assert_close(got.cpu(), want, **F64)


def test_torch_compile_fullgraph():
    k, c = 3, 17
    z, y = draw(k, 4, c, seed=22, dtype=torch.float32)

    def fn(x):
        return hk.dense_kd(x, y, temperature=2.0, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    x = z.clone().requires_grad_()
    loss = compiled(x)
    (g,) = torch.autograd.grad(loss, x)
    x2 = z.clone().requires_grad_()
    loss_t = hk.dense_kd(x2, y, temperature=2.0, backend="torch")
    (g_t,) = torch.autograd.grad(loss_t, x2)
    assert_close(loss, loss_t, **F32)
    assert_close(g, g_t, **F32)


def test_availability(monkeypatch):
    assert TB.NAME == "triton"
    assert get_backend("triton") is TB
    assert TB.unavailable_reason(torch.device("meta")) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert TB.unavailable_reason(torch.device("cpu")) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TB.unavailable_reason(torch.device("cpu")) is None
    if CUDA:
        assert TB.unavailable_reason(torch.device("cuda")) is None
        assert hk.available_backends("cuda")[0] == "triton"


@pytest.mark.skipif(not CUDA or os.environ.get("HDKD_FAST_HUGE") != "1", reason="GPU + HDKD_FAST_HUGE=1 only")
def test_int64_offsets_huge_batch():
    """B * C > 2**31 elements (K = 2 exits in bf16, ~9 GB): the int64 offsets of the exit table."""
    b, c = 17000, 128000
    z = torch.randn(2, b, c, device="cuda", dtype=torch.bfloat16)
    got = hk.dense_kd_losses(z, None, temperature=2.0, reduction="none", backend="triton").kd[0, 1]
    rows = torch.tensor([0, b // 2, b - 1], device="cuda")
    small = z[:, rows].float()
    want = torch_backend.losses_and_grad(small, None, None, None, temperature=2.0, mask=hk.pair_mask("dense", 2),
                                         detach_teacher=True, ignore_index=-100, reduction="none",
                                         compute_grad=False)[1][0, 1]
    assert_close(got[rows], want, rtol=1e-4, atol=1e-4)
