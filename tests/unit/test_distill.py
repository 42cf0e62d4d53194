"""hdkd_fast.distill: EKD, ERDE, adaptive path weighting, gradient equilibrium and DBT temperatures.

Every check is against an independent float64 formula written here (explicit log-softmax, KL, entropy,
attention maps and their closed-form gradients), or against float64_reference for the dense KD terms.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hdkd_fast.distill import (
    AdaptivePathWeighting,
    AttentionDistillation,
    DBTTemperature,
    DenseKDUncertainty,
    EKDLoss,
    ERDELoss,
    GradientEquilibrium,
    attention_map,
    attention_pairs,
    dbt_temperature,
    gradient_rescale,
    match_exits,
)
from hdkd_fast.inference import EarlyExit
from hdkd_fast.models import MSDNet, MultiExitModule, StagedMultiExit, attach_exits, supports_exit_maps
from hdkd_fast.models.base import ExitCallback, ExitMap, eval_mode
from tests.support.float64_reference import losses as reference_losses

F64 = torch.float64
TOL: dict[str, Any] = dict(atol=1e-12, rtol=1e-10)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0, grad: bool = False) -> Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=F64) * scale).requires_grad_(grad)


# ---------------------------------------------------------------- independent float64 formulas


def log_softmax(x: Tensor) -> Tensor:
    shifted = x - x.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def ce_mean(z: Tensor, y: Tensor, ignore_index: int = -100) -> Tensor:
    valid = y != ignore_index
    rows = -log_softmax(z).gather(1, y.clamp(min=0)[:, None])[:, 0] * valid
    return rows.sum() / max(int(valid.sum()), 1)


def kl_rows(student: Tensor, teacher: Tensor, t: float) -> Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)) per row, teacher detached."""
    log_t, log_s = log_softmax(teacher.detach() / t), log_softmax(student / t)
    return t * t * (log_t.exp() * (log_t - log_s)).sum(dim=1)


def neg_entropy_rows(z: Tensor) -> Tensor:
    """-H(softmax(z)) / log C per row."""
    log_p = log_softmax(z)
    return (log_p.exp() * log_p).sum(dim=1) / math.log(z.shape[1])


def att(f: Tensor) -> Tensor:
    q = (f * f).sum(dim=1).reshape(f.shape[0], -1) / f.shape[1]
    return q / q.norm(dim=1, keepdim=True)


def labels(b: int, c: int, seed: int, ignore: tuple[int, ...] = ()) -> Tensor:
    y = torch.randint(0, c, (b,), generator=gen(seed))
    for r in ignore:
        y[r] = -100
    return y


# ---------------------------------------------------------------- attention maps (EKD)


def test_attention_map_of_a_hand_built_feature() -> None:
    f = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [2.0, 0.0]]]], dtype=F64)  # [1, 2, 2, 2]
    # mean_c f² = [[1, 0], [2, 2]] -> [1, 0, 2, 2] / 3
    torch.testing.assert_close(attention_map(f), torch.tensor([[1 / 3, 0.0, 2 / 3, 2 / 3]], dtype=F64))
    assert torch.equal(attention_map(torch.zeros(2, 3, 4, 4)), torch.zeros(2, 16))  # no NaN
    assert attention_map(torch.ones(2, 3, 5, dtype=torch.float16)).dtype == torch.float32  # 1-D spatial, upcast
    f = randn(3, 5, 4, 3, seed=1)
    torch.testing.assert_close(attention_map(f), att(f), **TOL)
    torch.testing.assert_close(attention_map(f).norm(dim=1), torch.ones(3, dtype=F64), **TOL)


def test_attention_map_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="feature"):
        attention_map(torch.ones(2, 3))
    with pytest.raises(TypeError, match="feature"):
        attention_map(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="feature"):
        attention_map([1.0])  # type: ignore[arg-type]


def ekd_features(b: int, seed: int) -> list[Tensor]:
    shapes = [(b, 3, 4, 4), (b, 5, 4, 4), (b, 2, 2, 2), (b, 4, 4, 4), (b, 6, 2, 2), (b, 7)]
    return [randn(*s, seed=seed + i, grad=True) for i, s in enumerate(shapes)]


