"""fused_linear_dense_kd / FusedLinearDenseKD against dense_kd_losses / dense_kd on materialized logits."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.testing import assert_close

import hdkd_fast as hk
from hdkd_fast.fused_linear import CHUNK_COPIES, chunk_size_for

F64 = {"rtol": 1e-9, "atol": 1e-11}
N, H, V = 10, 6, 13  # V <= 37: the interpreted Triton backend joins every case


def draw(k: int, *, seed: int, n: int = N, h: int = H, v: int = V, ignored: int = 2,
         dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random ``(hidden [K, N, H], weight [V, H], bias [V], target [N])`` with ignored tokens; the
    head is scaled so that the softmaxes are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(k, n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.randperm(n, generator=g)[:ignored]] = -100
    return hidden, weight, bias, target


def seed_of(*case: object) -> int:
    return zlib.crc32(repr(case).encode())


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def objective(ce: torch.Tensor | None, kd: torch.Tensor, seed: int) -> torch.Tensor:
    """``<g_ce, ce> + <g_kd, kd>`` with fixed random cotangents (every objective gets its own weight)."""
    g = torch.Generator().manual_seed(seed)
    total = (torch.randn(kd.shape, generator=g, dtype=kd.dtype) * kd).sum()
    return total if ce is None else total + (torch.randn(ce.shape, generator=g, dtype=ce.dtype) * ce).sum()


def check_against_materialized(k: int, seed: int, *, stacked: bool = True, use_bias: bool = True,
                               use_target: bool = True, tol: dict[str, float] = F64, **kwargs: object) -> None:
    """Losses and the gradients of hidden, weight and bias (random cotangents) of the fused op equal
    those of ``dense_kd_losses`` on ``hidden @ weight.T + bias``."""
    hidden, weight, bias, target = draw(k, seed=seed)
    y = target if use_target else None
    h1, w1, b1 = leaves(hidden, weight, bias)
    h2, w2, b2 = leaves(hidden, weight, bias)
    out = hk.fused_linear_dense_kd(h1 if stacked else list(h1.unbind(0)), w1, y, b1 if use_bias else None,
                                   **kwargs)  # type: ignore[arg-type]
    materialized = h2 @ w2.T + (b2 if use_bias else 0)
    ref = hk.dense_kd_losses(materialized, y, backend="torch",
                             **{a: v for a, v in kwargs.items() if a not in ("chunk_size", "backend")})
    if use_target:
        assert out.ce is not None and ref.ce is not None
        assert_close(out.ce, ref.ce, **tol)
    else:
        assert out.ce is None
    assert_close(out.kd, ref.kd, **tol)
    inputs1, inputs2 = (h1, w1, b1), (h2, w2, b2)
    if not use_bias:
        inputs1, inputs2 = inputs1[:2], inputs2[:2]
    g1 = torch.autograd.grad(objective(out.ce, out.kd, seed), inputs1)
    g2 = torch.autograd.grad(objective(ref.ce, ref.kd, seed), inputs2)
    for a, b in zip(g1, g2, strict=True):
        assert_close(a, b, **tol)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_losses_and_gradients_every_backend(k, backend):
    """Every CPU backend, K = 1..8, chunks of 4 rows (N = 10: the last chunk is partial), ignored tokens."""
    check_against_materialized(k, seed_of(k, backend), stacked=k % 2 == 0, chunk_size=4, backend=backend,
                               temperature=2.5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10, 64, None])
def test_chunk_sizes(chunk_size):
    check_against_materialized(4, seed_of(chunk_size), chunk_size=chunk_size)


@pytest.mark.parametrize(("pairs", "detach_teacher", "reduction"), [
    ("last", True, "sum"), ("adjacent", True, "none"), ("dense", False, "mean"), ("random", False, "none"),
])
def test_pairs_teacher_gradients_and_reductions(pairs, detach_teacher, reduction):
    k = 4
    if pairs == "random":
        g = torch.Generator().manual_seed(3)
        pairs = (torch.rand(k, k, generator=g) < 0.6) & ~torch.eye(k, dtype=torch.bool)
    check_against_materialized(k, seed_of(reduction, detach_teacher), chunk_size=3, pairs=pairs,
                               detach_teacher=detach_teacher, reduction=reduction, temperature=1.0)


def test_without_target_or_bias():
    check_against_materialized(3, 11, use_target=False, use_bias=False, chunk_size=4)


def test_all_tokens_ignored():
    hidden, weight, bias, _ = draw(2, seed=5)
    target = torch.full((N,), -100)
    out = hk.fused_linear_dense_kd(hidden, weight, target, bias, chunk_size=4)
    assert out.ce is not None
    assert_close(out.ce, torch.zeros(2, dtype=torch.float64))
    assert_close(out.kd, hk.dense_kd_losses(hidden @ weight.T + bias, target).kd, **F64)


def test_module_kept_gradients_and_loss_weights(backend):
    """FusedLinearDenseKD = DenseKD on materialized logits, gradients of hidden, head and the weights."""
    k = 3
    hidden, weight, bias, target = draw(k, seed=seed_of("module", backend))
    g = torch.Generator().manual_seed(1)
    ce_w, kd_w = torch.rand(k, generator=g, dtype=torch.float64), torch.rand(k, k, generator=g, dtype=torch.float64)
    results = []
    for fused in (True, False):
        h, w, b, a, c = leaves(hidden, weight, bias, ce_w, kd_w)
        if fused:
            loss = hk.FusedLinearDenseKD(k, temperature=3.0, chunk_size=4, backend=backend)(
                list(h.unbind(0)), w, target, b, weights=hk.LossWeights(a, c))
        else:
            loss = hk.DenseKD(k, temperature=3.0, backend="torch")(h @ w.T + b, target, weights=hk.LossWeights(a, c))
        results.append((loss, *torch.autograd.grad(2.5 * loss, (h, w, b, a, c))))
    for x, y in zip(*results, strict=True):
        assert_close(x, y, **F64)


def test_module_number_weights_and_repr():
    hidden, weight, bias, target = draw(2, seed=8)
    module = hk.FusedLinearDenseKD(ce_weight=0.5, kd_weight=2.0, vocab_size=V - 1, chunk_size=3)
    target = target.clamp(max=V - 2)
    ref = hk.dense_kd((hidden @ weight.T + bias)[..., : V - 1], target, ce_weight=0.5, kd_weight=2.0)
    assert_close(module(hidden, weight, target, bias), ref, **F64)
    assert "vocab_size=12, chunk_size=3" in repr(module)


def test_masked_vocabulary_by_bias_and_by_vocab_size():
    """Padding rows of the head: ``-inf`` bias entries, or ``vocab_size < V`` (the padding rows then get
    gradient 0 and never enter a softmax)."""
    hidden, weight, bias, target = draw(3, seed=21)
    masked = bias.clone()
    masked[[4, 9]] = -torch.inf
    target[target == 4] = 5
    target[target == 9] = 10
    h1, w1, b1 = leaves(hidden, weight, masked)
    h2, w2, b2 = leaves(hidden, weight, masked)
    out = hk.fused_linear_dense_kd(h1, w1, target, b1, chunk_size=4)
    ref = hk.dense_kd_losses(h2 @ w2.T + b2, target)
    assert torch.isfinite(out.kd).all()
    for x, y in zip(torch.autograd.grad(objective(*out, 2), (h1, w1, b1)),
                    torch.autograd.grad(objective(*ref, 2), (h2, w2, b2)), strict=True):
        assert_close(x, y, **F64)

    v = V - 3
    target = target.clamp(max=v - 1)
    h1, w1, b1 = leaves(hidden, weight, bias)
    h2, w2, b2 = leaves(hidden, weight, bias)
    out = hk.fused_linear_dense_kd(h1, w1, target, b1, vocab_size=v, chunk_size=3)
    ref = hk.dense_kd_losses((h2 @ w2.T + b2)[..., :v], target)
    assert_close(out.kd, ref.kd, **F64)
    grads = torch.autograd.grad(objective(*out, 4), (h1, w1, b1))
    for x, y in zip(grads, torch.autograd.grad(objective(*ref, 4), (h2, w2, b2)), strict=True):
        assert_close(x, y, **F64)
    assert (grads[1][v:] == 0).all() and (grads[2][v:] == 0).all()


def test_forward_mode_along_hidden_and_head():
    """torch.func.jvp of the losses and of the module's loss, tangents on hidden, weight and bias."""
    k = 4
    hidden, weight, bias, target = draw(k, seed=31)
    g = torch.Generator().manual_seed(0)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (hidden, weight, bias))

    def fused(h, w, b):
        return tuple(hk.fused_linear_dense_kd(h, w, target, b, chunk_size=3, detach_teacher=False))

    def materialized(h, w, b):
        return tuple(hk.dense_kd_losses(h @ w.T + b, target, detach_teacher=False))

    for x, y in zip(torch.func.jvp(fused, (hidden, weight, bias), tangents)[1],
                    torch.func.jvp(materialized, (hidden, weight, bias), tangents)[1], strict=True):
        assert_close(x, y, **F64)
    module = hk.FusedLinearDenseKD(k, chunk_size=4, kd_weight=0.3)
    fused_loss = torch.func.jvp(lambda h: module(list(h.unbind(0)), weight, target, bias), (hidden,),
                                (tangents[0],))
    ref_loss = torch.func.jvp(lambda h: hk.dense_kd(h @ weight.T + bias, target, kd_weight=0.3), (hidden,),
                              (tangents[0],))
    assert_close(fused_loss, ref_loss, **F64)


