"""Harmonized weights and the bilevel step (docs/hdkd.md), in float64 on tiny multi-exit MLPs."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import hdkd_fast as hk
from hdkd_fast.bilevel import HDKD, HarmonizedWeights, hypergrad, weight_hypergradient
from hdkd_fast.bilevel.hypergrad import InnerRule, ObjectiveSpec, inner_rules, virtual_step
from hdkd_fast.bilevel.weights import BOUNDED_SCALE, PARAMETERIZATIONS
from tests.support import float64_reference as ref

K, D, H, C = 3, 7, 9, 5
T = 2.0
BACKEND = "torch"  # every other available backend is covered by test_modes_agree_for_every_pair_selection


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny ops are dominated by OpenMP hand-offs on a shared machine; one thread keeps the tests fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    """A chain of K (Linear → [BatchNorm] → tanh → [Dropout]) blocks, each followed by a Linear exit."""

    def __init__(self, k: int = K, bn: bool = False, dropout: float = 0.0, stacked: bool = False) -> None:
        super().__init__()
        self.num_exits = k
        self.stacked = stacked
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(D if i == 0 else H, H), nn.BatchNorm1d(H) if bn else nn.Identity(), nn.Tanh(),
                          nn.Dropout(dropout))
            for i in range(k)
        )
        self.heads = nn.ModuleList(nn.Linear(H, C) for _ in range(k))

    def forward(self, x: Tensor) -> list[Tensor] | Tensor:
        out = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            out.append(head(x))
        return torch.stack(out) if self.stacked else out


def batches(seed: int, b: int = 11, b_val: int = 13) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, D, generator=g, dtype=torch.float64), torch.randint(0, C, (b,), generator=g),
            torch.randn(b_val, D, generator=g, dtype=torch.float64), torch.randint(0, C, (b_val,), generator=g))


def make(seed: int, *, sgd: dict | None = None, hypergrad: str = "jvp", model_kw: dict | None = None,
         **kw: object) -> tuple[MLP, torch.optim.SGD, HDKD]:
    torch.manual_seed(seed)
    model = MLP(**(model_kw or {})).double()
    opt = torch.optim.SGD(model.parameters(), **({"lr": 0.3} | (sgd or {})))
    kw.setdefault("criterion", hk.DenseKD(temperature=T, backend=BACKEND))
    kw.setdefault("weights", HarmonizedWeights(K, parameterization="softmax").double())  # hand_hypergradient's
    return model, opt, HDKD(model, opt, hypergrad=hypergrad, **kw)  # type: ignore[arg-type]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the independent reference: autograd through a hand-written SGD step --------------------------------

def hand_hypergradient(model: MLP, opt: torch.optim.SGD, phi: Tensor, data: tuple[Tensor, ...],
                       fixed_length: bool = False) -> Tensor:
    """∂/∂φ Σ_k ce_k(θ'; x_v, y_v), θ' = one SGD step (momentum, dampening, nesterov, weight decay) on
    Σ_o w_o l_o(θ; x, y), w = n·softmax(φ), objectives from tests/support/float64_reference (no hdkd_fast).
    ``fixed_length``: the loss gradient g enters the step as g·‖g‖/‖g‖ with the numerator a constant."""
    x, y, x_val, y_val = data
    mask = ref.masks(K)["dense"]
    pairs = [(i, j) for i in range(K) for j in range(K) if mask[i][j]]
    phi = phi.detach().clone().requires_grad_()
    w = len(phi) * torch.softmax(phi, 0)
    w_kd = torch.zeros(K, K, dtype=torch.float64).index_put(
        (torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])), w[K:])
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    z = torch.stack(functional_call(model, params, (x,)))
    loss = ref.weighted(z, y, w[:K], w_kd, temperature=T, mask=mask)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    if fixed_length:
        norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        grads = tuple(g * (norm.detach() / norm) for g in grads)
    group = opt.param_groups[0]
    lr, mu, tau, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
    stepped = {}
    for (name, p), g, real in zip(params.items(), grads, model.parameters(), strict=True):
        d = g + wd * p
        if mu:
            buf = opt.state.get(real, {}).get("momentum_buffer")
            buf = d if buf is None else mu * buf + (1 - tau) * d
            d = d + mu * buf if group["nesterov"] else buf
        stepped[name] = p - lr * d
    ce, _ = ref.losses(torch.stack(functional_call(model, stepped, (x_val,))), y_val, temperature=T, mask=mask)
    assert ce is not None
    (grad,) = torch.autograd.grad(ce.sum(), phi)
    return grad


SGD_CASES = {
    "plain": ({}, 0),
    "momentum+wd": ({"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05}, 2),
    "nesterov first step": ({"momentum": 0.8, "nesterov": True, "weight_decay": 0.01}, 0),
}


@pytest.mark.parametrize("step_length", hypergrad.STEP_LENGTHS)
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_hypergradients_match_each_other_and_a_hand_written_step(case: str, step_length: str) -> None:
    """Every mode against autograd through a hand-written step; with ``step_length="fixed"`` that step's
    gradient keeps its length (g·‖g₀‖/‖g‖), and the result differs from the free step's."""
    sgd, warmup = SGD_CASES[case]
    model, opt, hdkd = make(1, sgd=sgd, hypergrad="exact", step_length=step_length)
    for s in range(warmup):  # builds SGD momentum buffers (and moves φ with them)
        hdkd.step(*batches(100 + s))
    data = batches(2)
    results = {}
    for mode in ("exact", "jvp", "fd"):
        hdkd.hypergrad = mode
        (results[mode],) = hdkd.hypergradient(*data)
    fixed = step_length == "fixed"
    hand = hand_hypergradient(model, opt, hdkd.weights.phi, data, fixed_length=fixed)
    assert rel(results["exact"], hand) < 1e-8
    assert rel(results["jvp"], results["exact"]) < 1e-8
    assert rel(results["fd"], results["exact"]) < 2e-3  # one-sided difference: O(ε) truncation
    if fixed:
        assert rel(hand_hypergradient(model, opt, hdkd.weights.phi, data), hand) > 1e-2  # not the free step's


def fd_errors(seeds: range, step: float = hypergrad.FD_STEP) -> list[float]:
    """Relative error of ``"fd"`` against ``"exact"`` in float64 (issue 23 item 5's setting: SGD lr 0.5,
    momentum 0.9, weight decay 1e-3, three steps first for the momentum buffers), the step ``step``·√eps."""
    errors = []
    for seed in seeds:
        _, _, hdkd = make(seed, sgd={"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3}, hypergrad="exact")
        for s in range(3):
            hdkd.step(*batches(1000 * seed + s))
        data = batches(1000 * seed + 500)
        (exact,) = hdkd.hypergradient(*data)
        hdkd.hypergrad = "fd"
        previous, hypergrad.FD_STEP = hypergrad.FD_STEP, step
        try:
            (fd,) = hdkd.hypergradient(*data)
        finally:
            hypergrad.FD_STEP = previous
        errors.append(rel(fd, exact))
    return errors


def test_fd_step_is_scaled_to_the_dtype() -> None:
    """float64, 6 seeds: the one-sided difference with the √eps step errs by at most ~6e-8 (measured over 20
    seeds: median 1.7e-8, max 5.5e-8); a step 1000× larger (truncation) or 1000× smaller (rounding) is
    worse on every seed, and the old fixed perturbation norm 1e-2 errs by ~1e-3."""
    seeds = range(6)
    errors = fd_errors(seeds)
    assert max(errors) < 3e-7
    for step in (1e3, 1e-3):
        assert all(e < worse for e, worse in zip(errors, fd_errors(seeds, step), strict=True)), step
    old = fd_errors(range(2), 1e-2 / math.sqrt(torch.finfo(torch.float64).eps))
    assert min(old) > 1e-4


def test_fixed_step_length_hypergradient_is_orthogonal_to_the_weights() -> None:
    """step_length="fixed": Σ_o w_o ∂L_val/∂w_o = 0 (a uniform rescaling of the weights earns nothing), in
    every mode; the fd one up to its two one-sided differences."""
    model, opt, hdkd = make(1, sgd={"momentum": 0.9, "weight_decay": 0.05})
    hdkd.step(*batches(100))
    data = batches(2)
    named = dict(model.named_parameters())
    with torch.no_grad():
        w = hdkd.weights()
    for mode, tol in (("exact", 1e-10), ("jvp", 1e-10), ("fd", 1e-6)):
        d = weight_hypergradient(hdkd._forward, named, inner_rules(opt, named), w, hdkd._spec(),
                                 hdkd._val_objective, *data, mode=mode, step_length="fixed").weights
        scale = float(d.ce.abs().sum() + d.kd.abs().sum()) * float(w.ce.abs().max())
        assert abs(float((w.ce * d.ce).sum() + (w.kd * d.kd).sum())) < tol * scale


@pytest.mark.parametrize("backend", hk.available_backends("cpu"))
@pytest.mark.parametrize(("pairs", "parameterization", "detach_teacher"),
                         [("last", "softplus", True), ("adjacent", "softmax", False), ("dense", "softplus", False),
                          ("dense", "gated", True), ("dense", "per_exit", False), ("dense", "bounded", True)])
def test_modes_agree_for_every_pair_selection(pairs: str, parameterization: str, detach_teacher: bool,
                                              backend: str) -> None:
    criterion = hk.DenseKD(temperature=T, pairs=pairs, detach_teacher=detach_teacher, backend=backend)
    weights = HarmonizedWeights(K, pairs, parameterization=parameterization).double()
    with torch.no_grad():
        weights.phi.add_(0.3 * torch.randn(weights.phi.numel(), dtype=torch.float64))
    _, _, hdkd = make(3, criterion=criterion, weights=weights, hypergrad="exact")
    data = batches(4)
    (exact,) = hdkd.hypergradient(*data)
    for mode, tol in (("jvp", 1e-8), ("fd", 2e-3)):  # fd: one-sided, O(ε) truncation (~7e-4 here)
        hdkd.hypergrad = mode
        assert rel(hdkd.hypergradient(*data)[0], exact) < tol


def test_adam_inner_step_is_plain_sgd_with_its_lr() -> None:
    torch.manual_seed(5)
    model = MLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    hdkd = HDKD(model, opt, criterion=hk.DenseKD(temperature=T, backend=BACKEND), hypergrad="jvp",
                weights=HarmonizedWeights(K, parameterization="softmax").double())
    data = batches(6)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    expected = hand_hypergradient(model, sgd, hdkd.weights.phi, data)
    assert rel(hdkd.hypergradient(*data)[0], expected) < 1e-8


def test_core_matches_exact_with_bn_dropout_and_stacked_output(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, hdkd = make(7, sgd={"momentum": 0.5}, model_kw={"bn": True, "dropout": 0.3, "stacked": True})
    hdkd.step(*batches(8))
    data = batches(9)
    results = {}
    for mode in ("exact", "jvp", "fd"):
        hdkd.hypergrad = mode
        (results[mode],) = hdkd.hypergradient(*data)  # same Dropout masks in every train-batch forward
    assert rel(results["jvp"], results["exact"]) < 1e-8
    # Batch statistics (B = 11) curve the objectives strongly: the O(ε) truncation of the one-sided
    # difference is ~4e-2 here (~7e-4 without BatchNorm), and it shrinks with ε:
    # with the step scaled to float64 (√eps) the truncation is ~1e-8 even here; a step of norm 1e-2 (the
    # old fixed one) gives ~4e-2:
    assert rel(results["fd"], results["exact"]) < 1e-6
    monkeypatch.setattr(hypergrad, "FD_STEP", 1e-2 / math.sqrt(torch.finfo(torch.float64).eps))
    hdkd.hypergrad = "fd"
    assert rel(hdkd.hypergradient(*data)[0], results["exact"]) > 1e-3


def test_functional_core_returns_weight_gradient() -> None:
    torch.manual_seed(10)
    model = MLP().double()
    x, y, xv, yv = batches(11)
    named = dict(model.named_parameters())
    rules = {n: InnerRule(lr=0.2) for n in named}
    spec = ObjectiveSpec(temperature=T)
    weights = hk.LossWeights(torch.rand(K, dtype=torch.float64) + 0.5, torch.rand(K, K, dtype=torch.float64).triu(1))

    def forward(params: dict[str, Tensor], inp: Tensor) -> list[Tensor]:
        return functional_call(model, params, (inp,))

    def val(ce: Tensor) -> Tensor:
        return ce.sum()

    out = {m: weight_hypergradient(forward, named, rules, weights, spec, val, x, y, xv, yv, mode=m)
           for m in ("jvp", "exact")}
    assert rel(out["jvp"].weights.kd, out["exact"].weights.kd) < 1e-8
    assert rel(out["jvp"].weights.ce, out["exact"].weights.ce) < 1e-8
    assert torch.equal(out["jvp"].weights.kd.tril(), torch.zeros(K, K, dtype=torch.float64))
    torch.testing.assert_close(out["jvp"].val_loss, out["jvp"].val_ce.sum())
    with pytest.raises(ValueError, match="hypergrad"):
        weight_hypergradient(forward, named, rules, weights, spec, val, x, y, xv, yv, mode="reverse")


@pytest.mark.parametrize("stacked", [True, False])
def test_validation_cross_entropy_matches_the_op(stacked: bool) -> None:
    g = torch.Generator().manual_seed(24)
    z = torch.randn(K, 9, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (9,), generator=g)
    y[[1, 4]] = -100
    spec = ObjectiveSpec(temperature=T)
    logits = z if stacked else list(z)
    ce, _ = hk.dense_kd_losses(z, y, temperature=T)
    assert ce is not None
    torch.testing.assert_close(spec.cross_entropy(logits, y), ce)
    assert torch.equal(spec.cross_entropy(logits, torch.full((9,), -100)), torch.zeros(K, dtype=torch.float64))
    with pytest.raises(ValueError, match="target"):
        spec.cross_entropy(logits, torch.full((9,), C))


# -- side effects, direction, state ----------------------------------------------------------------------

def snapshot(model: nn.Module, hdkd: HDKD) -> list[Tensor]:
    tensors = [t.detach().clone() for t in model.state_dict().values()]
    tensors += [p.grad.clone() for p in model.parameters() if p.grad is not None]
    tensors += [p.detach().clone() for p in hdkd.weights.parameters()]
    for opt in (hdkd.optimizer, hdkd.weight_optimizer):
        assert opt is not None
        for state in opt.state.values():
            tensors += [v.clone() for v in state.values() if isinstance(v, Tensor)]
    return [*tensors, torch.get_rng_state()]


@pytest.mark.parametrize("mode", ["jvp", "fd", "exact"])
def test_hypergradient_has_no_side_effects(mode: str) -> None:
    model, _, hdkd = make(12, sgd={"momentum": 0.9, "weight_decay": 1e-3}, hypergrad=mode,
                          model_kw={"bn": True, "dropout": 0.2}, validation="balanced")
    hdkd.step(*batches(13))  # optimizer states, BN statistics and the EMA are populated
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before, ema, calls = snapshot(model, hdkd), hdkd.val_ema, hdkd.calls
    hdkd.hypergradient(*batches(14))
    after = snapshot(model, hdkd)
    assert len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert hdkd.val_ema is ema and hdkd.calls == calls
    assert all(p.grad is None for p in hdkd.weights.parameters())


class NoisyTeacher(nn.Module):
    """Exits 0 and 1 see the input; exit 2 (the teacher of pairs (0, 2), (1, 2)) sees only noise."""

    num_exits = 3

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D, H)
        self.heads = nn.ModuleList(nn.Linear(H, C) for _ in range(3))

    def forward(self, x: Tensor) -> list[Tensor]:
        h = torch.tanh(self.body(x))
        noise = 4 * torch.randn_like(h)
        return [self.heads[0](h), self.heads[1](h), self.heads[2](noise)]


def test_step_lowers_the_weight_of_a_harmful_pair() -> None:
    torch.manual_seed(15)
    centers = 3 * torch.randn(C, D, dtype=torch.float64)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, C, (n,))
        return centers[labels] + torch.randn(n, D, dtype=torch.float64), labels

    model = NoisyTeacher().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = HarmonizedWeights(3).double()
    hdkd = HDKD(model, opt, criterion=hk.DenseKD(temperature=T, backend=BACKEND), weights=weights,
                weight_optimizer=torch.optim.Adam(weights.parameters(), lr=0.05))
    for _ in range(15):
        stats = hdkd.step(*sample(32), *sample(32))
    assert stats["weight/kd/0-2"] < 0.9 and stats["weight/kd/1-2"] < 0.9
    assert stats["weight/kd/0-2"] < stats["weight/kd/0-1"]
    assert stats["weight/kd/1-2"] < stats["weight/ce/1"]


def test_state_round_trip_continues_identically() -> None:
    steps = [batches(20 + s) for s in range(6)]
    kw = {"sgd": {"momentum": 0.9}, "validation": "balanced", "update_every": 2}
    model_a, _, a = make(16, **kw)  # type: ignore[arg-type]
    for data in steps[:3]:
        a.step(*data)
    saved = copy.deepcopy(a.state_dict())
    for data in steps[3:]:
        a.step(*data)

    model_b, _, b = make(17, **kw)  # type: ignore[arg-type]
    b.load_state_dict(saved)
    assert b.calls == 3 and b.val_ema is not None
    for data in steps[3:]:
        b.step(*data)
    assert torch.equal(a.weights.phi, b.weights.phi)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True))
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"model": {}})