def test_attention_distillation_value_and_closed_form_gradient() -> None:
    b = 5
    feats = ekd_features(b, seed=10)
    pairs = [(0, 3), (1, 3), (2, 4)]  # 4×4 group {0, 1, 3} taught by 3; 2×2 group {2, 4} taught by 4
    assert attention_pairs(feats) == pairs
    per_pair = torch.stack([((att(feats[s]) - att(feats[t])) ** 2).sum(dim=1).mean() for s, t in pairs])

    torch.testing.assert_close(AttentionDistillation("none")(feats), per_pair.detach(), **TOL)
    torch.testing.assert_close(AttentionDistillation("sum")(feats), per_pair.sum().detach(), **TOL)
    loss = AttentionDistillation()(feats)
    torch.testing.assert_close(loss, per_pair.mean().detach(), **TOL)
    loss.backward()

    # closed form: dl/da_s = 2 (a_s - a_t) / (B P); a = q / |q|, da/dq = (I - a a^T) / |q|; dq/df = 2 f / C
    for s, t in pairs:
        f, a_s, a_t = feats[s].detach(), att(feats[s]).detach(), att(feats[t]).detach()
        g_a = 2 * (a_s - a_t) / (b * len(pairs))
        q_norm = ((f * f).sum(dim=1).reshape(b, -1) / f.shape[1]).norm(dim=1, keepdim=True)
        g_q = (g_a - a_s * (a_s * g_a).sum(dim=1, keepdim=True)) / q_norm
        expected = 2 * f / f.shape[1] * g_q.reshape(b, 1, *f.shape[2:])
        torch.testing.assert_close(feats[s].grad, expected, **TOL)
    for t in (3, 4, 5):  # teachers (detached) and the 2-D feature get no gradient
        assert feats[t].grad is None


def test_attention_distillation_without_pairs_is_a_differentiable_zero() -> None:
    feats = [randn(3, 4, 4, 4, seed=1, grad=True), randn(3, 4, 2, 2, seed=2, grad=True), randn(3, 4, seed=3)]
    assert attention_pairs(feats) == []
    loss = AttentionDistillation()(feats)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert AttentionDistillation("none")(feats).shape == (0,)