@pytest.mark.parametrize("use", ["module", "losses"])
def test_second_derivative_raises_instead_of_dropping(use: str):
    """Under create_graph=True the first-order gradients equal the materialized ones and require grad, and
    differentiating them (a gradient penalty) raises the standard "differentiate twice" error: the penalty
    is never silently dropped (before, the gradients did not require grad and ``loss + penalty`` trained
    without it)."""
    hidden, weight, bias, target = draw(2, seed=41)

    def loss_of(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, fused: bool) -> torch.Tensor:
        if use == "module":
            if fused:
                return hk.FusedLinearDenseKD(kd_weight=0.7)(h, w, target, b)
            return hk.dense_kd(h @ w.T + b, target, kd_weight=0.7)
        out = (hk.fused_linear_dense_kd(h, w, target, b, chunk_size=3) if fused
               else hk.dense_kd_losses(h @ w.T + b, target))
        return out.kd.sum() + 2 * out.ce.sum()

    fused_inputs, plain_inputs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    loss = loss_of(*fused_inputs, fused=True)
    grads = torch.autograd.grad(loss, fused_inputs, create_graph=True)
    assert all(g.requires_grad for g in grads)
    for x, y in zip(grads, torch.autograd.grad(loss_of(*plain_inputs, fused=False), plain_inputs), strict=True):
        assert_close(x, y, **F64)
    penalty = loss + sum(g.pow(2).sum() for g in grads)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        penalty.backward()


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    hidden, weight, bias, target = draw(3, seed=51, dtype=torch.float32)
    module = hk.FusedLinearDenseKD(3, temperature=2.0, chunk_size=4)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, module):
        h, w, b = leaves(hidden, weight, bias)
        loss = fn(h, w, target, b)
        results.append((loss, *torch.autograd.grad(loss, (h, w, b))))
    for x, y in zip(*results, strict=True):
        assert_close(x, y, rtol=1e-5, atol=1e-6)
    losses = torch.compile(lambda h: hk.fused_linear_dense_kd(h, weight, target, bias, chunk_size=3).kd.sum(),
                           fullgraph=True, backend="aot_eager")(hidden)
    assert_close(losses, hk.dense_kd_losses(hidden @ weight.T + bias, target).kd.sum(), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_computes_logits_in_float32():
    """Under bf16 autocast, bf16 hidden states and an fp32 head: the logits are computed and reduced in
    fp32 (the result equals the fp32 materialized path on the same bf16 inputs, not a bf16 matmul)."""
    hidden, weight, bias, target = draw(3, seed=61, h=32, v=37)
    hidden = hidden.to(torch.bfloat16).requires_grad_()
    weight, bias = weight.float().requires_grad_(), bias.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hk.FusedLinearDenseKD(3, chunk_size=4)(hidden, weight, target, bias)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    h, w, b = leaves(hidden.float(), weight, bias)
    ref = hk.dense_kd(h @ w.T + b, target)
    assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    assert_close(grads[0], ref_grads[0].bfloat16(), rtol=1.6e-2, atol=1e-4)
    for x, y in zip(grads[1:], ref_grads[1:], strict=True):
        assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_chunk_size_from_memory_budget():
    assert chunk_size_for(4, 128256, torch.float32, 256 << 20) == (256 << 20) // (4 * 128256 * 4 * CHUNK_COPIES)
    assert chunk_size_for(8, 10**9, torch.float32) == 1
    hidden, weight, bias, target = draw(2, seed=71)
    assert_close(hk.fused_linear_dense_kd(hidden, weight, target, bias).kd,
                 hk.fused_linear_dense_kd(hidden, weight, target, bias, chunk_size=N).kd, **F64)


def _bad(**changes: object) -> dict[str, object]:
    hidden, weight, bias, target = draw(2, seed=81)
    args: dict[str, object] = {"hidden": hidden, "weight": weight, "target": target, "bias": bias}
    args.update(changes)
    return args


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"hidden": torch.randn(2, 3)}, ValueError, "hidden must be a Tensor"),
    ({"hidden": [torch.randn(N, H), torch.randn(N, H + 1)]}, ValueError, r"hidden\[1\] has shape"),
    ({"weight": torch.randn(V, H + 1, dtype=torch.float64)}, ValueError, "weight must be a Tensor\\[V, H\\]"),
    ({"weight": "head"}, TypeError, "weight must be a Tensor"),
    ({"weight": torch.ones(V, H, dtype=torch.long)}, TypeError, "weight must be a floating"),
    ({"bias": torch.randn(V + 1, dtype=torch.float64)}, ValueError, "bias must be a floating Tensor"),
    ({"target": torch.zeros(N + 1, dtype=torch.long)}, ValueError, "target must have shape"),
    ({"target": torch.full((N,), V)}, ValueError, "outside"),
    ({"vocab_size": V + 1}, ValueError, "vocab_size must be <="),
    ({"vocab_size": 0}, ValueError, "vocab_size must be >= 1"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size must be an int"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"reduction": "max"}, ValueError, "reduction"),
    ({"pairs": "every"}, ValueError, "pairs"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_bad_arguments_name_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        hk.fused_linear_dense_kd(**_bad(**changes))  # type: ignore[arg-type]


def test_module_bad_arguments():
    hidden, weight, bias, target = draw(2, seed=91)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        hk.FusedLinearDenseKD(chunk_size=0)
    with pytest.raises(ValueError, match="num_exits=3"):
        hk.FusedLinearDenseKD(3)(hidden, weight, target, bias)
    with pytest.raises(ValueError, match="kd_weight must have shape"):
        hk.FusedLinearDenseKD(kd_weight=torch.ones(3))(hidden, weight, target, bias)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"criterion must be a hdkd_fast\.DenseKD"):
        hk.HDKD(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion=hk.FusedLinearDenseKD())