def test_virtual_step_is_torch_sgd_step() -> None:
    """``virtual_step`` against ``torch.optim.SGD.step`` itself (float64), for groups with maximize, weight
    decay, momentum (first step and with a buffer), dampening and nesterov: the graph-free ``_foreach``
    path and the differentiable per-tensor path."""
    g = torch.Generator().manual_seed(29)
    params = [torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(6)]
    groups = [{"params": params[:2], "lr": 0.1, "maximize": True, "weight_decay": 0.05},
              {"params": params[2:4], "lr": 0.3, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
              {"params": params[4:], "lr": 0.2, "momentum": 0.8, "nesterov": True}]
    opt = torch.optim.SGD(groups, lr=0.1)
    named = {f"p{i}": p for i, p in enumerate(params)}
    for step in range(2):  # the second step has momentum buffers
        grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in params]
        rules = inner_rules(opt, named)
        reference = copy.deepcopy(opt)  # torch's own step from the same state
        reference_params = [p for group in reference.param_groups for p in group["params"]]
        for p, grad in zip(reference_params, grads, strict=True):
            p.grad = grad.clone()
        reference.step()
        for graph in (False, True):
            grad_map = {f"p{i}": grad.clone().requires_grad_(graph) for i, grad in enumerate(grads)}
            got = virtual_step({n: p.detach() for n, p in named.items()}, grad_map, rules)
            for i, want in enumerate(reference_params):
                torch.testing.assert_close(got[f"p{i}"].detach(), want.detach(), rtol=1e-13, atol=1e-15,
                                           msg=f"step {step}, graph {graph}, p{i}")
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        opt.step()