def test_attention_distillation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="reduction"):
        AttentionDistillation("max")
    with pytest.raises(ValueError, match="features"):
        AttentionDistillation()([])
    with pytest.raises(TypeError, match="features"):
        AttentionDistillation()(torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"features\[1\]"):
        AttentionDistillation()([torch.ones(2, 3, 4, 4), torch.ones(3, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\]"):
        AttentionDistillation()([torch.ones(2, 3, 4, 4), torch.ones(2)])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ekd_loss_is_ce_plus_last_exit_kl_plus_attention(reduction: str) -> None:
    k, b, c, t, beta, gamma = 6, 5, 11, 3.0, 0.7, 1.3
    z = [randn(b, c, seed=20 + i, scale=2.0, grad=True) for i in range(k)]
    feats = ekd_features(b, seed=30)
    y = labels(b, c, seed=4, ignore=(2,))
    loss = EKDLoss(t, feature_weight=beta, kd_weight=gamma, reduction=reduction)(z, feats, y)

    attention = torch.stack([((att(feats[s]) - att(feats[u])) ** 2).sum(1).mean() for s, u in attention_pairs(feats)])
    expected = (
        sum(ce_mean(zk, y) for zk in z)
        + gamma * sum(kl_rows(z[i], z[-1], t).mean() for i in range(k - 1))
        + beta * (attention.mean() if reduction == "mean" else attention.sum())
    )
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    got = torch.autograd.grad(loss, [*z, *feats[:3]])
    want = torch.autograd.grad(expected, [*z, *feats[:3]])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_ekd_loss_without_features_weight_and_without_target() -> None:
    z = torch.randn(3, 4, 5, dtype=F64)
    feats = [torch.randn(4, 2, 3, 3, dtype=F64) for _ in range(3)]
    torch.testing.assert_close(
        EKDLoss(2.0, feature_weight=0.0)(z, feats),
        sum(kl_rows(z[i], z[-1], 2.0).mean() for i in range(2)),
        **TOL,
    )


def test_ekd_loss_rejects_bad_input() -> None:
    z = torch.randn(3, 4, 5)
    feats = [torch.randn(4, 2, 3, 3) for _ in range(3)]
    with pytest.raises(ValueError, match="features"):
        EKDLoss()(z, feats[:2])
    with pytest.raises(ValueError, match="features"):
        EKDLoss()(z, [torch.randn(5, 2, 3, 3) for _ in range(3)])
    with pytest.raises(ValueError, match="feature_weight"):
        EKDLoss(feature_weight=-1.0)
    with pytest.raises(ValueError, match="kd_weight"):
        EKDLoss(kd_weight=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        EKDLoss(temperature=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        EKDLoss(backend="cuda")


# ---------------------------------------------------------------- ERDE


def test_match_exits() -> None:
    assert match_exits(4, 4) == [0, 1, 2, 3]
    assert match_exits(3, 7) == [1, 4, 6]  # relative depths 1/3, 2/3, 1 -> 2/7, 5/7, 7/7
    assert match_exits(4, 2) == [0, 0, 1, 1]  # 3/4 ties between 1/2 and 1: the deeper one
    assert match_exits(1, 5) == [4]
    assert match_exits(5, 1) == [0] * 5
    for ks in range(1, 10):
        for kt in range(1, 10):
            m = match_exits(ks, kt)
            assert m[-1] == kt - 1 and m == sorted(m) and all(0 <= j < kt for j in m)
            for i, j in enumerate(m):  # the teacher exit of nearest relative depth
                gaps = [abs((jj + 1) / kt - (i + 1) / ks) for jj in range(kt)]
                assert gaps[j] <= min(gaps) + 1e-12
    with pytest.raises(ValueError, match="num_student"):
        match_exits(0, 3)
    with pytest.raises(TypeError, match="num_teacher"):
        match_exits(3, 2.0)  # type: ignore[arg-type]


def erde_inputs(ks: int, kt: int, b: int, c: int, seed: int, right: str) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Student/teacher logits and labels; the teacher is right on every row ("all"), none ("none") or a mix."""
    y = labels(b, c, seed=seed, ignore=(1,))
    student = [randn(b, c, seed=seed + 1 + i, scale=2.0, grad=True) for i in range(ks)]
    teacher = [randn(b, c, seed=seed + 50 + j, scale=2.0) for j in range(kt)]
    rows = torch.arange(b)
    for j, tj in enumerate(teacher):
        is_right = {"all": torch.ones(b, dtype=torch.bool), "none": torch.zeros(b, dtype=torch.bool),
                    "mix": (rows + j) % 2 == 0}[right]
        yy = y.clamp(min=0)
        with torch.no_grad():
            tj[rows, yy] = torch.where(is_right, tj.max(dim=1).values + 1.0, tj.min(dim=1).values - 1.0)
    return student, teacher, y


@pytest.mark.parametrize(("ks", "kt"), [(3, 3), (3, 5), (4, 2)])
def test_erde_matches_a_per_row_loop(ks: int, kt: int) -> None:
    b, c, t, gamma, eta = 7, 9, 2.5, 0.8, 1.7
    student, teacher, y = erde_inputs(ks, kt, b, c, seed=100, right="mix")
    teacher = [tj.requires_grad_() for tj in teacher]
    loss = ERDELoss(ks, kt, t, kd_weight=gamma, entropy_weight=eta)(student, teacher, y)

    match = match_exits(ks, kt)
    expected = sum(ce_mean(zk, y) for zk in student)
    n_wrong = 0
    for k in range(ks):
        for r in range(b):
            zs, zt = student[k][r : r + 1], teacher[match[k]][r : r + 1]
            wrong = int(y[r]) != -100 and int(zt.argmax()) != int(y[r])
            n_wrong += wrong
            term = eta * neg_entropy_rows(zs)[0] if wrong else gamma * kl_rows(zs, zt, t)[0]
            expected = expected + term / b
    assert 0 < n_wrong < ks * (b - 1)  # both branches are exercised
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    got = torch.autograd.grad(loss, student, retain_graph=True)
    want = torch.autograd.grad(expected, student)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    loss.backward()
    assert all(tj.grad is None for tj in teacher)  # the teacher is frozen


def test_erde_with_a_teacher_right_everywhere_is_per_exit_kd_plus_ce() -> None:
    ks, kt, b, c, t = 3, 5, 6, 8, 4.0
    student, teacher, y = erde_inputs(ks, kt, b, c, seed=200, right="all")
    loss = ERDELoss(ks, kt, t, entropy_weight=5.0)(torch.stack(student), torch.stack(teacher), y)
    mask = [[False] * (ks + kt) for _ in range(ks + kt)]
    for k, j in enumerate(match_exits(ks, kt)):
        mask[k][ks + j] = True
    ce, kd = reference_losses(torch.stack([*student, *teacher]), y, temperature=t, mask=mask)
    assert ce is not None
    expected = ce[:ks].sum() + kd.sum()
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    for g, w in zip(torch.autograd.grad(loss, student), torch.autograd.grad(expected, student), strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_erde_with_a_teacher_always_wrong_is_ce_plus_the_entropy_term() -> None:
    ks, kt, b, c, eta = 2, 2, 5, 6, 0.9
    student, teacher, y = erde_inputs(ks, kt, b, c, seed=300, right="none")
    y[1] = 2  # every row labelled: the teacher is wrong on all of them
    loss = ERDELoss(ks, kt, kd_weight=3.0, entropy_weight=eta)(student, teacher, y)
    expected = sum(ce_mean(z, y) + eta * neg_entropy_rows(z).mean() for z in student)
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    # closed-form gradient: (softmax(z) - onehot(y)) / B + η q ⊙ (log q + H) / (B log C), q = softmax(z)
    for z, g in zip(student, torch.autograd.grad(loss, student), strict=True):
        q = torch.softmax(z.detach(), dim=1)
        h = -(q * q.log()).sum(dim=1, keepdim=True)
        onehot = torch.nn.functional.one_hot(y, c).to(F64)
        want = (q - onehot) / b + eta * q * (q.log() + h) / (b * math.log(c))
        torch.testing.assert_close(g, want, **TOL)
    # the term lies in [-1, 0]: 0 for a one-hot prediction, -1 for the uniform one
    torch.testing.assert_close(neg_entropy_rows(torch.zeros(1, c, dtype=F64)), torch.tensor([-1.0], dtype=F64))


def test_erde_rejects_bad_input() -> None:
    student, teacher, y = erde_inputs(2, 3, 4, 5, seed=400, right="mix")
    crit = ERDELoss(2, 3)
    with pytest.raises(ValueError, match="student_logits"):
        crit(student[:1], teacher, y)
    with pytest.raises(ValueError, match="teacher_logits"):
        crit(student, teacher[:2], y)
    with pytest.raises(ValueError, match=r"teacher_logits\[1\]"):
        crit(student, [teacher[0], teacher[1][:, :4], teacher[2]], y)
    with pytest.raises(TypeError, match="target"):
        crit(student, teacher, None)
    with pytest.raises(ValueError, match="target"):
        crit(student, teacher, y[:3])
    with pytest.raises(ValueError, match="C >= 2"):
        ERDELoss(1, 1)([torch.zeros(3, 1)], [torch.zeros(3, 1)], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_student_exits"):
        ERDELoss(0, 3)
    with pytest.raises(ValueError, match="entropy_weight"):
        ERDELoss(2, 3, entropy_weight=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        ERDELoss(2, 3, temperature=0.0)
    with pytest.raises(ValueError, match="match"):
        ERDELoss(2, 3, match=[0])
    with pytest.raises(ValueError, match=r"match\[1\]"):
        ERDELoss(2, 3, match=[0, 3])


# ---------------------------------------------------------------- adaptive path weighting


def test_adaptive_path_weighting_value_and_gradients() -> None:
    p, lam = 5, 0.6
    weighting = AdaptivePathWeighting(p, lam).double()
    assert torch.equal(weighting.alpha.detach(), torch.zeros(p, dtype=F64))
    with torch.no_grad():
        weighting.alpha.copy_(randn(p, seed=1))
    losses = (randn(p, seed=2).abs() + 0.1).requires_grad_()
    out = weighting(losses)
    alpha = weighting.alpha.detach()
    torch.testing.assert_close(out, lam * ((torch.exp(-alpha) * losses).sum() + alpha.sum()).detach(), **TOL)
    out.backward()
    assert weighting.alpha.grad is not None and losses.grad is not None
    torch.testing.assert_close(weighting.alpha.grad, lam * (1 - torch.exp(-alpha) * losses.detach()), **TOL)
    torch.testing.assert_close(losses.grad, lam * torch.exp(-alpha), **TOL)
    torch.testing.assert_close(weighting.path_weights(), torch.exp(-alpha), **TOL)


def test_adaptive_path_weighting_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_paths"):
        AdaptivePathWeighting(0)
    with pytest.raises(TypeError, match="num_paths"):
        AdaptivePathWeighting(True)
    with pytest.raises(ValueError, match="lam"):
        AdaptivePathWeighting(3, lam=-1.0)
    with pytest.raises(ValueError, match="path_losses"):
        AdaptivePathWeighting(3)(torch.ones(4))
    with pytest.raises(TypeError, match="path_losses"):
        AdaptivePathWeighting(3)(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("pairs", ["dense", "last", "adjacent", "mask"])
def test_dense_kd_uncertainty_matches_a_hand_computation(pairs: str) -> None:
    k, b, c, t, lam = 5, 7, 13, 3.0, 0.4
    named = {"dense": [[i < j for j in range(k)] for i in range(k)],
             "last": [[j == k - 1 and i < j for j in range(k)] for i in range(k)],
             "adjacent": [[j == i + 1 for j in range(k)] for i in range(k)],
             "mask": [[(i, j) in {(0, 2), (1, 4), (3, 4)} for j in range(k)] for i in range(k)]}
    mask = named[pairs]
    spec: str | Tensor = torch.tensor(mask) if pairs == "mask" else pairs
    crit = DenseKDUncertainty(k, t, spec, lam).double()
    pair_list = [(i, j) for i in range(k) for j in range(k) if mask[i][j]]
    assert crit.alpha.shape == (len(pair_list),)
    with torch.no_grad():
        crit.alpha.copy_(randn(len(pair_list), seed=3))
    z = randn(k, b, c, seed=4, scale=2.0, grad=True)
    y = labels(b, c, seed=5, ignore=(0, 3))
    loss = crit(z, y)

    ce, kd = reference_losses(z, y, temperature=t, mask=mask)
    assert ce is not None
    alpha = crit.alpha.detach()
    kd_pairs = torch.stack([kd[i, j] for i, j in pair_list])
    expected = ce.sum() + lam * ((torch.exp(-alpha) * kd_pairs).sum() + alpha.sum())
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    same = AdaptivePathWeighting(len(pair_list), lam).double()  # the generic module on the same paths
    with torch.no_grad():
        same.alpha.copy_(alpha)
    torch.testing.assert_close(loss, (ce.sum() + same(kd_pairs)).detach(), **TOL)
    loss.backward()
    assert crit.alpha.grad is not None and z.grad is not None
    torch.testing.assert_close(crit.alpha.grad, lam * (1 - torch.exp(-alpha) * kd_pairs.detach()), **TOL)
    torch.testing.assert_close(z.grad, torch.autograd.grad(expected, z)[0], **TOL)
    weights = crit.path_weights()
    assert weights.shape == (k, k)
    for i in range(k):
        for j in range(k):
            want = math.exp(-float(alpha[pair_list.index((i, j))])) if mask[i][j] else 0.0
            assert weights[i, j].item() == pytest.approx(want, rel=1e-12)


def test_dense_kd_uncertainty_trains_alpha_with_the_model_optimizer() -> None:
    crit = DenseKDUncertainty(3, 2.0, lam=1.0)
    head = nn.Linear(4, 6)
    opt = torch.optim.SGD([*head.parameters(), *crit.parameters()], lr=0.1)
    x, y = torch.randn(5, 4), torch.randint(0, 6, (5,))
    logits = [head(x) * s for s in (0.5, 1.0, 2.0)]
    loss = crit(logits, y)
    opt.zero_grad()
    loss.backward()
    grad = crit.alpha.grad.clone()  # type: ignore[union-attr]
    opt.step()
    torch.testing.assert_close(crit.alpha.detach(), -0.1 * grad)
    assert [name for name, _ in crit.named_parameters()] == ["weighting.alpha"]


def test_dense_kd_uncertainty_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="selects no distillation pair"):
        DenseKDUncertainty(1)
    with pytest.raises(ValueError, match="num_exits"):
        DenseKDUncertainty(0)
    with pytest.raises(ValueError, match="pairs"):
        DenseKDUncertainty(3, pairs="all")
    with pytest.raises(ValueError, match="lam"):
        DenseKDUncertainty(3, lam=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        DenseKDUncertainty(3, temperature=-2.0)
    with pytest.raises(ValueError, match="num_exits=3"):
        DenseKDUncertainty(3)(torch.randn(4, 2, 5))


# ---------------------------------------------------------------- gradient_rescale


def test_gradient_rescale_forward_backward_jvp_vmap() -> None:
    x = randn(4, 3, seed=1, grad=True)
    y = gradient_rescale(x, 0.25)
    assert torch.equal(y, x) and y.data_ptr() == x.data_ptr()
    (y.sin() * 2).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 0.25 * 2 * x.detach().cos(), **TOL)

    v, u = randn(4, 3, seed=2), randn(4, 3, seed=3)

    def f(t: Tensor) -> Tensor:
        return gradient_rescale(t.sin(), -1.5).exp()

    value, tangent = torch.func.jvp(f, (x.detach(),), (v,))
    torch.testing.assert_close(value, x.detach().sin().exp(), **TOL)
    torch.testing.assert_close(tangent, -1.5 * value * x.detach().cos() * v, **TOL)
    _, vjp = torch.func.vjp(f, x.detach())
    (cotangent,) = vjp(u)
    torch.testing.assert_close((u * tangent).sum(), (cotangent * v).sum(), **TOL)  # <u, Jv> = <J^T u, v>

    torch.testing.assert_close(torch.vmap(f)(x.detach()), f(x.detach()), **TOL)
    per_row = torch.vmap(torch.func.grad(lambda t: f(t).sum()))(x.detach())
    torch.testing.assert_close(per_row, -1.5 * f(x.detach()) * x.detach().cos(), **TOL)

    z = gradient_rescale(x * 1.0, 3.0)
    z.relu_()  # the output is an ordinary tensor: in-place is allowed
    z.sum().backward()


def test_gradient_rescale_under_torch_compile() -> None:
    compiled = torch.compile(lambda t: gradient_rescale(t, 0.5).sin(), backend="aot_eager", fullgraph=True)
    x = randn(5, seed=7, grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 0.5 * x.detach().cos(), **TOL)


def test_gradient_rescale_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="scale"):
        gradient_rescale(torch.ones(2), float("inf"))
    with pytest.raises(TypeError, match="scale"):
        gradient_rescale(torch.ones(2), True)
    with pytest.raises(TypeError, match="x"):
        gradient_rescale(1.0, 2.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- gradient equilibrium


class TinyStaged(StagedMultiExit):
    def __init__(self, k: int = 4, d: int = 6, c: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(k))
        self.heads = nn.ModuleList(nn.Linear(d, c) for _ in range(k))

    def stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return list(zip(self.blocks, self.heads, strict=True))


def per_exit_grads(model: MultiExitModule, x: Tensor, y: Tensor) -> list[dict[str, Tensor]]:
    """``grads[j][name]`` = ∂CE(exit j)/∂param of the plain model (zeros where exit j does not reach)."""
    params = dict(model.named_parameters())
    out = []
    for j in range(model.num_exits):
        loss = ce_mean(model(x)[j], y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        pairs = zip(params.items(), grads, strict=True)
        out.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in pairs})
    return out


def ge_grads(model: MultiExitModule, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    wrapped = GradientEquilibrium(model)
    plain = model(x)
    logits = wrapped(x)
    for a, b in zip(plain, logits, strict=True):
        assert torch.equal(a, b)  # forward unchanged, bit for bit
    loss = sum(ce_mean(z, y) for z in logits)
    params = dict(wrapped.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n.removeprefix("model."): g for n, g in zip(params, grads, strict=True) if g is not None}


def test_gradient_equilibrium_scales_the_trunk_gradient_of_a_staged_model() -> None:
    torch.manual_seed(0)
    check_imta_closed_form(TinyStaged(4).double(), randn(7, 6, seed=1), labels(7, 5, seed=2))


def check_imta_closed_form(model: MultiExitModule, x: Tensor, y: Tensor) -> None:
    """GradientEquilibrium's gradients of Σ_j CE_j on a model with ``blocks.i`` / ``heads.i`` parameters."""
    k = model.num_exits
    per_exit = per_exit_grads(model, x, y)
    for name, g in ge_grads(model, x, y).items():
        stage = int(name.split(".")[1])
        if name.startswith("blocks."):  # trunk between exit i-1 and exit i: (1/(K-i)) Σ_{j>=i} ∂L_j/∂θ
            want = sum(per_exit[j][name] for j in range(stage, k)) / (k - stage)
        else:  # head j: its own gradient, unscaled
            want = per_exit[stage][name]
        torch.testing.assert_close(g, want, **TOL)


class HandWrittenChain(MultiExitModule):
    """A model of neither built-in kind that implements the hook itself: K linear+tanh stages, a head each."""

    def __init__(self, k: int, d: int = 6, c: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(k))
        self.heads = nn.ModuleList(nn.Linear(d, c) for _ in range(k))

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def forward_exits(self, x: Tensor, on_exit: ExitCallback) -> None:
        self.forward_exits_mapped(x, on_exit, lambda k, s: s, lambda k, s: s)

    def forward_exits_mapped(self, x: Tensor, on_exit: ExitCallback, into_head: ExitMap, onward: ExitMap) -> None:
        s = x
        for k, (block, head) in enumerate(zip(self.blocks, self.heads, strict=True)):
            h = into_head(k, block(s))
            on_exit(k, head(h), h)
            s = onward(k, h) if k < self.num_exits - 1 else h


def test_gradient_equilibrium_dispatches_through_the_model_hook() -> None:
    """Any MultiExitModule implementing forward_exits_mapped gets IMTA's closed form (no isinstance)."""
    torch.manual_seed(2)
    model = HandWrittenChain(3).double()
    assert supports_exit_maps(model) and not supports_exit_maps(nn.Linear(2, 2))
    check_imta_closed_form(model, randn(5, 6, seed=6), labels(5, 5, seed=7))


def test_gradient_equilibrium_forward_mode_is_the_transpose_of_its_backward() -> None:
    torch.manual_seed(1)
    wrapped = GradientEquilibrium(TinyStaged(3).double())
    x, v = randn(4, 6, seed=3), randn(4, 6, seed=4)
    u = [randn(4, 5, seed=5 + j) for j in range(3)]

    def f(t: Tensor) -> list[Tensor]:
        return wrapped(t)

    _, tangents = torch.func.jvp(f, (x,), (v,))
    _, vjp = torch.func.vjp(f, x)
    (cotangent,) = vjp(u)
    lhs = sum((uj * tj).sum() for uj, tj in zip(u, tangents, strict=True))
    torch.testing.assert_close(lhs, (cotangent * v).sum(), **TOL)


def imta_reference(model: MSDNet, x: Tensor) -> list[Tensor]:
    """IMTA's MSDNet.forward (kalviny/IMTA, models/msdnet_ge.py), with the rescaling written as
    ``t.detach() + s (t - t.detach())``: value t exactly, gradient s."""

    def rescale(t: Tensor, s: float) -> Tensor:
        return t.detach() + s * (t - t.detach())

    k = len(model.blocks)
    state: object = x
    out = []
    for i in range(k):
        state = list(model.blocks[i](state))
        state[-1] = rescale(state[-1], 1.0 / (k - i))
        out.append(model.classifier[i](state[-1]))
        state[-1] = rescale(state[-1], k - i - 1)
    return out


def test_gradient_equilibrium_on_msdnet_matches_imta_code() -> None:
    torch.manual_seed(2)
    model = MSDNet.cifar(10, n_blocks=3, step=1, base=1, n_channels=4, growth_rate=2).double()
    x, y = randn(3, 3, 32, 32, seed=6), labels(3, 10, seed=7)
    got = ge_grads(model, x, y)
    loss = sum(ce_mean(z, y) for z in imta_reference(model, x))
    params = dict(model.named_parameters())
    want = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert set(got) == {n for n, w in zip(params, want, strict=True) if w is not None}
    for name, w in zip(params, want, strict=True):
        if w is not None:
            torch.testing.assert_close(got[name], w, **TOL)

    wrapped = GradientEquilibrium(model)
    assert wrapped.num_exits == 3
    logits, feats = wrapped(x, return_features=True)
    assert len(feats) == 3 and all(torch.equal(a, b) for a, b in zip(logits, model(x), strict=True))
    with eval_mode(model), torch.no_grad():  # EarlyExit runs in eval mode
        first = torch.softmax(model(x)[0], dim=1).amax(dim=1)
    thresholds = [float(first.median()), 0.0, 0.0]  # some rows leave at exit 0, the others at exit 1
    a, b = EarlyExit(wrapped, thresholds)(x), EarlyExit(model, thresholds)(x)
    assert torch.equal(a.exits, b.exits) and torch.equal(a.logits, b.logits)
    assert a.exits.unique().tolist() == [0, 1]


@pytest.mark.parametrize("include_final", [True, False])
def test_gradient_equilibrium_on_attached_exits(include_final: bool) -> None:
    torch.manual_seed(3)
    d, c = 6, 5
    backbone = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh(), nn.Linear(d, c)).double()
    model = attach_exits(backbone, ["1", "3"], c, head=[nn.Linear(d, c).double(), nn.Linear(d, c).double()],
                         include_final=include_final)
    k = model.num_exits
    x, y = randn(6, d, seed=8), labels(6, c, seed=9)
    hooks_before = [len(m._forward_hooks) for m in backbone]
    per_exit = per_exit_grads(model, x, y)
    got = ge_grads(model, x, y)
    assert [len(m._forward_hooks) for m in backbone] == hooks_before  # the wrapper's hooks are gone
    first_exit = {"backbone.0": 0, "backbone.2": 1, "backbone.4": 2}  # the first exit each layer feeds
    for name, g in got.items():
        if name.startswith("backbone."):
            i = first_exit[name.rsplit(".", 1)[0]]
            want = sum(per_exit[j][name] for j in range(i, k)) / (k - i)
        else:
            want = per_exit[int(name.split(".")[1])][name]
        torch.testing.assert_close(g, want, **TOL)
    wrapped = GradientEquilibrium(model)
    a, b = EarlyExit(wrapped, [0.3] * k)(x), EarlyExit(model, [0.3] * k)(x)
    assert torch.equal(a.exits, b.exits) and torch.equal(a.logits, b.logits)


def test_gradient_equilibrium_rejects_other_models() -> None:
    class Custom(MultiExitModule):
        @property
        def num_exits(self) -> int:
            return 1

        def forward_exits(self, x: Tensor, on_exit: ExitCallback) -> None:
            on_exit(0, x, x)

    with pytest.raises(TypeError, match="Custom"):
        GradientEquilibrium(Custom())
    with pytest.raises(TypeError, match="Linear"):
        GradientEquilibrium(nn.Linear(2, 2))  # type: ignore[arg-type]

    class Derived(TinyStaged):
        def exit_feature(self, state: Tensor) -> Tensor:
            return state * 2

    with pytest.raises(TypeError, match=r"Derived\.exit_feature"):
        GradientEquilibrium(Derived().double())(randn(2, 6, seed=1))


# ---------------------------------------------------------------- DBT temperature


def test_dbt_epoch_schedule() -> None:
    assert dbt_temperature(0, 10) == 1.0
    assert dbt_temperature(9, 10) == pytest.approx(4.0)
    assert dbt_temperature(3, 10, start=2.0, end=8.0) == pytest.approx(2.0 * 4.0 ** (3 / 9))
    assert dbt_temperature(3, 10, start=2.0, end=8.0, schedule="linear") == pytest.approx(4.0)
    assert dbt_temperature(0, 1, start=3.0) == 3.0
    assert dbt_temperature(4, 5, start=4.0, end=1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="epoch"):
        dbt_temperature(10, 10)
    with pytest.raises(ValueError, match="num_epochs"):
        dbt_temperature(0, 0)
    with pytest.raises(ValueError, match="start"):
        dbt_temperature(0, 5, start=0.0)
    with pytest.raises(ValueError, match="end"):
        dbt_temperature(0, 5, end=float("inf"))
    with pytest.raises(ValueError, match="schedule"):
        dbt_temperature(0, 5, schedule="cosine")


def mean_max_prob(z: Tensor, t: float) -> float:
    return float(torch.softmax(z / t, dim=1).max(dim=1).values.mean())


def test_dbt_adaptive_temperature_follows_the_authors_rule() -> None:
    z = randn(16, 10, seed=11, scale=6.0)
    sched = DBTTemperature()
    assert sched.temperature == 1.0
    t, history = 1.0, []
    for _ in range(60):  # the authors' loop: T *= 1.05 while mean max-prob at T exceeds 0.5
        if mean_max_prob(z, t) > 0.5:
            t *= 1.05
        history.append(t)
    assert [sched.step(z) for _ in range(60)] == pytest.approx(history, rel=1e-12)
    assert history[0] > 1.0 and mean_max_prob(z, sched.temperature) <= 0.5  # it settled
    assert sched.step(torch.zeros(4, 10)) == sched.temperature  # uniform teacher: unchanged
    state = sched.state_dict()
    other = DBTTemperature()
    other.load_state_dict(state)
    assert other.temperature == sched.temperature


def test_dbt_adaptive_temperature_syncs_over_a_process_group() -> None:
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sched = DBTTemperature()
        z = randn(8, 5, seed=12, scale=5.0)
        assert sched.mean_max_prob(z) == pytest.approx(mean_max_prob(z, 1.0), rel=1e-12)
    finally:
        dist.destroy_process_group()


def test_dbt_adaptive_temperature_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="target_max_prob"):
        DBTTemperature(target_max_prob=1.0)
    with pytest.raises(ValueError, match="factor"):
        DBTTemperature(factor=1.0)
    with pytest.raises(ValueError, match="initial"):
        DBTTemperature(initial=-1.0)
    with pytest.raises(ValueError, match="target_max_prob"):
        DBTTemperature(target_max_prob=0.4).step(torch.zeros(3, 2))  # 1/C = 0.5: T would grow forever
    with pytest.raises(ValueError, match="teacher_logits"):
        DBTTemperature().step(torch.zeros(3))
