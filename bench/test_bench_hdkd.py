"""Cost of one ``HDKD.step`` over a plain training step, as the number of exits K grows (issue 5).

A multi-exit MLP (K blocks ``Linear(H, H) → ReLU``, each followed by a ``Linear(H, C)`` exit) with
dense pairs: ``K + K(K-1)/2`` objectives (32 exits: 528). Implementations, one training step each:

- ``plain``: ``zero_grad``, forward, ``DenseKD`` with fixed weights, backward, ``optimizer.step``;
- ``fd`` / ``jvp`` / ``exact``: ``HDKD.step`` with that ``hypergrad`` (``update_every=1``) and the default
  ``reuse_inner_gradient=True`` (the real step applies the virtual step's gradient); ``fd`` is what
  ``hypergrad="auto"`` takes for float32 logits, so ``fd`` is the default step;
- ``fd_fresh`` / ``jvp_fresh``: the same with ``reuse_inner_gradient=False`` (a real step of its own, a
  forward and backward with the updated weights);
- ``naive``: the same bilevel step with per-objective gradients from one backward per objective
  (``∂L_val/∂w_o = −η ⟨∇θ' L_val, ∇θ l_o⟩``), the alternative whose cost grows with the objectives.

``test_hdkd_step_without_update`` (issue 23 item 2) times a step of ``HDKD(update_every=...)`` that does not
update φ (no validation batch passed) against the plain step it should cost: the same model, ``DenseKD``
with HDKD's current weights as fixed tensors, SGD with momentum 0.9 and weight decay 1e-4, ``float(loss)``
(the training loop's sync); on the ``K = 4`` MLP and ``msdnet-tiny``, column ``no_update`` (target ≤ 1.05).

``test_hdkd_step_msdnet`` times the same steps (no ``naive``) on a real early-exit network: ``msdnet-tiny``
(4 exits, BatchNorm, convolutions) on 1×14×14 images, batch 64, 10 classes, as ``hdkd-fast train`` runs
it on Fashion-MNIST in the comparison of docs/results.md (its row is labelled ``msdnet-tiny`` with K = 4).

``pytest bench/test_bench_hdkd.py`` runs the quick CPU grid (K ∈ {2, 4, 8, 16, 32}, B = H = 128,
C = 32, one thread, 7 rounds; ``naive``: 1 round); ``--full`` uses B = H = 256, C = 100, 20 rounds. At the end the
median of each step over the median of plain steps timed between its rounds (on a twin model, so
both see the same machine load), both on :data:`CLOCK`, is printed per K (``extra_info["ratio"]``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hdkd_fast as hk
from hdkd_fast.bilevel import HDKD, HarmonizedWeights
from hdkd_fast.models.zoo import build_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EXITS = (2, 4, 8, 16, 32)
IMPLS = ("plain", "fd", "jvp", "exact", "fd_fresh", "jvp_fresh", "naive")
COLUMNS = (*IMPLS[1:], "no_update")
LR = 0.05
BACKEND = "auto"  # what users get; bench/test_bench_dense_kd.py compares the backends themselves
CLOCK = time.thread_time if DEVICE.type == "cpu" else time.perf_counter
"""The clock of the ratios: on a shared CPU the busy time of this (single) thread, which other jobs'
load perturbs far less than wall time; pytest-benchmark's own (wall-clock) statistics are kept too."""
_RATIOS: dict[str, dict[str, float]] = defaultdict(dict)  # model -> impl -> median step / median plain step


class MultiExitMLP(nn.Module):
    def __init__(self, k: int, h: int, c: int) -> None:
        super().__init__()
        self.num_exits = k
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(h, h), nn.ReLU()) for _ in range(k))
        self.heads = nn.ModuleList(nn.Linear(h, c) for _ in range(k))

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            out.append(head(x))
        return out


@pytest.fixture(scope="module", autouse=True)
def _threads_and_report(request: pytest.FixtureRequest) -> Iterator[None]:
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu" and not request.config.getoption("--full", default=False):
        torch.set_num_threads(1)  # a shared CPU: one thread gives steadier ratios
    yield
    torch.set_num_threads(threads)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None or not _RATIOS:
        return
    lines = ["", f"median step / median plain step ({CLOCK.__name__}, interleaved rounds)",
             "| model | K | objectives | plain ms | " + " | ".join(COLUMNS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(COLUMNS)]
    for name in sorted(_RATIOS, key=lambda n: (not n.startswith("mlp"), len(n), n)):
        row = _RATIOS[name]
        k = int(row["k"])
        ratios = [f"{row[i]:.3f}" if i == "no_update" and i in row else f"{row[i]:.2f}" if i in row else ""
                  for i in COLUMNS]
        plain_ms = f"{row['plain_ms']:.2f}" if "plain_ms" in row else ""
        lines.append(f"| {name} | {k} | {k + k * (k - 1) // 2} | {plain_ms} | " + " | ".join(ratios) + " |")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))