def test_reuse_inner_gradient_makes_the_virtual_step_the_real_one() -> None:
    kw = {"model_kw": {"bn": True, "dropout": 0.2}}
    model_a, _, a = make(25, reuse_inner_gradient=True, **kw)  # type: ignore[arg-type]
    _, _, c = make(25, **kw)  # type: ignore[arg-type]
    model_b = copy.deepcopy(model_a)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.3)
    x, y, xv, yv = batches(26)
    with torch.no_grad():
        w = a.weights()
    torch.manual_seed(123)
    a.step(x, y, xv, yv)
    rng_a = torch.get_rng_state()
    torch.manual_seed(123)  # plain training with the weights before the update: same Dropout mask
    z_b = model_b(x)
    hk.dense_kd(z_b, y, ce_weight=w.ce, kd_weight=w.kd, temperature=T, backend=BACKEND).backward()
    opt_b.step()
    assert torch.equal(rng_a, torch.get_rng_state())  # the RNG advanced exactly as by one forward
    assert a.last_logits is not None  # the reused gradient pass's logits (training accuracy)
    for got, want in zip(a.last_logits, z_b, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    for (name, t_a), t_b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(t_a, t_b, rtol=1e-12, atol=1e-14, msg=name)  # BatchNorm updated once
    torch.manual_seed(123)
    c.step(x, y, xv, yv)
    assert torch.equal(a.weights.phi, c.weights.phi)  # same hypergradient either way


def test_update_every_and_step_stats() -> None:
    _, _, hdkd = make(18, update_every=3)
    updated, phis = [], []
    for s in range(5):
        stats = hdkd.step(*batches(30 + s))
        updated.append(stats["updated"])
        phis.append(hdkd.weights.phi.detach().clone())
    assert updated == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert torch.equal(phis[0], phis[1]) and torch.equal(phis[1], phis[2]) and not torch.equal(phis[2], phis[3])
    stats = hdkd.step(*batches(40))  # call 6: no update
    assert "hypergrad_norm" not in stats and "weight/kd/0-2" in stats and "loss" in stats
    stats = hdkd.step(*batches(41))
    n = hdkd.weights.num_objectives
    assert {"val_loss", "hypergrad_norm", "lr", "val_ce/2", "weight/kd/1-2"} <= stats.keys()
    assert sum(stats[f"weight/{name}"] for name in hdkd.weights.objective_names()) == pytest.approx(n)
    assert all(isinstance(v, float) for v in stats.values())


def test_warmup_holds_the_weights_then_updates_every_interval() -> None:
    """``warmup_steps=4, update_every=3``: calls 0-3 are plain steps at the starting weights (no validation
    batch needed), then calls 4, 7, ... update φ; the counter survives ``state_dict``."""
    _, _, hdkd = make(21, update_every=3, warmup_steps=4)
    start = hdkd.weights.phi.detach().clone()
    updated = []
    for s in range(9):
        will = hdkd.will_update()
        x, y, xv, yv = batches(60 + s)
        stats = hdkd.step(x, y, xv, yv) if will else hdkd.step(x, y)
        assert stats["updated"] == float(will)
        updated.append(will)
        if s < 4:
            assert torch.equal(hdkd.weights.phi, start)
    assert updated == [False, False, False, False, True, False, False, True, False]
    assert not torch.equal(hdkd.weights.phi, start)
    _, _, other = make(21, update_every=3, warmup_steps=4)
    other.load_state_dict(hdkd.state_dict())
    assert other.calls == 9 and not other.will_update()


def test_default_weight_optimizer_takes_weight_lr_per_step() -> None:
    """The default φ optimizer is Adam at ``weight_lr × update_every``; weights without parameters
    (``"fixed"``) get none, and no step then updates or needs a validation batch."""
    _, _, hdkd = make(22, update_every=4, weight_lr=0.03)
    assert isinstance(hdkd.weight_optimizer, torch.optim.Adam)
    assert hdkd.weight_optimizer.param_groups[0]["lr"] == pytest.approx(0.12)
    _, _, fixed = make(22, update_every=4, weights=HarmonizedWeights(K, parameterization="fixed").double())
    assert fixed.weight_optimizer is None and not fixed.will_update()
    start = fixed.weights().ce.clone()
    x, y, _, _ = batches(70)
    assert fixed.step(x, y)["updated"] == 0.0
    torch.testing.assert_close(fixed.weights().ce, start, rtol=0, atol=0)


def test_balanced_validation_tracks_the_running_mean() -> None:
    _, _, hdkd = make(19, validation="balanced", ema_decay=0.5)
    first = hdkd.step(*batches(50))
    ce1 = torch.tensor([first[f"val_ce/{k}"] for k in range(K)], dtype=torch.float64)
    assert first["val_loss"] == pytest.approx(K)  # Σ ce_k / ce_k before the running mean exists
    assert hdkd.val_ema is not None
    torch.testing.assert_close(hdkd.val_ema, ce1)
    second = hdkd.step(*batches(51))
    ce2 = torch.tensor([second[f"val_ce/{k}"] for k in range(K)], dtype=torch.float64)
    assert second["val_loss"] == pytest.approx(float((ce2 / ce1).sum()))
    torch.testing.assert_close(hdkd.val_ema, 0.5 * ce1 + 0.5 * ce2)


def test_fixed_weights_train_without_a_bilevel_update() -> None:
    weights = HarmonizedWeights(K, parameterization="fixed").double()
    model, _, hdkd = make(21, weights=weights)
    assert hdkd.weight_optimizer is None and hdkd.hypergradient(*batches(52)) == []
    before = [p.detach().clone() for p in model.parameters()]
    stats = hdkd.step(*batches(53))
    assert stats["updated"] == 0.0 and stats["weight/ce/0"] == 1.0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_autocast_bf16_float32_model() -> None:
    torch.manual_seed(22)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hdkd = HDKD(model, opt, criterion=hk.DenseKD(temperature=T, backend=BACKEND))
    x, y, xv, yv = (t.float() if t.is_floating_point() else t for t in batches(23))
    phi = hdkd.weights.phi.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = hdkd.step(x, y, xv, yv)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert hdkd.weights.phi.dtype == torch.float32 and not torch.equal(phi, hdkd.weights.phi)


def test_auto_mode_is_fd_for_float_logits_and_jvp_under_bf16_autocast() -> None:
    """``hypergrad="auto"`` (the default) gives exactly the ``"fd"`` hypergradient for float32 logits and
    exactly the ``"jvp"`` one for the bf16 logits of autocast (a difference of bf16 logits would be
    rounding noise); and the default step reuses the gradient pass (``reuse_inner_gradient``)."""
    torch.manual_seed(24)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hdkd = HDKD(model, opt, criterion=hk.DenseKD(temperature=T, backend=BACKEND))
    assert hdkd.hypergrad == "auto" and hdkd.reuse_inner_gradient and hdkd.per_unit_lr
    data = [t.float() if t.is_floating_point() else t for t in batches(25)]
    got = {}
    for autocast in (False, True):
        for mode in ("auto", "fd", "jvp"):
            hdkd.hypergrad = mode
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                (got[mode, autocast],) = hdkd.hypergradient(*data)
    assert torch.equal(got["auto", False], got["fd", False]) and not torch.equal(got["fd", False], got["jvp", False])
    assert torch.equal(got["auto", True], got["jvp", True]) and not torch.equal(got["fd", True], got["jvp", True])
    assert rel(got["fd", False], got["jvp", False]) < 2e-2  # float32: the one-sided difference is close


# -- HarmonizedWeights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_weights_start_uniform(parameterization: str) -> None:
    """Every parameterization starts at the uniform weights, except ``per_exit`` and ``bounded``: each
    exit's unit split half on its CE, half evenly over its teachers (exit 4, no teacher: CE 1)."""
    w = HarmonizedWeights(4, "dense", parameterization=parameterization)
    assert w.num_objectives == 4 + 6
    out = w()
    if parameterization in ("per_exit", "bounded"):
        torch.testing.assert_close(out.ce, torch.tensor([0.5, 0.5, 0.5, 1.0]))
        kd = torch.tensor([[0, 1 / 6, 1 / 6, 1 / 6], [0, 0, 1 / 4, 1 / 4], [0, 0, 0, 1 / 2], [0, 0, 0, 0]])
        torch.testing.assert_close(out.kd, kd)
    else:
        torch.testing.assert_close(out.ce, torch.ones(4))
        torch.testing.assert_close(out.kd, torch.ones(4, 4).triu(1))
    assert (len(list(w.parameters())) == 0) == (parameterization == "fixed")


def test_weights_order_init_and_softmax_normalization() -> None:
    w = HarmonizedWeights(3, "last")
    assert w.pairs == ((0, 2), (1, 2)) and w.objective_names() == ["ce/0", "ce/1", "ce/2", "kd/0-2", "kd/1-2"]
    losses = hk.KDLosses(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[0, 0, 4.0], [0, 0, 5.0], [0, 0, 0]]))
    torch.testing.assert_close(w.flatten(losses), torch.tensor([1.0, 2, 3, 4, 5]))
    torch.testing.assert_close(w.flatten(w.unflatten(torch.arange(5.0))), torch.arange(5.0))
    init = hk.LossWeights(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[0, 0, 2.0], [0, 0, 2.0], [0, 0, 0]]))
    soft = HarmonizedWeights(3, "last", parameterization="softmax", init=init)
    torch.testing.assert_close(soft.vector(), torch.tensor([0.5, 1.0, 1.5, 1.0, 1.0]))  # rescaled to sum 5
    plus = HarmonizedWeights(3, "last", parameterization="softplus", init=init)
    torch.testing.assert_close(plus.vector(), torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0]))
    gated = HarmonizedWeights(3, "last", parameterization="gated", init=init)
    torch.testing.assert_close(gated.vector(), torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0]))
    per_exit = HarmonizedWeights(3, "last", parameterization="per_exit", init=init)  # groups {0, 3}, {1, 4}, {2}
    torch.testing.assert_close(per_exit.vector(), torch.tensor([1 / 3, 1 / 2, 1.0, 2 / 3, 1 / 2]))


