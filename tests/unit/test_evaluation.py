"""exit_costs, anytime_accuracy, budgeted_accuracy and the plots."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from hdkd_fast.evaluation import (
    BUDGET_PROTOCOLS,
    anytime_accuracy,
    budget_q_grid,
    budgeted_accuracy,
    exit_costs,
    geometric_exit_distribution,
    plot_budgeted_accuracy,
    plot_exit_accuracy,
)
from hdkd_fast.inference import EarlyExit, confidence
from hdkd_fast.models import MSDNet, MultiExitResNet, attach_exits

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def probs_to_logits(p: list[list[float]]) -> Tensor:
    """Logits whose softmax is exactly the given rows (up to rounding): log p."""
    return torch.tensor(p, dtype=torch.float64).log()


def two_class(conf: list[float], label_is_top: list[bool]) -> tuple[Tensor, list[int]]:
    """Logits [N, 2] with max probability ``conf`` on class 0, and labels that make exit right or wrong."""
    return probs_to_logits([[c, 1 - c] for c in conf]), [0 if ok else 1 for ok in label_is_top]


# --- exit_costs ---------------------------------------------------------------------------------------------


def test_exit_costs_by_hand() -> None:
    """Linear layers: 2·in·out FLOPs per sample; an exit costs the backbone so far plus every head so far."""
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model = attach_exits(mlp, ["1", "3"], 4, input_shape=(1, 8))
    backbone = [2 * 8 * 16, 2 * 16 * 16, 2 * 16 * 4]
    head = 2 * 16 * 4
    expected = [backbone[0] + head, backbone[0] + backbone[1] + 2 * head, sum(backbone) + 2 * head]
    assert exit_costs(model, (1, 8)).tolist() == expected
    assert exit_costs(model, (3, 8)).tolist() == expected  # per sample


@pytest.mark.parametrize(
    "make",
    [
        lambda: MSDNet.cifar(10, n_blocks=3, base=2, step=2, n_channels=8),
        lambda: MultiExitResNet(18, 10, exits="blocks", stem="cifar"),
        lambda: attach_exits(MultiExitResNet(18, 10), ["blocks.0", "blocks.1"], 10, include_final=False),
    ],
    ids=["msdnet", "resnet-blocks", "attached"],
)
def test_exit_costs_positive_and_strictly_increasing(make: object) -> None:
    model = make()  # type: ignore[operator]
    model.train()
    costs = exit_costs(model, (1, 3, 32, 32))
    assert costs.shape == (model.num_exits,) and costs.dtype == torch.float64
    assert (costs > 0).all() and (costs.diff() > 0).all()
    assert model.training  # the mode is restored


def test_exit_costs_errors() -> None:
    with pytest.raises(TypeError, match="model"):
        exit_costs(nn.Linear(3, 3), (1, 3))  # type: ignore[arg-type]
    model = MultiExitResNet(18, 10)
    with pytest.raises(ValueError, match="input_shape"):
        exit_costs(model, (3, 32, 0))
    with pytest.raises(ValueError, match="input_shape"):
        exit_costs(model, 32)  # type: ignore[arg-type]


# --- anytime_accuracy ---------------------------------------------------------------------------------------


def test_anytime_accuracy_by_hand() -> None:
    z0 = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [0, 1, 2, 3, 4, 5, 6], [1, 1.5, 0.1, 0.2, 0.3, 0.4, 0.5]])
    z1 = z0.flip(1)
    y = torch.tensor([0, 1, 6])
    # ranks of the label: exit 0: 1, 6, 3; exit 1: 7, 2, 2
    acc = anytime_accuracy([z0, z1], y)
    assert acc.top1.tolist() == [1 / 3, 0.0]
    assert acc.top5.tolist() == [2 / 3, 2 / 3]
    stacked = anytime_accuracy(torch.stack([z0, z1]), y)
    assert torch.equal(stacked.top1, acc.top1) and torch.equal(stacked.top5, acc.top5)


def test_anytime_accuracy_few_classes() -> None:
    z = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(0))
    acc = anytime_accuracy(z, torch.arange(10) % 4)
    assert torch.equal(acc.top5, torch.ones(3, dtype=torch.float64))  # top-4 of 4 classes


def test_anytime_accuracy_errors() -> None:
    z = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="y"):
        anytime_accuracy(z, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="y"):
        anytime_accuracy(z, torch.tensor([0, 1, 2, 3, 3]) + 1)
    with pytest.raises(TypeError, match="y"):
        anytime_accuracy(z, torch.zeros(5))
    with pytest.raises(ValueError, match="logits"):
        anytime_accuracy(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits\[1\]"):
        anytime_accuracy([torch.randn(5, 3), torch.randn(5, 4)], torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        anytime_accuracy([torch.full((5, 3), math.nan)], torch.zeros(5, dtype=torch.long))


# --- budgeted_accuracy --------------------------------------------------------------------------------------


def test_budgeted_accuracy_by_hand() -> None:
    """K = 3, q = 1: p = (1/3, 1/3, 1/3), so 2 of the 6 validation samples should leave at each exit."""
    val0, _ = two_class([0.95, 0.90, 0.85, 0.80, 0.75, 0.70], [True] * 6)
    val1, _ = two_class([0.99, 0.99, 0.60, 0.88, 0.65, 0.92], [True] * 6)
    val2, _ = two_class([0.6] * 6, [True] * 6)
    # exit 0: τ0 = 0.90 (2nd highest); exit 1: among samples 2..5, τ1 = 0.88 (2nd highest); exit 2 takes the rest
    test0, y0 = two_class([0.91, 0.55, 0.95, 0.60], [True, True, True, False])
    test1, _ = two_class([0.55, 0.89, 0.70, 0.70], [True, False, True, True])
    test2, _ = two_class([0.60, 0.60, 0.60, 0.60], [True, True, False, True])
    # test exits: sample 0 -> 0 (0.91 ≥ 0.90), 1 -> 1 (0.89 ≥ 0.88), 2 -> 0, 3 -> 2; correct: yes, no, yes, yes
    curve = budgeted_accuracy(
        [val0, val1, val2],
        torch.zeros(6, dtype=torch.long),
        [test0, test1, test2],
        torch.tensor(y0),
        [1.0, 2.0, 4.0],
        q=[1.0],
    )
    torch.testing.assert_close(curve.thresholds[0, :2], torch.tensor([0.90, 0.88], dtype=torch.float64))
    assert curve.thresholds[0, 2] == -math.inf
    assert curve.exit_fraction[0].tolist() == [0.5, 0.25, 0.25]
    assert curve.cost.tolist() == [(1 + 2 + 1 + 4) / 4]
    assert curve.accuracy.tolist() == [0.75]
    assert curve.val_accuracy.tolist() == [1.0]
    assert curve.q.tolist() == [1.0]


def exact_quota(n: int, q: float, k: int, num_exits: int) -> int:
    """⌊N·p_k⌋ in rational arithmetic, q read as the decimal it prints as (0.4 = 2/5)."""
    ratio = Fraction(repr(q))
    return math.floor(n * ratio ** (k + 1) / sum(ratio ** m for m in range(1, num_exits + 1)))


def official_dynamic_eval(
    val_score: Tensor, test_score: Tensor, test_correct: Tensor, q: float, costs: Tensor
) -> tuple[float, float]:
    """Sample-by-sample port of Tester.dynamic_eval_find_threshold / _with_threshold (MSDNet-PyTorch), with
    the quota ⌊N·p_k⌋ in exact arithmetic (the original's float32 p_k can round it down)."""
    m, n = val_score.shape
    order = val_score.argsort(dim=1, descending=True)
    filtered = torch.zeros(n)
    thresholds = torch.full((m,), 1e8, dtype=torch.float64)
    for k in range(m - 1):
        count, out_n = 0, exact_quota(n, q, k, m)
        for i in range(n):
            idx = order[k][i]
            if filtered[idx] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = val_score[k][idx]
                    break
        filtered += (val_score[k] >= thresholds[k]).double()
    thresholds[m - 1] = -1e8
    correct, cost = 0, 0.0
    for i in range(test_score.shape[1]):
        for k in range(m):
            if test_score[k][i] >= thresholds[k]:
                correct += int(test_correct[k][i])
                cost += float(costs[k])
                break
    return cost / test_score.shape[1], correct / test_score.shape[1]


@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
def test_budgeted_accuracy_matches_the_official_loop(criterion: str) -> None:
    g = torch.Generator().manual_seed(1)
    k, c = 4, 5
    val = torch.randn(k, 60, c, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, k)[:, None, None]
    test = torch.randn(k, 45, c, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, k)[:, None, None]
    val_y, test_y = torch.randint(c, (60,), generator=g), torch.randint(c, (45,), generator=g)
    costs = torch.tensor([1.0, 2.5, 3.0, 7.0], dtype=torch.float64)
    q = torch.tensor([0.05, 0.3, 0.7, 1.0, 1.4, 2.0], dtype=torch.float64)
    curve = budgeted_accuracy(val, val_y, test, test_y, costs, criterion, q=q)  # type: ignore[arg-type]
    val_score = torch.stack([confidence(z, criterion) for z in val])  # type: ignore[arg-type]
    test_score = torch.stack([confidence(z, criterion) for z in test])  # type: ignore[arg-type]
    test_correct = test.argmax(dim=2) == test_y
    for j, ratio in enumerate(q.tolist()):
        cost, acc = official_dynamic_eval(val_score, test_score, test_correct, ratio, costs)
        assert curve.cost[j].item() == pytest.approx(cost)
        assert curve.accuracy[j].item() == pytest.approx(acc)


def test_budgeted_curve_is_monotone_when_later_exits_are_better() -> None:
    """Later exits right on a superset of the samples (ranked by a shared difficulty): more cost, more accuracy."""
    g = torch.Generator().manual_seed(0)
    k, n, c = 5, 2000, 10

    def outputs(n: int) -> tuple[Tensor, Tensor]:
        easiness = torch.rand(n, generator=g, dtype=torch.float64)
        y = torch.randint(c, (n,), generator=g)
        logits = torch.randn(k, n, c, generator=g, dtype=torch.float64)
        for exit_ in range(k):  # exit k knows the samples easier than 1 - (k+1)/K·0.9
            knows = easiness > 1 - 0.9 * (exit_ + 1) / k
            logits[exit_, knows, y[knows]] += 6.0
        return logits, y

    (val, val_y), (test, test_y) = outputs(n), outputs(n)
    curve = budgeted_accuracy(val, val_y, test, test_y, [1.0, 2.0, 3.0, 4.0, 5.0])
    order = curve.cost.argsort()
    assert (curve.accuracy[order].diff() >= 0).all()
    assert (curve.cost.diff() > 0).all()  # cost grows with q
    assert curve.accuracy[-1] > curve.accuracy[0] + 0.2


def test_fitted_thresholds_drive_early_exit() -> None:
    """budgeted_accuracy's thresholds, used by EarlyExit on the same data, give the same exit fractions."""
    torch.manual_seed(0)
    model = MSDNet.cifar(10, n_blocks=4, step=1, base=1, n_channels=8, growth_rate=4).double().eval()
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = torch.zeros(40, dtype=torch.long)
    curve = budgeted_accuracy(logits, y, logits, y, [1.0, 2.0, 3.0, 4.0], q=[0.5, 1.0, 2.0])
    for thresholds, fraction in zip(curve.thresholds, curve.exit_fraction, strict=True):
        exits = EarlyExit(model, thresholds)(x).exits
        assert torch.bincount(exits, minlength=4).double().div(40).tolist() == fraction.tolist()


@pytest.mark.parametrize("n", [203, 100, 60, 37])
def test_budget_exit_quotas_are_exact(n: int) -> None:
    """The number of validation samples leaving at exit k < K−1 is exactly ⌊N·p_k⌋, also where N·p_k is an
    integer that a float64 softmax rounds below (K = 4, N = 203, q = 0.4: 125, not 124)."""
    num_exits = 4
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(num_exits, n, 6, generator=g, dtype=torch.float64)  # distinct confidences: no ties
    y = torch.randint(6, (n,), generator=g)
    q = budget_q_grid("imta").tolist()
    curve = budgeted_accuracy(logits, y, logits, y, [1.0, 2.0, 3.0, 4.0], q=q)
    left = (curve.exit_fraction * n).round().long()  # the thresholds applied to the same samples
    for j, ratio in enumerate(q):
        assert left[j, :-1].tolist() == [exact_quota(n, ratio, k, num_exits) for k in range(num_exits - 1)], ratio
    if n == 203:
        assert left[q.index(0.4), 0] == 125
    exact = [[float(Fraction(repr(r)) ** k / sum(Fraction(repr(r)) ** m for m in range(1, 5))) for k in range(1, 5)]
             for r in q]
    torch.testing.assert_close(geometric_exit_distribution(torch.tensor(q, dtype=torch.float64), num_exits),
                               torch.tensor(exact, dtype=torch.float64), rtol=1e-14, atol=0)


def test_budget_protocols() -> None:
    """Both published q grids, q = p/20: IMTA's loop p = 1 … 40 (the default) and MSDNet's p = 1 … 39."""
    assert tuple(BUDGET_PROTOCOLS) == ("imta", "msdnet")
    assert budget_q_grid("imta").tolist() == [p / 20 for p in range(1, 41)]
    assert budget_q_grid("msdnet").tolist() == [p / 20 for p in range(1, 40)]
    z, y = torch.randn(3, 30, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(30, dtype=torch.long)
    costs = [1.0, 2.0, 3.0]
    assert budgeted_accuracy(z, y, z, y, costs).q.tolist() == budget_q_grid("imta").tolist()
    msdnet = budgeted_accuracy(z, y, z, y, costs, q="msdnet")
    assert msdnet.q.tolist() == budget_q_grid("msdnet").tolist()
    assert torch.equal(msdnet.accuracy, budgeted_accuracy(z, y, z, y, costs).accuracy[:39])
    with pytest.raises(ValueError, match=r"q must be .*'imta', 'msdnet'"):
        budgeted_accuracy(z, y, z, y, costs, q="official")
    with pytest.raises(ValueError, match="protocol"):
        budget_q_grid("official")


def test_budgeted_accuracy_errors() -> None:
    z, y = torch.randn(3, 8, 4), torch.zeros(8, dtype=torch.long)
    costs = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="test_logits"):
        budgeted_accuracy(z, y, z[:2], y, costs)
    with pytest.raises(ValueError, match="test_logits"):
        budgeted_accuracy(z, y, z[..., :3], y, costs)
    with pytest.raises(ValueError, match="costs"):
        budgeted_accuracy(z, y, z, y, [1.0, 2.0])
    with pytest.raises(ValueError, match="costs"):
        budgeted_accuracy(z, y, z, y, [1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="criterion"):
        budgeted_accuracy(z, y, z, y, costs, "margin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="q"):
        budgeted_accuracy(z, y, z, y, costs, q=[0.5, 0.0])
    with pytest.raises(ValueError, match="val_y"):
        budgeted_accuracy(z, y[:5], z, y, costs)
    with pytest.raises(ValueError, match="test_y"):
        budgeted_accuracy(z, y, z, y + 4, costs)
    with pytest.raises(TypeError, match="val_logits"):
        budgeted_accuracy("logits", y, z, y, costs)  # type: ignore[arg-type]


# --- plots --------------------------------------------------------------------------------------------------


def test_plots_write_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 50, 10, generator=g), torch.randint(10, (50,), generator=g)
    acc = anytime_accuracy(z, y)
    costs = [1e6, 2e6, 3e6]
    curve = budgeted_accuracy(z, y, z, y, costs)
    by_criterion = {"maxprob": curve, "entropy": budgeted_accuracy(z, y, z, y, costs, "entropy")}
    paths = [
        plot_exit_accuracy(acc, tmp_path / "exits.png"),
        plot_exit_accuracy(acc, tmp_path / "exits_flops.png", costs=costs, title="per exit"),
        plot_budgeted_accuracy(curve, tmp_path / "budget.png", exit_costs=costs, exit_accuracy=acc),
        plot_budgeted_accuracy(by_criterion, str(tmp_path / "criteria.png")),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_plot_errors(tmp_path: Path) -> None:
    z, y = torch.randn(2, 6, 3), torch.zeros(6, dtype=torch.long)
    acc = anytime_accuracy(z, y)
    curve = budgeted_accuracy(z, y, z, y, [1.0, 2.0])
    with pytest.raises(TypeError, match="accuracy"):
        plot_exit_accuracy(acc.top1, tmp_path / "x.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="costs"):
        plot_exit_accuracy(acc, tmp_path / "x.png", costs=[1.0])
    with pytest.raises(TypeError, match="curves"):
        plot_budgeted_accuracy({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="together"):
        plot_budgeted_accuracy(curve, tmp_path / "x.png", exit_accuracy=acc)
