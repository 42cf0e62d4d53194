"""EarlyExit: same answers as computing every exit, less work, clear errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hdkd_fast.inference import EarlyExit, confidence
from hdkd_fast.models import MSDNet, MultiExitModule, MultiExitResNet, attach_exits
from hdkd_fast.models.resnet import BasicBlock

N = 24


def images(batch: int, size: int = 16, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)


def sequential_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layer3(self.layer2(self.layer1(self.stem(x)))).mean(dim=(2, 3)))


def build(kind: str) -> tuple[MultiExitModule, list[nn.Module]]:
    """A float64 model in eval mode and the modules whose input rows show how much work was done."""
    torch.manual_seed(0)
    if kind == "msdnet":
        msd = MSDNet.cifar(10, n_blocks=4, step=1, base=1, n_channels=8, growth_rate=4)
        model: MultiExitModule = msd
        blocks = list(msd.blocks)
    elif kind == "resnet":
        res = MultiExitResNet(18, 10, exits="blocks", stem="cifar")
        model, blocks = res, list(res.blocks)
    elif kind == "sequential":
        seq = sequential_cnn()
        model, blocks = attach_exits(seq, ["2", "4"], 10, input_shape=(1, 3, 16, 16)), [seq[3], seq[5]]
    else:
        tiny = TinyResNet()
        model = attach_exits(tiny, ["layer1", "layer2"], 10, input_shape=(1, 3, 16, 16))
        blocks = [tiny.layer2, tiny.layer3]
    return model.double().eval(), blocks


def first_confident(logits: list[Tensor], thresholds: Tensor, criterion: str) -> tuple[Tensor, Tensor]:
    """The reference: every exit computed, then each sample's first exit whose confidence passes."""
    score = torch.stack([confidence(z, criterion) for z in logits])  # type: ignore[arg-type]
    bound = thresholds if criterion == "maxprob" else -thresholds
    passes = score >= bound[:, None]
    passes[-1] = True
    exits = torch.tensor([int(torch.nonzero(passes[:, i])[0]) for i in range(passes.shape[1])])
    predictions = torch.stack([logits[k][i].argmax() for i, k in enumerate(exits.tolist())])
    return predictions, exits


def quantile_thresholds(logits: list[Tensor], criterion: str, level: float) -> Tensor:
    score = torch.stack([confidence(z, criterion) for z in logits])  # type: ignore[arg-type]
    bound = score.quantile(level, dim=1)
    return bound if criterion == "maxprob" else -bound


def count_rows(modules: list[nn.Module]) -> Callable[[], list[int]]:
    rows = [0] * len(modules)

    def counter(i: int) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[object, ...]) -> None:
            first = args[0]
            rows[i] += int((first[0] if isinstance(first, list) else first).shape[0])  # type: ignore[union-attr]

        return pre_hook

    for i, m in enumerate(modules):
        m.register_forward_pre_hook(counter(i))
    return lambda: list(rows)


@pytest.mark.parametrize("kind", ["msdnet", "resnet", "sequential", "attached-resnet"])
@pytest.mark.parametrize("criterion", ["maxprob", "entropy"])
def test_early_exit_equals_first_confident_exit(kind: str, criterion: str) -> None:
    model, _ = build(kind)
    x = images(N)
    with torch.no_grad():
        logits = model(x)
    thresholds = quantile_thresholds(logits, criterion, 0.6)
    expected_pred, expected_exit = first_confident(logits, thresholds, criterion)
    result = EarlyExit(model, thresholds, criterion)(x)  # type: ignore[arg-type]
    assert torch.equal(result.exits, expected_exit)
    assert torch.equal(result.predictions, expected_pred)
    torch.testing.assert_close(result.logits, torch.stack([logits[k][i] for i, k in enumerate(expected_exit)]))
    assert len(set(expected_exit.tolist())) >= 3  # the case really spreads samples over exits


@pytest.mark.parametrize("kind", ["msdnet", "resnet", "sequential", "attached-resnet"])
def test_early_exit_skips_later_blocks(kind: str) -> None:
    model, blocks = build(kind)
    x = images(N)
    with torch.no_grad():
        logits = model(x)
    thresholds = quantile_thresholds(logits, "maxprob", 0.5)
    rows = count_rows(blocks)
    exits = EarlyExit(model, thresholds)(x).exits
    # the block after exit k only ran on the samples still there; a staged model's block 0 runs before exit 0
    offset = 1 if kind in ("msdnet", "resnet") else 0
    expected = [int((exits >= k + 1 - offset).sum()) for k in range(len(blocks))]
    assert rows() == expected
    assert expected[-1] < N


def test_all_confident_at_first_exit_runs_no_later_block() -> None:
    model, blocks = build("attached-resnet")
    rows = count_rows(blocks)
    result = EarlyExit(model, [0.0, 0.0, 0.0])(images(5))
    assert result.exits.tolist() == [0] * 5 and rows() == [0, 0]


def test_nobody_confident_gives_the_final_exit() -> None:
    model, _ = build("msdnet")
    x = images(6)
    result = EarlyExit(model, [2.0] * model.num_exits)(x)
    with torch.no_grad():
        final = model(x)[-1]
    assert result.exits.tolist() == [model.num_exits - 1] * 6
    assert torch.equal(result.predictions, final.argmax(dim=1))


def test_training_mode_and_batchnorm_statistics_are_kept() -> None:
    model, _ = build("resnet")
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    EarlyExit(model, [0.5] * model.num_exits)(images(4))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_early_exit_errors() -> None:
    model, _ = build("sequential")
    with pytest.raises(ValueError, match="thresholds"):
        EarlyExit(model, [0.5, 0.5])
    with pytest.raises(ValueError, match="thresholds"):
        EarlyExit(model, [0.5, float("nan"), 0.5])
    with pytest.raises(ValueError, match="thresholds"):
        EarlyExit(model, torch.zeros(3, 1))
    with pytest.raises(TypeError, match="thresholds"):
        EarlyExit(model, [0.5, "high", 0.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="criterion"):
        EarlyExit(model, [0.5] * 3, criterion="margin")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        EarlyExit(sequential_cnn(), [0.5] * 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x"):
        EarlyExit(model, [0.5] * 3)(images(0))


def test_exit_inside_a_residual_block_is_reported() -> None:
    torch.manual_seed(0)
    tiny = TinyResNet()
    model = attach_exits(tiny, ["layer1.conv1", "layer2"], 10, input_shape=(1, 3, 16, 16)).double()
    x = images(8, 16)
    with torch.no_grad():
        thresholds = quantile_thresholds(model(x), "maxprob", 0.5)
    with pytest.raises(RuntimeError, match="shortcut"):
        EarlyExit(model, thresholds)(x)