def test_per_exit_weights_are_one_softmax_per_student() -> None:
    """Student i's objectives G_i = {ce_i} ∪ {kd_ij} get softmax(φ_{G_i}), against a float64 closed form,
    with the Jacobian of the whole map."""
    w = HarmonizedWeights(4, "dense", parameterization="per_exit").double()
    with torch.no_grad():
        w.phi.copy_(torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    groups = [[0, 4, 5, 6], [1, 7, 8], [2, 9], [3]]
    assert [torch.nonzero(w.student == i).flatten().tolist() for i in range(4)] == groups

    def closed_form(phi: torch.Tensor) -> torch.Tensor:
        out = [torch.zeros((), dtype=torch.float64)] * 10
        for g in groups:
            e = [phi[o].exp() for o in g]
            for o, v in zip(g, e, strict=True):
                out[o] = v / sum(e)
        return torch.stack(out)

    phi = w.phi.detach()
    torch.testing.assert_close(w.vector(), closed_form(phi), rtol=1e-12, atol=0)
    assert [round(float(w.vector().detach()[g].sum()), 12) for g in groups] == [1.0, 1.0, 1.0, 1.0]
    want = torch.autograd.functional.jacobian(closed_form, phi)
    got = torch.autograd.functional.jacobian(lambda t: w.flatten(torch.func.functional_call(w, {"phi": t}, ())), phi)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bounded_weights_lean_each_exit_within_their_bounds() -> None:
    """``bounded``: w_o = w⁰_o (1 + β (tanh φ_o − t̄_i)), t̄_i the w⁰-weighted mean of tanh φ over student i's
    objectives, against a float64 closed form with its Jacobian; every exit's total stays 1 and every
    weight within (1 ∓ 2β) w⁰, however large φ."""
    w = HarmonizedWeights(4, "dense", parameterization="bounded").double()
    groups = [[0, 4, 5, 6], [1, 7, 8], [2, 9], [3]]
    w0 = w.vector().detach().clone()

    def closed_form(phi: torch.Tensor) -> torch.Tensor:
        out = [torch.zeros((), dtype=torch.float64)] * 10
        for g in groups:
            mean = sum(w0[o] * phi[o].tanh() for o in g) / sum(w0[o] for o in g)
            for o in g:
                out[o] = w0[o] * (1 + BOUNDED_SCALE * (phi[o].tanh() - mean))
        return torch.stack(out)

    for scale in (0.7, 50.0):
        with torch.no_grad():
            w.phi.copy_(scale * torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
        phi, v = w.phi.detach(), w.vector().detach()
        torch.testing.assert_close(v, closed_form(phi), rtol=1e-12, atol=0)
        for g in groups:  # the start's totals (1, up to the float32 rounding of w⁰ = 1/6)
            assert abs(float(v[g].sum() - w0[g].sum())) < 1e-15 and abs(float(v[g].sum()) - 1) < 1e-7
        ratio = v / w0
        assert bool((ratio > 1 - 2 * BOUNDED_SCALE).all()) and bool((ratio < 1 + 2 * BOUNDED_SCALE).all())
        want = torch.autograd.functional.jacobian(closed_form, phi)
        got = torch.autograd.functional.jacobian(
            lambda t: w.flatten(torch.func.functional_call(w, {"phi": t}, ())), phi)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gated_weights_fix_ce_and_bound_each_gate() -> None:
    """w = (ce⁰, 2·kd⁰·σ(φ)): only the K(K−1)/2 gates are parameters, each in (0, 2·kd⁰), and ∂w/∂φ_p is
    2·kd⁰_p·σ(φ_p)(1 − σ(φ_p)) on its own pair (float64)."""
    w = HarmonizedWeights(4, "dense", parameterization="gated").double()
    assert w.phi.shape == (6,)
    with torch.no_grad():
        w.phi.copy_(torch.tensor([-40.0, -1.0, 0.0, 0.5, 3.0, 40.0], dtype=torch.float64))
    v = w.vector()
    torch.testing.assert_close(v[:4], torch.ones(4, dtype=torch.float64))
    assert v[4] < 1e-15 and abs(v[9] - 2.0) < 1e-15 and bool(((v[4:] >= 0) & (v[4:] <= 2)).all())
    jac = torch.autograd.functional.jacobian(lambda phi: 2 * torch.sigmoid(phi), w.phi.detach())
    (grad,) = torch.autograd.grad(v, w.phi, torch.cat((torch.zeros(4), torch.ones(6))).double(), retain_graph=True)
    torch.testing.assert_close(grad, jac.diagonal(), rtol=1e-12, atol=0)
    (none,) = torch.autograd.grad(v, w.phi, torch.cat((torch.ones(4), torch.zeros(6))).double())
    assert not none.any()  # the CE weights do not depend on φ


def test_weights_bad_input() -> None:
    with pytest.raises(ValueError, match="num_exits"):
        HarmonizedWeights(0)
    with pytest.raises(ValueError, match="parameterization"):
        HarmonizedWeights(3, parameterization="exp")
    with pytest.raises(ValueError, match="pairs"):
        HarmonizedWeights(3, "all")
    with pytest.raises(TypeError, match="init"):
        HarmonizedWeights(3, init=(torch.ones(3), torch.ones(3, 3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init\.kd"):
        HarmonizedWeights(3, init=hk.LossWeights(torch.ones(3), torch.ones(2, 2)))
    with pytest.raises(ValueError, match="init"):
        HarmonizedWeights(3, init=hk.LossWeights(torch.ones(3), -torch.ones(3, 3)))


# -- non-finite hypergradients and losses (issue 17, item 2) -----------------------------------------------

NAN_CASES = {"jvp": {}, "fd": {"hypergrad": "fd"}, "exact": {"hypergrad": "exact"},
             "balanced": {"validation": "balanced"}, "reuse": {"reuse_inner_gradient": True}}


def with_nan(t: Tensor) -> Tensor:
    out = t.clone()
    out[0, 0] = float("nan")
    return out


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, w: hk.LossWeights, x: Tensor, y: Tensor) -> None:
    """The real step by hand: zero_grad, the weighted dense-KD loss with weights ``w``, backward, step."""
    opt.zero_grad(set_to_none=True)
    hk.dense_kd(model(x), y, ce_weight=w.ce, kd_weight=w.kd, temperature=T, backend=BACKEND).backward()
    opt.step()


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_in_a_validation_batch_skips_the_weight_update(case: str) -> None:
    """One NaN in a validation batch: φ, its Adam state and the EMA stay as they were, the real step runs
    with the weights before (exactly the hand-written step), it is counted and warned about once, and the
    next clean steps train normally."""
    kw = NAN_CASES[case]
    model, opt, hdkd = make(70, sgd={"momentum": 0.9}, model_kw={"bn": True}, **kw)  # type: ignore[arg-type]
    hdkd.step(*batches(71))  # a clean step first: Adam, momentum, BN statistics and the EMA exist
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.9)
    reference_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # not sharing the momentum buffers
    phi, adam = hdkd.weights.phi.detach().clone(), copy.deepcopy(hdkd.weight_optimizer.state_dict())  # type: ignore[union-attr]
    ema = None if hdkd.val_ema is None else hdkd.val_ema.clone()
    with torch.no_grad():
        w = hdkd.weights()

    x, y, xv, yv = batches(72)
    with pytest.warns(RuntimeWarning, match="non-finite hypergradient"):
        stats = hdkd.step(x, y, with_nan(xv), yv)
    assert stats["updated"] == 0.0 and stats["update_skipped"] == 1.0 and stats["step_skipped"] == 0.0
    assert hdkd.skipped_updates == 1
    assert torch.equal(hdkd.weights.phi, phi)
    assert str(hdkd.weight_optimizer.state_dict()) == str(adam)  # type: ignore[union-attr]
    assert (ema is None and hdkd.val_ema is None) or torch.equal(hdkd.val_ema, ema)  # type: ignore[arg-type]
    plain_step(reference, reference_opt, w, x, y)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per run: a second bad batch is only counted
        assert hdkd.step(*batches(73)[:2], with_nan(batches(73)[2]), batches(73)[3])["update_skipped"] == 1.0
        for s in range(2):
            stats = hdkd.step(*batches(74 + s))
    assert stats["updated"] == 1.0 and stats["update_skipped"] == 0.0 and hdkd.skipped_updates == 2
    assert not torch.equal(hdkd.weights.phi, phi) and bool(torch.isfinite(hdkd.weights.phi).all())
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())
    assert hdkd.state_dict()["skipped_updates"] == 2


@pytest.mark.parametrize("case", ["jvp", "reuse"])
def test_nan_in_a_train_batch_does_not_step(case: str) -> None:
    """A non-finite train loss: no step at all (parameters, momentum, BatchNorm statistics and φ unchanged)."""
    model, opt, hdkd = make(80, sgd={"momentum": 0.9}, model_kw={"bn": True}, **NAN_CASES[case])  # type: ignore[arg-type]
    hdkd.step(*batches(81))
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), hdkd.state_dict()))
    x, y, xv, yv = batches(82)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        stats = hdkd.step(with_nan(x), y, xv, yv)
    assert stats["step_skipped"] == 1.0 and stats["update_skipped"] == 1.0 and math.isnan(stats["loss"])
    after = (model.state_dict(), opt.state_dict(), hdkd.state_dict())
    assert str(after[1]) == str(before[1])
    for a, b in ((after[0], before[0]), (after[2]["weights"], before[2]["weights"])):
        assert all(torch.equal(a[k], b[k]) for k in a), case
    assert all(p.grad is None for p in model.parameters())
    assert hdkd.step(*batches(83))["step_skipped"] == 0.0  # the next clean batch trains
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_step_without_update_is_the_plain_step_and_skips_non_finite_ones() -> None:
    """A step without a φ update (issue 23 item 2) takes no validation batch and is exactly the plain
    weighted step; a non-finite one (a NaN in the batch, or a finite loss with a non-finite gradient) is
    not taken, the BatchNorm statistics put back from the storage kept between steps."""
    model, opt, hdkd = make(84, sgd={"momentum": 0.9, "weight_decay": 1e-3}, model_kw={"bn": True}, update_every=3)
    hdkd.step(*batches(85))  # call 0: the update
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    reference_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    with torch.no_grad():
        w = hdkd.weights()
    assert not hdkd.will_update()
    for s in range(2):  # calls 1 and 2: no validation batch needed
        x, y, _, _ = batches(86 + s)
        stats = hdkd.step(x, y)
        plain_step(reference, reference_opt, w, x, y)
        assert stats["updated"] == 0.0 and "val_loss" not in stats
        assert stats["weight/ce/0"] == pytest.approx(float(w.ce[0]), rel=1e-15)
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    assert hdkd.will_update()
    with pytest.raises(ValueError, match="x_val"):
        hdkd.step(*batches(88)[:2])
    hdkd.step(*batches(88))  # call 3: the update
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    x, y, _, _ = batches(89)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        stats = hdkd.step(with_nan(x), y)
    assert stats["step_skipped"] == 1.0 and math.isnan(stats["loss"])
    hook = model.heads[0].weight.register_hook(lambda g: g * math.inf)  # finite loss, infinite gradient
    stats = hdkd.step(x, y)
    hook.remove()
    assert stats["step_skipped"] == 1.0 and math.isfinite(stats["loss"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state[0].values(), strict=True))
    assert str(opt.state_dict()) == str(state[1]) and all(p.grad is None for p in model.parameters())
    assert hdkd.step(x, y, *batches(89)[2:])["step_skipped"] == 0.0  # call 6: an update again
    assert bool(torch.isfinite(torch.cat([p.reshape(-1) for p in model.parameters()])).all())


