"""dense_kd_losses / dense_kd / DenseKD against the independent float64 loop reference."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zlib

import pytest
import torch
from torch.testing import assert_close

import hdkd_fast as hk
from hdkd_fast._validation import (
    TEMPERATURE_RANGE,
    check_count,
    check_int,
    check_positive_int,
    check_real,
    is_int,
    is_real,
)
from tests.support import float64_reference as R

F64 = {"rtol": 1e-10, "atol": 1e-12}
K_VALUES = (1, 2, 3, 5, 9)
C_VALUES = (2, 7, 100, 1001)
T_VALUES = (1.0, 2.5, 4.0)


def draw(k: int, b: int, c: int, *, seed: int, dtype: torch.dtype = torch.float64, ignored: int = 1):
    """Fresh random logits (scaled so softmaxes are far from uniform) and labels with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(k, b, c, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    y[torch.randperm(b, generator=g)[:ignored]] = -100
    return z, y


def stable_seed(*case: object) -> int:
    """A seed per test case, stable across processes (unlike hash()), so a failure reproduces."""
    return zlib.crc32(repr(case).encode())


def random_mask(k: int, seed: int, upper: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(k, k, generator=g) < 0.5
    m &= ~torch.eye(k, dtype=torch.bool)
    return torch.triu(m, diagonal=1) if upper else m


def mask_of(pairs, k: int) -> list[list[bool]]:
    return R.masks(k)[pairs] if isinstance(pairs, str) else pairs.tolist()


CASES = [
    (k, pairs, reduction, C_VALUES[n % 4], T_VALUES[n % 3])
    for n, (k, pairs, reduction) in enumerate(
        itertools.product(K_VALUES, ("dense", "last", "adjacent", "random"), ("mean", "sum", "none"))
    )
]


@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize(("k", "pairs", "reduction", "c", "t"), CASES)
def test_losses_and_gradients_match_float64_reference(k, pairs, reduction, c, t, detach_teacher, backend,
                                                      max_classes):
    seed = stable_seed(k, pairs, reduction, c, t, detach_teacher)
    c = min(c, max_classes or c)
    z, y = draw(k, 5, c, seed=seed)
    if pairs == "random":
        pairs = random_mask(k, seed, upper=detach_teacher)
    opts = dict(temperature=t, detach_teacher=detach_teacher, ignore_index=-100, reduction=reduction)
    z_lib = z.clone().requires_grad_()
    z_ref = z.clone().requires_grad_()
    got = hk.dense_kd_losses(z_lib, y, pairs=pairs, backend=backend, **opts)
    want = R.losses(z_ref, y, mask=mask_of(pairs, k), **opts)
    assert_close(got.ce, want[0], **F64)
    assert_close(got.kd, want[1], **F64)
    # reverse mode with random cotangents (per-row weights in backward for reduction="none")
    g = torch.Generator().manual_seed(seed + 1)
    cot_ce = torch.randn(got.ce.shape, generator=g, dtype=torch.float64)
    cot_kd = torch.randn(got.kd.shape, generator=g, dtype=torch.float64)
    (grad_lib,) = torch.autograd.grad((got.ce * cot_ce).sum() + (got.kd * cot_kd).sum(), z_lib)
    (grad_ref,) = torch.autograd.grad((want[0] * cot_ce).sum() + (want[1] * cot_kd).sum(), z_ref)
    assert_close(grad_lib, grad_ref, **F64)


@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize(("k", "c", "t", "pairs"), [(1, 7, 2.5, "dense"), (3, 2, 1.0, "last"), (5, 100, 4.0, "dense"),
                                                     (9, 1001, 2.5, "adjacent"), (4, 33, 4.0, "random")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_jvp_matches_float64_reference(k, c, t, pairs, detach_teacher, reduction, backend, max_classes):
    seed = stable_seed(k, c, t, pairs, detach_teacher, reduction)
    c = min(c, max_classes or c)
    z, y = draw(k, 7, c, seed=seed, ignored=2)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    if pairs == "random":
        pairs = random_mask(k, seed, upper=detach_teacher)
    opts = dict(temperature=t, detach_teacher=detach_teacher, reduction=reduction)
    fn = lambda x: tuple(hk.dense_kd_losses(x, y, pairs=pairs, backend=backend, **opts))  # noqa: E731
    _, tan = torch.func.jvp(fn, (z,), (dz,))
    _, tan_ref = torch.func.jvp(lambda x: R.losses(x, y, mask=mask_of(pairs, k), **opts), (z,), (dz,))
    assert_close(tan[0], tan_ref[0], **F64)
    assert_close(tan[1], tan_ref[1], **F64)


@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize("with_target", [True, False])
def test_weighted_loss_gradients_and_weight_gradients(detach_teacher, with_target, backend):
    k, c = 5, 13
    z, y = draw(k, 9, c, seed=11)
    y = y if with_target else None
    g = torch.Generator().manual_seed(3)
    ce_w = torch.rand(k, generator=g, dtype=torch.float64).requires_grad_()
    kd_w = torch.rand(k, k, generator=g, dtype=torch.float64).requires_grad_()
    z_lib, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    opts = dict(temperature=2.5, detach_teacher=detach_teacher)
    loss = hk.dense_kd(z_lib, y, ce_weight=ce_w, kd_weight=kd_w, backend=backend, **opts)
    ref = R.weighted(z_ref, y, ce_w.detach(), kd_w.detach(), mask=R.masks(k)["dense"], **opts)
    assert_close(loss, ref, **F64)
    gz, gce, gkd = torch.autograd.grad(loss, (z_lib, ce_w, kd_w))
    (gz_ref,) = torch.autograd.grad(ref, z_ref)
    assert_close(gz, gz_ref, **F64)
    ce, kd = R.losses(z, y, mask=R.masks(k)["dense"], **opts)
    assert_close(gce, ce if ce is not None else torch.zeros(k, dtype=torch.float64), **F64)
    assert_close(gkd, kd, **F64)  # the loss vector is the weight gradient


def test_list_and_stacked_inputs_agree():
    z, y = draw(4, 7, 11, seed=5)
    stacked = z.clone().requires_grad_()
    listed = [t.clone().requires_grad_() for t in z.unbind(0)]
    a = hk.dense_kd(stacked, y, detach_teacher=False)
    b = hk.dense_kd(listed, y, detach_teacher=False)
    assert_close(a, b, **F64)
    (ga,) = torch.autograd.grad(a, stacked)
    gb = torch.autograd.grad(b, listed)
    assert_close(ga, torch.stack(gb), **F64)
    la, lb = hk.dense_kd_losses(stacked, y, reduction="none"), hk.dense_kd_losses(tuple(listed), y, reduction="none")
    assert_close(la.kd, lb.kd, **F64)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol, detach_teacher):
    z, y = draw(3, 7, 1001, seed=9, dtype=dtype)
    x = z.clone().requires_grad_()
    got = hk.dense_kd_losses(x, y, temperature=2.5, detach_teacher=detach_teacher)
    assert got.ce.dtype == torch.float32 and got.kd.dtype == torch.float32
    z64 = z.double().requires_grad_()
    want = R.losses(z64, y, temperature=2.5, mask=R.masks(3)["dense"], detach_teacher=detach_teacher)
    assert_close(got.ce.double(), want[0], rtol=tol, atol=tol)
    assert_close(got.kd.double(), want[1], rtol=tol, atol=tol)
    loss = hk.dense_kd(x, y, temperature=2.5, detach_teacher=detach_teacher)
    (g,) = torch.autograd.grad(loss, x)
    assert g.dtype == dtype
    (g_ref,) = torch.autograd.grad(want[0].sum() + want[1].sum(), z64)
    assert_close(g.double(), g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


def test_all_ignored_batch_gives_zero_ce_not_nan():
    z, y = draw(3, 5, 7, seed=1, ignored=0)
    y[:] = -100
    x = z.clone().requires_grad_()
    out = hk.dense_kd_losses(x, y)
    assert torch.equal(out.ce, torch.zeros(3, dtype=torch.float64))
    loss = hk.dense_kd(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()
    assert_close(loss, out.kd.sum(), **F64)


def test_custom_ignore_index():
    z, y = draw(2, 6, 5, seed=2, ignored=0)
    y[1] = 7
    out = hk.dense_kd_losses(z, y, ignore_index=7)
    want = R.losses(z, y, temperature=4.0, mask=R.masks(2)["dense"], ignore_index=7)
    assert_close(out.ce, want[0], **F64)


def test_func_grad_vmap_and_double_backward():
    k, c = 4, 9
    z, y = draw(k, 5, c, seed=21)
    opts = dict(temperature=2.5, detach_teacher=False)
    ref = lambda x: R.losses(x, y, mask=R.masks(k)["dense"], **opts)  # noqa: E731
    ref_sum = lambda x: ref(x)[0].sum() + ref(x)[1].sum()  # noqa: E731
    # torch.func.grad
    g = torch.func.grad(lambda x: hk.dense_kd(x, y, **opts))(z)
    assert_close(g, torch.func.grad(ref_sum)(z), **F64)
    # second derivatives: grad of a function of the gradient, and Hessian-vector products
    v = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    hv = torch.func.grad(lambda x: (torch.func.grad(lambda u: hk.dense_kd(u, y, **opts))(x) * v).sum())(z)
    hv_ref = torch.func.grad(lambda x: (torch.func.grad(ref_sum)(x) * v).sum())(z)
    assert_close(hv, hv_ref, **F64)
    x = z.clone().requires_grad_()
    (gx,) = torch.autograd.grad(hk.dense_kd(x, y, **opts), x, create_graph=True)
    (hx,) = torch.autograd.grad((gx * v).sum(), x)
    assert_close(hx, hv_ref, **F64)
    # vmap over a batch of independent problems (logits and labels both batched)
    zs = torch.stack([draw(k, 5, c, seed=30 + n)[0] for n in range(3)], dim=1)  # [K, N, B, C]
    ys = torch.stack([draw(k, 5, c, seed=30 + n)[1] for n in range(3)])
    got = torch.vmap(lambda a, b: hk.dense_kd(a, b, **opts), in_dims=(1, 0))(zs, ys)
    want = torch.stack([R.weighted(zs[:, n], ys[n], torch.ones(k), torch.ones(k, k), mask=R.masks(k)["dense"], **opts)
                        for n in range(3)])
    assert_close(got, want, **F64)
    # per-sample gradients: grad inside vmap
    pg = torch.vmap(torch.func.grad(lambda a, b: hk.dense_kd(a, b, **opts)), in_dims=(1, 0))(zs, ys)
    assert_close(pg[1], torch.func.grad(lambda a: R.weighted(a, ys[1], torch.ones(k), torch.ones(k, k),
                                                             mask=R.masks(k)["dense"], **opts))(zs[:, 1]), **F64)


def test_gradcheck_and_gradgradcheck_with_weights():
    z, y = draw(3, 4, 5, seed=8)
    x = z.clone().requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    wk = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c: hk.dense_kd(a, y, ce_weight=b, kd_weight=c, detach_teacher=False, temperature=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, wk), check_forward_ad=True, check_batched_grad=False)
    assert torch.autograd.gradgradcheck(fn, (x, w, wk))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    z, y = draw(4, 6, 10, seed=12, dtype=torch.float32)
    compiled = torch.compile(lambda a, b: hk.dense_kd(a, b, temperature=2.5), fullgraph=True)
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, b = compiled(x1, y), hk.dense_kd(x2, y, temperature=2.5)
    assert_close(a, b, rtol=1e-6, atol=1e-6)
    a.backward()
    b.backward()
    assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-7)
    losses = torch.compile(lambda a, b: hk.dense_kd_losses(a, b).kd.sum(), fullgraph=True)(z, y)
    assert_close(losses, hk.dense_kd_losses(z, y).kd.sum(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_fullgraph_in_a_fresh_process():
    """The first call of a fresh process compiles too (no backend import left for Dynamo to trace)."""
    code = (
        "import torch, hdkd_fast as hk\n"
        "x = torch.randn(3, 5, 7, requires_grad=True); y = torch.randint(0, 7, (5,))\n"
        "f = torch.compile(lambda a, b: hk.dense_kd(a, b), fullgraph=True, backend='aot_eager')\n"
        "torch.testing.assert_close(f(x, y), hk.dense_kd(x, y))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("weights", ["floats", "tensors", "loss_weights"])
def test_reference_module_and_fused_module_agree(weights):
    k = 4
    z, y = draw(k, 7, 21, seed=13, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ce_w, kd_w = torch.rand(k, generator=g), torch.rand(k, k, generator=g)
    kwargs = {"floats": dict(ce_weight=0.5, kd_weight=2.0), "tensors": dict(ce_weight=ce_w, kd_weight=kd_w),
              "loss_weights": {}}[weights]
    call = dict(weights=hk.LossWeights(ce_w, kd_w)) if weights == "loss_weights" else {}
    fused, readable = hk.DenseKD(k, temperature=3.0, **kwargs), hk.reference.DenseKD(k, temperature=3.0, **kwargs)
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, b = fused(x1, y, **call), readable(x2, y, **call)
    assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.backward()
    b.backward()
    assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_module_moves_tensor_weights_and_checks_num_exits():
    m = hk.DenseKD(3, ce_weight=torch.ones(3), kd_weight=torch.ones(3, 3))
    assert set(dict(m.named_buffers())) == {"ce_weight", "kd_weight"}
    m = m.double()
    assert m.ce_weight.dtype == torch.float64
    with pytest.raises(ValueError, match="num_exits"):
        m(torch.randn(4, 2, 5, dtype=torch.float64))


def test_loss_only_path_skips_the_gradient(monkeypatch):
    from hdkd_fast.backends import torch_backend

    seen: list[bool] = []
    original = torch_backend.losses_and_grad

    def spy(*args, **kwargs):
        seen.append(kwargs["compute_grad"])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "losses_and_grad", spy)
    z, y = draw(3, 5, 7, seed=4)
    with torch.no_grad():
        hk.dense_kd(z.clone().requires_grad_(), y, backend="torch")
    hk.dense_kd(z, y, backend="torch")  # nothing requires grad
    x = z.clone().requires_grad_()
    loss = hk.dense_kd(x, y, backend="torch")
    loss.backward()  # the kept gradient is scaled: no second backend call
    assert seen == [False, False, True]


def test_available_backends_and_dispatch_errors(monkeypatch):
    from hdkd_fast import backends

    assert "torch" in hk.available_backends("cpu")
    assert hk.available_backends("cpu")[-1] == "torch"
    z, y = draw(2, 3, 4, seed=0)
    with pytest.raises(ValueError, match="backend"):
        hk.dense_kd(z, y, backend="cuda-magic")
    for name, hint in (("triton", "pip install"), ("native", "hdkd-fast build")):  # as if not installed
        monkeypatch.setitem(backends._modules, name, None)
        with pytest.raises(RuntimeError, match=rf"backend '{name}' is not available.*{hint}"):
            hk.dense_kd(z, y, backend=name)
    assert hk.available_backends("cpu") == ["torch"]


BAD_INPUTS = [
    (lambda z, y: hk.dense_kd(z[0], y), ValueError, "logits"),  # wrong rank
    (lambda z, y: hk.dense_kd([], y), ValueError, "logits"),  # K < 1
    (lambda z, y: hk.dense_kd(z[:, :, :0], y), ValueError, "logits"),
    (lambda z, y: hk.dense_kd([z[0], z[1, :, :3]], y), ValueError, r"logits\[1\]"),  # C mismatch
    (lambda z, y: hk.dense_kd([z[0], z[1, :2]], y), ValueError, r"logits\[1\]"),  # B mismatch
    (lambda z, y: hk.dense_kd([z[0], z[1].float()], y), TypeError, r"logits\[1\]"),  # dtype mismatch
    (lambda z, y: hk.dense_kd([z[0], z[1].to("meta")], y), ValueError, r"logits\[1\]"),  # device mismatch
    (lambda z, y: hk.dense_kd(z.long(), y), TypeError, "logits"),
    (lambda z, y: hk.dense_kd(z, y.to("meta")), ValueError, "target"),
    (lambda z, y: hk.dense_kd(z, y.double()), TypeError, "target"),
    (lambda z, y: hk.dense_kd(z, y[:2]), ValueError, "target"),
    (lambda z, y: hk.dense_kd(z, torch.full_like(y, 4)), ValueError, "target"),  # label == C
    (lambda z, y: hk.dense_kd(z, torch.full_like(y, -3)), ValueError, "target"),
    (lambda z, y: hk.dense_kd(z, y, temperature=0.0), ValueError, "temperature"),
    (lambda z, y: hk.dense_kd(z, y, temperature=-1.0), ValueError, "temperature"),
    (lambda z, y: hk.dense_kd(z, y, temperature=float("nan")), ValueError, "temperature"),
    (lambda z, y: hk.dense_kd(z, y, temperature=float("inf")), ValueError, "temperature"),
    (lambda z, y: hk.dense_kd(z, y, temperature="4"), TypeError, "temperature"),
    (lambda z, y: hk.dense_kd(z, y, temperature=1e-9), ValueError, "temperature"),  # below TEMPERATURE_RANGE
    (lambda z, y: hk.dense_kd(z, y, temperature=1e20), ValueError, "temperature"),  # T² overflows float32
    (lambda z, y: hk.dense_kd(z, torch.full_like(y, 156).to(torch.uint8)), ValueError, "target"),  # not -100
    (lambda z, y: hk.dense_kd(z, y, ce_weight=torch.ones(2)), ValueError, "ce_weight"),
    (lambda z, y: hk.dense_kd(z, y, kd_weight=torch.ones(3)), ValueError, "kd_weight"),
    (lambda z, y: hk.dense_kd(z, y, kd_weight=torch.ones(3, 3).long()), TypeError, "kd_weight"),
    (lambda z, y: hk.dense_kd(z, y, ce_weight=float("nan")), ValueError, "ce_weight"),
    (lambda z, y: hk.dense_kd(z, y, pairs="all"), ValueError, "pairs"),
    (lambda z, y: hk.dense_kd(z, y, pairs=torch.ones(2, 2, dtype=torch.bool)), ValueError, "pairs"),
    (lambda z, y: hk.dense_kd(z, y, pairs=torch.ones(3, 3)), TypeError, "pairs"),
    (lambda z, y: hk.dense_kd(z, y, pairs=torch.eye(3, dtype=torch.bool)), ValueError, "pairs"),
    (lambda z, y: hk.dense_kd(z, y, pairs=torch.ones(3, 3, dtype=torch.bool).tril(-1)), ValueError, "detach_teacher"),
    (lambda z, y: hk.dense_kd_losses(z, y, reduction="avg"), ValueError, "reduction"),
    (lambda z, y: hk.dense_kd_losses(z, y, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda z, y: hk.dense_kd_losses("logits", y), TypeError, "logits"),
    (lambda z, y: hk.DenseKD(num_exits=0), ValueError, "num_exits"),
    (lambda z, y: hk.DenseKD(backend="fast"), ValueError, "backend"),
]


@pytest.mark.parametrize(("call", "error", "name"), BAD_INPUTS)
def test_bad_input_raises_an_error_naming_the_argument(call, error, name):
    z, y = draw(3, 5, 4, seed=0, ignored=0)
    with pytest.raises(error, match=name):
        call(z, y)


def test_shared_number_checks_refuse_bools_and_name_the_argument():
    """The int and real checks of every module (hdkd_fast._validation): a bool is neither."""
    assert [is_int(v) for v in (3, -1, True, 3.0, "3")] == [True, True, False, False, False]
    assert [is_real(v) for v in (3, 2.5, True, "3")] == [True, True, False, False]
    with pytest.raises(TypeError, match=r"^seed must be an int; got bool$"):
        check_int(True, "seed")
    with pytest.raises(TypeError, match=r"^image_size must be an int or None; got float$"):
        check_int(2.0, "image_size", "an int or None")
    with pytest.raises(ValueError, match=r"^epoch must be >= 0; got -1$"):
        check_count(-1, "epoch", minimum=0)
    with pytest.raises(ValueError, match=r"^num_exits must be a positive int or None; got True$"):
        hk.DenseKD(num_exits=True)
    with pytest.raises(ValueError, match=r"^size must be a positive int; got '2'$"):
        check_positive_int("2", "size")
    with pytest.raises(TypeError, match=r"^scale must be a real number; got bool$"):
        check_real(False, "scale")
    assert (check_count(3, "k"), check_positive_int(2, "k"), check_real(3, "x")) == (3, 2, 3.0)


def test_mutual_learning_mask_allowed_without_detach():
    k = 3
    mask = torch.ones(k, k, dtype=torch.bool) & ~torch.eye(k, dtype=torch.bool)
    z, y = draw(k, 5, 6, seed=3)
    got = hk.dense_kd_losses(z, y, pairs=mask, detach_teacher=False)
    want = R.losses(z, y, temperature=4.0, mask=mask.tolist(), detach_teacher=False)
    assert_close(got.kd, want[1], **F64)


def test_first_order_func_grad_uses_the_kept_gradient(monkeypatch):
    """torch.func.grad runs backward with grad mode on; it must still scale the kept gradient
    rather than recompute it (the recomputation is reserved for real second derivatives)."""
    from hdkd_fast.backends import torch_backend

    calls: list[bool] = []
    original = torch_backend.losses_and_grad
    monkeypatch.setattr(torch_backend, "losses_and_grad",
                        lambda *a, **kw: calls.append(kw["compute_grad"]) or original(*a, **kw))
    z, y = draw(3, 5, 7, seed=6)
    torch.func.grad(lambda x: hk.dense_kd(x, y, backend="torch"))(z)
    assert calls == [True]


@pytest.mark.parametrize("detach_teacher", [False, True])
def test_hessian_forward_over_reverse_matches_reference(detach_teacher):
    """Second derivatives as autograd defines them; with a detached teacher no derivative flows through
    the teacher's softmax (before, the gradient map differentiated it: off by up to 0.05 here)."""
    k, c = 3, 4
    z, y = draw(k, 3, c, seed=17)
    opts = dict(temperature=2.5, detach_teacher=detach_teacher)
    h = torch.func.hessian(lambda x: hk.dense_kd(x, y, **opts))(z)
    h_ref = torch.func.hessian(lambda x: R.weighted(x, y, torch.ones(k), torch.ones(k, k),
                                                    mask=R.masks(k)["dense"], **opts))(z)
    assert_close(h, h_ref, **F64)


# ---- masked classes and extreme values: every backend that runs here, Triton under the interpreter ----

NEG_INF = float("-inf")
TOL = {torch.float64: F64, torch.float32: {"rtol": 2e-5, "atol": 2e-5}}


def masked_draw(k: int, b: int, c: int, *, seed: int, dtype: torch.dtype, exits: list[int]):
    """Random logits whose exits ``exits`` have about half the classes of each row at ``-inf`` (row 0:
    the first 18, a whole Triton block and more), labels on classes left finite, row 1 ignored (its
    placeholder class 0 masked). Returns ``(z, y, masked [B, C])``."""
    z, y = draw(k, b, c, seed=seed, ignored=0)
    g = torch.Generator().manual_seed(seed + 7)
    masked = torch.rand(b, c, generator=g) < 0.5
    masked[0, :18] = True
    masked[:, -1] = False
    masked[1, 0] = True
    y = torch.multinomial((~masked).double(), 1, generator=g).squeeze(1)
    y[1] = -100
    for e in exits:
        z[e][masked] = NEG_INF
    return z.to(dtype), y, masked


def _objectives(backend: str, pairs, opts: dict):
    return lambda x, y: tuple(hk.dense_kd_losses(x, y, pairs=pairs, backend=backend, **opts))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize("where", ["every exit", "teacher only"])
def test_masked_classes_follow_zero_log_zero(backend, where, detach_teacher, dtype):
    """-inf logits in every exit, or only in the last exit (a teacher, never a student, of the dense
    pairs): every loss, gradient (random cotangents) and JVP is finite and matches the reference."""
    k, b, c = 3, 4, 37
    z, y, _ = masked_draw(k, b, c, seed=stable_seed(where, detach_teacher), dtype=dtype,
                          exits=list(range(k)) if where == "every exit" else [k - 1])
    opts = dict(temperature=2.5, detach_teacher=detach_teacher, reduction="mean")
    fn = _objectives(backend, "dense", opts)
    ref = lambda x: R.losses(x, y, mask=R.masks(k)["dense"], **opts)  # noqa: E731
    x, x64 = z.clone().requires_grad_(), z.double().requires_grad_()
    got, want = fn(x, y), ref(x64)
    for a, w in zip(got, want, strict=True):
        assert torch.isfinite(w).all()
        assert_close(a.double(), w.detach(), **TOL[dtype])
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    (grad,) = torch.autograd.grad(got, x, [t.to(a.dtype) for a, t in zip(got, cots, strict=True)])
    (grad_ref,) = torch.autograd.grad(want, x64, cots)
    assert torch.isfinite(grad_ref).all()
    assert_close(grad.double(), grad_ref, **TOL[dtype])
    dz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    _, tan = torch.func.jvp(lambda v: fn(v, y), (z,), (dz.to(dtype),))
    _, tan_ref = torch.func.jvp(ref, (z.double(),), (dz,))
    for a, w in zip(tan, tan_ref, strict=True):
        assert torch.isfinite(w).all()
        assert_close(a.double(), w, **TOL[dtype])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_torch_backend_pays_for_masked_classes_only_where_they_are(monkeypatch, detach_teacher, temperature):
    """The "torch" backend's -inf handling (mask, where, a second batched matmul) runs only when some
    log-probability is -inf: on finite logits the short path gives exactly the results of the forced
    full path (losses, gradient, JVP); one -inf in one row of one exit takes the full path and matches
    the float64 reference; inside torch.compile and functorch transforms (no host branch there) the full
    path is always taken, so masked logits stay right there too."""
    from hdkd_fast.backends import torch_backend

    k, b, c = 3, 5, 11
    z, y = draw(k, b, c, seed=stable_seed("short path", detach_teacher, temperature))
    opts = dict(temperature=temperature, detach_teacher=detach_teacher, backend="torch")
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(x: torch.Tensor):
        x = x.clone().requires_grad_()
        loss = hk.dense_kd(x, y, kd_weight=0.6, **opts)
        (grad,) = torch.autograd.grad(loss, x)
        tangents = torch.func.jvp(lambda v: tuple(hk.dense_kd_losses(v, y, **opts)), (x.detach(),), (dz,))[1]
        return loss.detach(), grad, *tangents

    taken: list[bool] = []
    may_hold = torch_backend._may_hold_neginf
    monkeypatch.setattr(torch_backend, "_may_hold_neginf", lambda raw: taken.append(may_hold(raw)) or taken[-1])
    short = run(z)
    assert taken and not any(taken)
    monkeypatch.setattr(torch_backend, "_may_hold_neginf", lambda raw: True)
    for a, w in zip(short, run(z), strict=True):
        assert torch.equal(a, w)

    monkeypatch.setattr(torch_backend, "_may_hold_neginf", lambda raw: taken.append(may_hold(raw)) or taken[-1])
    masked = z.clone()
    masked[0, 2, 4] = NEG_INF  # exit 0 is a student only: KL(p_j || p_0) = +inf on row 2
    taken.clear()
    got = hk.dense_kd_losses(masked, y, temperature=temperature, detach_teacher=detach_teacher, backend="torch",
                             reduction="none")
    assert taken and all(taken)
    want = R.losses(masked, y, temperature=temperature, detach_teacher=detach_teacher, reduction="none",
                    mask=R.masks(k)["dense"])
    assert torch.isposinf(got.kd[0, 1:, 2]).all()
    assert_close(got.ce, want[0], **F64)
    assert_close(got.kd, want[1], **F64)

    teacher_masked = z.clone()
    teacher_masked[-1, 1, 3] = NEG_INF  # the last exit is a teacher only: every objective finite
    hess = torch.func.hessian(lambda x: hk.dense_kd(x, y, **opts))(teacher_masked)
    hess_ref = torch.func.hessian(lambda x: R.weighted(x, y, torch.ones(k), torch.ones(k, k),
                                                       mask=R.masks(k)["dense"], temperature=temperature,
                                                       detach_teacher=detach_teacher))(teacher_masked)
    assert torch.isfinite(hess_ref).all()
    assert_close(hess, hess_ref, **F64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: tuple(hk.dense_kd_losses(x, y, **opts)), fullgraph=True, backend="aot_eager")
    for a, w in zip(compiled(masked), hk.dense_kd_losses(masked, y, **opts), strict=True):
        assert_close(a, w, **F64)


@pytest.mark.parametrize("detach_teacher", [True, False])
def test_torch_backend_is_float32_under_autocast(detach_teacher):
    """bf16 autocast around float32 logits changes nothing in the "torch" backend: its batched matmuls
    stay in float32 (before, autocast ran them in bf16: KD losses and gradients off by ~1e-3)."""
    z, y = draw(4, 16, 50, seed=stable_seed("autocast", detach_teacher), dtype=torch.float32)
    opts = dict(temperature=2.0, detach_teacher=detach_teacher, backend="torch")

    def run():
        x = z.clone().requires_grad_()
        out = hk.dense_kd_losses(x, y, **opts)
        g = torch.Generator().manual_seed(2)
        loss = (out.kd * torch.rand(out.kd.shape, generator=g)).sum() + out.ce.sum() + hk.dense_kd(x, y, **opts)
        tangents = torch.func.jvp(lambda v: tuple(hk.dense_kd_losses(v, y, **opts)), (z,), (z.flip(-1),))[1]
        return out.ce, out.kd, *torch.autograd.grad(loss, x), *tangents

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run()
    for a, w in zip(autocast, plain, strict=True):
        assert a.dtype == torch.float32
        assert_close(a, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("detach_teacher", [True, False])
def test_class_masked_only_in_the_student_gives_infinite_kl(backend, detach_teacher):
    """-inf in exit 0 only, where its teachers have probability > 0: KL(p_j || p_0) = +inf (the true
    value); a zero weight on those pairs (a backward cotangent, or kd_weight) leaves every gradient
    finite and equal to the reference without those pairs."""
    k, b, c = 3, 4, 37
    z, y, _ = masked_draw(k, b, c, seed=5, dtype=torch.float64, exits=[0])
    opts = dict(temperature=2.5, detach_teacher=detach_teacher)
    x, x64 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = hk.dense_kd_losses(x, y, backend=backend, **opts)
    want = R.losses(z, y, mask=R.masks(k)["dense"], **opts)
    assert torch.isposinf(got.kd[0, 1:]).all() and torch.isfinite(got.kd[1:]).all()
    assert_close(got.ce, want[0], **F64)
    assert_close(got.kd, want[1], **F64)
    kd_weight = torch.rand(k, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kd_weight[0] = 0.0
    without_exit_0 = [[0 < i < j for j in range(k)] for i in range(k)]
    ref = R.weighted(x64, y, torch.ones(k), kd_weight, mask=without_exit_0, **opts)
    (grad_ref,) = torch.autograd.grad(ref, x64)
    assert torch.isfinite(grad_ref).all()
    (grad,) = torch.autograd.grad((got.ce, got.kd), x, (torch.ones(k, dtype=torch.float64), kd_weight))
    assert_close(grad, grad_ref, **F64)
    (grad,) = torch.autograd.grad(hk.dense_kd(x, y, kd_weight=kd_weight, backend=backend, **opts), x)
    assert_close(grad, grad_ref, **F64)  # the weighted loss itself is 0 · inf = NaN


def test_label_on_a_masked_class_gives_infinite_ce(backend):
    """CE = +inf where the label's class is -inf (in the last exit, a teacher only: every KL finite);
    the gradient of the weighted loss, softmax - onehot for that CE, stays finite."""
    k, b, c = 3, 4, 37
    z, y, masked = masked_draw(k, b, c, seed=9, dtype=torch.float64, exits=[k - 1])
    y[2] = int(masked[2].nonzero()[0])
    got = hk.dense_kd_losses(z, y, backend=backend)
    want = R.losses(z, y, temperature=4.0, mask=R.masks(k)["dense"])
    assert torch.isposinf(got.ce[-1]) and torch.isfinite(got.ce[:-1]).all() and torch.isfinite(got.kd).all()
    assert_close(got.ce, want[0], **F64)
    assert_close(got.kd, want[1], **F64)
    x, x64 = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = hk.dense_kd(x, y, backend=backend)
    ref = R.weighted(x64, y, torch.ones(k), torch.ones(k, k), temperature=4.0, mask=R.masks(k)["dense"])
    assert torch.isposinf(loss) and torch.isposinf(ref)
    (grad,) = torch.autograd.grad(loss, x)
    (grad_ref,) = torch.autograd.grad(ref, x64)
    assert torch.isfinite(grad_ref).all()
    assert_close(grad, grad_ref, **F64)


def test_exit_with_every_class_masked_gives_nan(backend):
    """A row in which every class of exit 1 is -inf has no softmax: exactly the objectives that involve
    exit 1 are NaN (as in the reference and torch.log_softmax), the others unaffected."""
    k, c = 3, 37
    z, y = draw(k, 4, c, seed=3)
    z[1, 2] = NEG_INF
    got = hk.dense_kd_losses(z, y, pairs=torch.ones(k, k, dtype=torch.bool).fill_diagonal_(False),
                             detach_teacher=False, backend=backend)
    want = R.losses(z, y, temperature=4.0, mask=[[i != j for j in range(k)] for i in range(k)])
    involves_1 = torch.zeros(k, k, dtype=torch.bool)
    involves_1[1, [0, 2]] = involves_1[[0, 2], 1] = True
    assert torch.equal(got.kd.isnan(), involves_1) and torch.equal(got.ce.isnan(), torch.tensor([False, True, False]))
    assert_close(got.ce, want[0], equal_nan=True, **F64)
    assert_close(got.kd, want[1], equal_nan=True, **F64)


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_huge_finite_logits(backend, temperature):
    """Logits of magnitude 1.8e38: z - max overflows float32 to -inf, z / T too for T < 1. Per row, exit
    k puts 1.8e38 on the first K - k classes of a random set and -1.8e38 elsewhere, so the softmaxes are
    uniform on nested sets: KL(p_j || p_i) = log(|S_i| / |S_j|), CE = log |S_k| (labels in the smallest
    set); losses and gradients match the float64 reference (where nothing overflows)."""
    k, b, c, big = 3, 4, 37, 1.8e38
    g = torch.Generator().manual_seed(int(temperature * 10))
    z = torch.full((k, b, c), -big)
    y = torch.empty(b, dtype=torch.long)
    for r in range(b):
        top = torch.randperm(c, generator=g)[:k]
        for e in range(k):
            z[e, r, top[: k - e]] = big
        y[r] = top[0]
    x, x64 = z.clone().requires_grad_(), z.double().requires_grad_()
    got = hk.dense_kd_losses(x, y, temperature=temperature, backend=backend)
    want = R.losses(x64, y, temperature=temperature, mask=R.masks(k)["dense"])
    assert_close(got.ce.double(), want[0].detach(), **TOL[torch.float32])
    assert_close(got.kd.double(), want[1].detach(), **TOL[torch.float32])
    (grad,) = torch.autograd.grad(got.ce.sum() + got.kd.sum(), x)
    (grad_ref,) = torch.autograd.grad(want[0].sum() + want[1].sum(), x64)
    assert_close(grad.double(), grad_ref, **TOL[torch.float32])


def test_temperature_range(backend):
    """Temperatures just outside TEMPERATURE_RANGE are rejected; at its bounds every backend matches
    the float64 reference."""
    low, high = TEMPERATURE_RANGE
    z, y = draw(3, 4, 37, seed=13)
    for t in (low * 0.99, high * 1.01):
        with pytest.raises(ValueError, match="temperature"):
            hk.dense_kd_losses(z, y, temperature=t, backend=backend)
    for t in (low, high):
        x, x64 = z.clone().requires_grad_(), z.clone().requires_grad_()
        got = hk.dense_kd_losses(x, y, temperature=t, backend=backend)
        want = R.losses(x64, y, temperature=t, mask=R.masks(3)["dense"])
        assert_close(got.kd, want[1], rtol=1e-8, atol=1e-12)
        (grad,) = torch.autograd.grad(got.kd.sum(), x)
        (grad_ref,) = torch.autograd.grad(want[1].sum(), x64)
        assert_close(grad, grad_ref, **F64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_reduction_of_huge_rows(backend, reduction):
    """Per-row CE and KD near 1e37 in float32 over 64 rows: their sum overflows (inf, the true value for
    reduction="sum"), their mean must not."""
    k, b, c, big = 2, 64, 5, 1e37
    z = torch.zeros(k, b, c)
    z[0, :, 0] = -big  # the student's label class, where the teacher puts all its mass
    z[1, :, 1:] = -big
    y = torch.zeros(b, dtype=torch.long)
    got = hk.dense_kd_losses(z, y, temperature=2.0, reduction=reduction, backend=backend)
    want = R.losses(z, y, temperature=2.0, mask=R.masks(k)["dense"], reduction=reduction)
    if reduction == "sum":
        assert torch.isposinf(got.ce[0]) and torch.isposinf(got.kd[0, 1])
    else:
        assert_close(got.ce.double(), want[0], **TOL[torch.float32])
        assert_close(got.kd.double(), want[1], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_labels(backend, dtype):
    """Labels of any integer dtype give exactly the int64 results (int8 / int16 / int32 with an ignored
    row: -100 fits them)."""
    z, y = draw(3, 5, 7, seed=4, ignored=0 if dtype == torch.uint8 else 1)
    x, x64 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = hk.dense_kd_losses(x, y.to(dtype), backend=backend)
    want = hk.dense_kd_losses(x64, y, backend=backend)
    assert torch.equal(got.ce, want.ce) and torch.equal(got.kd, want.kd)
    (grad,) = torch.autograd.grad(got.ce.sum(), x)
    (grad_64,) = torch.autograd.grad(want.ce.sum(), x64)
    assert torch.equal(grad, grad_64)