def _naive_step(model: nn.Module, opt: torch.optim.SGD, weights: HarmonizedWeights,
                weight_opt: torch.optim.Optimizer, criterion: hk.DenseKD) -> Callable[..., None]:
    """The bilevel step with one backward per objective (plain SGD inner step)."""
    params = [p for p in model.parameters()]

    def step(x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor) -> None:
        with torch.no_grad():
            w = weights.vector()
        losses = weights.flatten(hk.dense_kd_losses(model(x), y, temperature=criterion.temperature, backend=BACKEND))
        per_objective = [torch.autograd.grad(l_o, params, retain_graph=True, allow_unused=True,
                                             materialize_grads=True) for l_o in losses]
        g = [sum(w[o] * per_objective[o][i] for o in range(len(per_objective))) for i in range(len(params))]
        stepped = {n: p.detach() - LR * gi for (n, p), gi in zip(model.named_parameters(), g, strict=True)}
        stepped = {n: t.requires_grad_() for n, t in stepped.items()}
        val = torch.func.functional_call(model, stepped, (x_val,))
        ce = hk.dense_kd_losses(val, y_val, temperature=criterion.temperature, backend=BACKEND).ce
        assert ce is not None
        v = torch.autograd.grad(ce.sum(), list(stepped.values()))
        hyper = torch.stack([-LR * sum((vi * gi).sum() for vi, gi in zip(v, grads, strict=True))
                             for grads in per_objective])
        weight_opt.zero_grad()
        weights.vector().backward(hyper)
        weight_opt.step()
        opt.zero_grad()
        with torch.no_grad():
            current = weights()
        criterion(model(x), y, weights=current).backward()
        opt.step()

    return step


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _plain_step(model: nn.Module, opt: torch.optim.SGD, criterion: hk.DenseKD) -> Callable[..., None]:
    def step(x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor) -> None:
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()

    return step


def _step(impl: str, model: nn.Module, opt: torch.optim.SGD, criterion: hk.DenseKD) -> Callable[..., object]:
    if impl == "plain":
        return _plain_step(model, opt, criterion)
    if impl == "naive":
        assert criterion.num_exits is not None  # the tests build it with K
        weights = HarmonizedWeights(criterion.num_exits, "dense", parameterization="softmax").to(DEVICE)
        return _naive_step(model, opt, weights, torch.optim.Adam(weights.parameters(), lr=1e-3), criterion)
    mode, _, fresh = impl.partition("_")
    return HDKD(model, opt, criterion=criterion, hypergrad=mode, reuse_inner_gradient=not fresh).step