def test_weight_stats_follow_every_change_of_the_weights() -> None:
    """The weights a step uses (and its ``"weight/…"`` stats) are cached between updates; any change of φ
    (its optimizer, an in-place edit, ``load_state_dict``) is seen by the next step."""
    _, _, hdkd = make(90, update_every=100)
    first = hdkd.step(*batches(91))
    assert hdkd.step(*batches(92))["weight/ce/0"] == first["weight/ce/0"]
    with torch.no_grad():
        hdkd.weights.phi[0] += 1.0
    edited = hdkd.step(*batches(93))
    assert edited["weight/ce/0"] > first["weight/ce/0"]
    with torch.no_grad():
        expected = float(hdkd.weights.vector()[0])
    assert edited["weight/ce/0"] == expected
    state = hdkd.state_dict()
    hdkd.weights.phi.data = torch.zeros_like(hdkd.weights.phi)  # replaced, not edited in place: w = 1
    assert hdkd.step(*batches(94))["weight/ce/0"] == pytest.approx(1.0, rel=1e-15)
    hdkd.load_state_dict(state)
    assert hdkd.step(*batches(95))["weight/ce/0"] == expected


def test_hdkd_method_draws_validation_batches_only_for_updates() -> None:
    """``--method hdkd`` draws a validation batch on the steps that update φ only (issue 23 item 2)."""
    from hdkd_fast.training import TrainConfig, method_class

    torch.manual_seed(96)
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = TrainConfig(method="hdkd", update_every=3, backend=BACKEND)
    method = method_class("hdkd")(model, opt, config, K, contextlib.nullcontext)
    drawn = []

    def next_val() -> tuple[Tensor, Tensor]:
        drawn.append(method.hdkd.calls)
        return batches(97)[2:]

    for s in range(7):
        method.step(*batches(98 + s)[:2], next_val)
    assert drawn == [0, 3, 6]


# -- bad input ---------------------------------------------------------------------------------------------

class Returns(nn.Module):
    def __init__(self, output: object) -> None:
        super().__init__()
        self.lin = nn.Linear(D, C).double()
        self.output = output

    def forward(self, x: Tensor) -> object:
        return self.output


def test_hdkd_bad_input() -> None:
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="hypergrad"):
        HDKD(model, opt, hypergrad="hessian")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="update_every"):
            HDKD(model, opt, update_every=bad)  # type: ignore[arg-type]
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="weight_lr"):
            HDKD(model, opt, weight_lr=bad)
    with pytest.raises(ValueError, match="warmup_steps"):
        HDKD(model, opt, warmup_steps=-1)
    with pytest.raises(TypeError, match="warmup_steps"):
        HDKD(model, opt, warmup_steps=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="validation"):
        HDKD(model, opt, validation="kd")
    with pytest.raises(ValueError, match="ema_decay"):
        HDKD(model, opt, ema_decay=1.0)
    with pytest.raises(TypeError, match="reuse_inner_gradient"):
        HDKD(model, opt, reuse_inner_gradient=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per_unit_lr"):
        HDKD(model, opt, per_unit_lr="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        HDKD(lambda x: x, opt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        HDKD(model, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="criterion"):
        HDKD(model, opt, criterion=nn.CrossEntropyLoss())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="weights"):
        HDKD(model, opt, weights=hk.LossWeights(torch.ones(3), torch.ones(3, 3)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="weight_optimizer"):
        HDKD(model, opt, weight_optimizer=opt.param_groups)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_exits"):
        HDKD(model, opt, criterion=hk.DenseKD(num_exits=4), weights=HarmonizedWeights(3))
    with pytest.raises(ValueError, match="pairs"):
        HDKD(model, opt, criterion=hk.DenseKD(pairs="last"), weights=HarmonizedWeights(3, "dense"))
    with pytest.raises(ValueError, match="number of exits"):
        HDKD(nn.Linear(2, 2), opt)
    data = batches(60)
    with pytest.raises(ValueError, match="num_exits=4"):
        HDKD(model, opt, weights=HarmonizedWeights(4).double()).step(*data)
    z = torch.randn(11, C, dtype=torch.float64)
    for output, error in ((z, ValueError), ({"logits": z}, TypeError), ([z, z.unsqueeze(0)], ValueError),
                          ([z, "z"], TypeError), (torch.stack([z, z]), ValueError)):
        bad = Returns(output)
        hdkd = HDKD(bad, torch.optim.SGD(bad.parameters(), lr=0.1), weights=HarmonizedWeights(3).double())
        with pytest.raises(error, match=r"model\(x\)"):
            hdkd.step(*data)
        with pytest.raises(error, match=r"model\(x\)"):
            hdkd.hypergradient(*data)