def _measure(benchmark: Any, name: str, impl: str, model: nn.Module, criterion: hk.DenseKD,
             data: tuple[Tensor, ...], rounds: int, warmup: int) -> None:
    """Time ``impl``'s step on ``model`` (rounds of pytest-benchmark) and a plain step on a twin between the
    rounds; record their median ratio under ``name``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    twin = copy.deepcopy(model)  # the plain step timed between the rounds, under the same machine load
    plain = _plain_step(twin, torch.optim.SGD(twin.parameters(), lr=LR), criterion)
    step = _step(impl, model, opt, criterion)
    times: dict[str, list[float]] = {"step": [], "plain": []}

    def run(which: str, fn: Callable[..., object]) -> None:
        start = CLOCK()
        fn(*data)
        _sync()
        times[which].append(CLOCK() - start)

    def timed() -> None:
        run("step", step)

    def time_plain() -> None:  # pytest-benchmark's untimed setup before every round
        run("plain", plain)

    for _ in range(warmup):  # first-use costs (forward-AD decompositions, allocator)
        timed()
    benchmark.pedantic(timed, setup=time_plain, rounds=rounds, iterations=1, warmup_rounds=warmup)
    step_median, plain_median = (statistics.median(times[n][-rounds:]) for n in ("step", "plain"))
    benchmark.extra_info.update(ratio=step_median / plain_median, clock=CLOCK.__name__,
                                step_median_clock=step_median, plain_median_clock=plain_median)
    _RATIOS[name][impl] = step_median / plain_median
    if impl == "plain":
        _RATIOS[name]["plain_ms"] = step_median * 1e3


@pytest.mark.quick
@pytest.mark.parametrize("k", EXITS, ids=[f"K{k}" for k in EXITS])
@pytest.mark.parametrize("impl", IMPLS)
def test_hdkd_step(benchmark: Any, request: pytest.FixtureRequest, impl: str, k: int) -> None:
    full = bool(request.config.getoption("--full", default=False))
    b, h, c, rounds = (256, 256, 100, 20) if full else (128, 128, 32, 7)
    warmup = 1
    if impl == "naive" and not full:  # tens of seconds per step at K = 32, and nothing to warm up
        rounds, warmup = 1, 0
    torch.manual_seed(k)
    model = MultiExitMLP(k, h, c).to(DEVICE)
    criterion = hk.DenseKD(k, temperature=4.0, backend=BACKEND)
    gen = torch.Generator(device=DEVICE).manual_seed(1000 + k)
    data = (torch.randn(b, h, generator=gen, device=DEVICE), torch.randint(0, c, (b,), generator=gen, device=DEVICE),
            torch.randn(b, h, generator=gen, device=DEVICE), torch.randint(0, c, (b,), generator=gen, device=DEVICE))
    benchmark.group = f"hdkd_step-K{k}"
    benchmark.extra_info.update(impl=impl, k=k, objectives=k + k * (k - 1) // 2, batch=b, hidden=h, classes=c)
    _RATIOS[f"mlp K={k}"]["k"] = k
    _measure(benchmark, f"mlp K={k}", impl, model, criterion, data, rounds, warmup)


@pytest.mark.quick
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "naive"])
def test_hdkd_step_msdnet(benchmark: Any, request: pytest.FixtureRequest, impl: str) -> None:
    full = bool(request.config.getoption("--full", default=False))
    torch.manual_seed(0)
    model = build_model("msdnet-tiny", 10, (1, 14, 14)).to(DEVICE)
    b = 64
    gen = torch.Generator(device=DEVICE).manual_seed(2000)
    data = (torch.randn(b, 1, 14, 14, generator=gen, device=DEVICE),
            torch.randint(0, 10, (b,), generator=gen, device=DEVICE),
            torch.randn(b, 1, 14, 14, generator=gen, device=DEVICE),
            torch.randint(0, 10, (b,), generator=gen, device=DEVICE))
    benchmark.group = "hdkd_step-msdnet-tiny"
    benchmark.extra_info.update(impl=impl, k=model.num_exits, batch=b, image="1x14x14", classes=10)
    _RATIOS["msdnet-tiny"]["k"] = model.num_exits
    _measure(benchmark, "msdnet-tiny", impl, model, hk.DenseKD(model.num_exits, temperature=4.0, backend=BACKEND),
             data, 20 if full else 7, 1)


def _inputs(name: str) -> tuple[nn.Module, int, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    gen = torch.Generator(device=DEVICE).manual_seed(3000)
    if name == "msdnet-tiny":
        model, b, shape, c = build_model("msdnet-tiny", 10, (1, 14, 14)), 64, (1, 14, 14), 10
    else:
        model, b, shape, c = MultiExitMLP(4, 128, 32), 128, (128,), 32
    data = tuple(t for _ in range(2) for t in (torch.randn(b, *shape, generator=gen, device=DEVICE),
                                              torch.randint(0, c, (b,), generator=gen, device=DEVICE)))
    return model.to(DEVICE), 4, data  # both have 4 exits


@pytest.mark.quick
@pytest.mark.parametrize("name", ["mlp K=4", "msdnet-tiny"])
def test_hdkd_step_without_update(benchmark: Any, request: pytest.FixtureRequest, name: str) -> None:
    full = bool(request.config.getoption("--full", default=False))
    rounds = 60 if full else 25
    model, k, (x, y, x_val, y_val) = _inputs(name)
    twin = copy.deepcopy(model)
    criterion = hk.DenseKD(k, temperature=4.0, backend=BACKEND)

    def sgd(m: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)

    hdkd = HDKD(model, sgd(model), criterion=criterion, update_every=10**9)
    hdkd.step(x, y, x_val, y_val)  # the one update step: momentum buffers and the weights from here on
    with torch.no_grad():
        weights = hdkd.weights()
    twin_opt = sgd(twin)
    twin_opt.load_state_dict(copy.deepcopy(hdkd.optimizer.state_dict()))

    def plain() -> float:
        twin_opt.zero_grad(set_to_none=True)
        loss = criterion(twin(x), y, weights=weights)
        loss.backward()
        twin_opt.step()
        return float(loss.detach())

    def no_update() -> float:
        return hdkd.step(x, y)["loss"]

    times: dict[str, list[float]] = {"no_update": [], "plain": []}

    def run(which: str, fn: Callable[[], float]) -> None:
        start = CLOCK()
        fn()
        _sync()
        times[which].append(CLOCK() - start)

    for _ in range(2):  # warm-up, both
        plain()
        no_update()
    benchmark.pedantic(lambda: run("no_update", no_update), setup=lambda: run("plain", plain), rounds=rounds,
                       iterations=1)
    ratio = statistics.median(times["no_update"]) / statistics.median(times["plain"])
    benchmark.group = "hdkd_step-no-update"
    benchmark.extra_info.update(ratio=ratio, clock=CLOCK.__name__, model=name)
    _RATIOS[name]["k"] = k
    _RATIOS[name]["no_update"] = ratio
