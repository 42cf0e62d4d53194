"""Multi-exit models: output shapes, the published configurations, gradients, attach_exits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from hdkd_fast.evaluation import exit_costs
from hdkd_fast.models import MSDNet, MultiExitModule, MultiExitResNet, attach_exits
from hdkd_fast.models.msdnet import MSDNLayer
from hdkd_fast.models.resnet import BasicBlock


def images(batch: int, size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class PlainResNet(nn.Module):
    """A single-exit CIFAR ResNet-10 written the usual way (stem, layer1..layer4, avgpool, fc)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2))
        self.layer4 = nn.Sequential(BasicBlock(64, 64, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def check_logits(out: list[Tensor], num_exits: int, batch: int, num_classes: int) -> None:
    assert isinstance(out, list) and len(out) == num_exits
    for z in out:
        assert z.shape == (batch, num_classes)
        assert torch.isfinite(z).all()


# --- MSDNet -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "size", "batch"),
    [("cifar", 32, 2), ("cifar", 224, 1), ("imagenet", 224, 1), ("imagenet", 32, 2)],
)
def test_msdnet_presets_return_one_logits_per_block(preset: str, size: int, batch: int) -> None:
    model = MSDNet.cifar(100) if preset == "cifar" else MSDNet.imagenet(1000)
    num_classes, num_exits = (100, 7) if preset == "cifar" else (1000, 5)
    assert model.num_exits == num_exits
    with torch.no_grad():
        logits, features = model(images(batch, size), return_features=True)
    check_logits(logits, num_exits, batch, num_classes)
    assert len(features) == num_exits and all(f.dim() == 4 and f.shape[0] == batch for f in features)


def test_msdnet_configurations_follow_the_paper() -> None:
    """Layer counts, scales and parameter counts of the official code (kalviny/MSDNet-PyTorch)."""
    cifar, imagenet = MSDNet.cifar(100), MSDNet.imagenet(1000)
    layers = [[m for m in block if isinstance(m, MSDNLayer)] for block in cifar.blocks]
    assert [len(b) for b in layers] == [4, 2, 2, 2, 2, 2, 2]  # base 4, step 2
    assert [len(b) for b in ([m for m in block if isinstance(m, MSDNLayer)] for block in imagenet.blocks)] == [4] * 5
    scales = [len(b[-1].layers) for b in layers]  # scales at each exit: 16 layers, one dropped after layers 6, 12
    assert scales == [3, 3, 2, 2, 2, 1, 1]
    # counts checked against the official implementation at the same configuration (see the docstrings)
    assert sum(p.numel() for p in cifar.parameters()) == 3_067_960
    assert sum(p.numel() for p in MSDNet.cifar(10).parameters()) == 2_986_690
    assert sum(p.numel() for p in imagenet.parameters()) == 23_958_440


def test_msdnet_documented_flops() -> None:
    costs = exit_costs(MSDNet.cifar(100), (1, 3, 32, 32)) / 1e6
    expected = torch.tensor([29.9, 50.5, 73.6, 91.9, 113.9, 133.1, 151.0], dtype=torch.float64)
    torch.testing.assert_close(costs, expected, atol=0.051, rtol=0)


def test_msdnet_lin_grow_and_overrides() -> None:
    model = MSDNet.cifar(10, n_blocks=5, step=1, base=1, step_mode="lin_grow")
    layers = [sum(isinstance(m, MSDNLayer) for m in block) for block in model.blocks]
    assert layers == [1, 2, 3, 4, 5]
    check_logits(model(images(2, 32)), 5, 2, 10)


# --- MultiExitResNet ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "exits", "num_exits"),
    [(18, "stages", 4), (18, "blocks", 8), (34, "blocks", 16), (50, "stages", 4), (50, "blocks", 16)],
)
def test_resnet_exit_counts_and_shapes(depth: int, exits: str, num_exits: int) -> None:
    cifar = MultiExitResNet(depth, 10, exits=exits, stem="cifar")  # type: ignore[arg-type]
    assert cifar.num_exits == num_exits
    check_logits(cifar(images(2, 32)), num_exits, 2, 10)
    if (depth, exits) in ((18, "stages"), (34, "blocks"), (50, "blocks")):  # every depth once at 224×224
        imagenet = MultiExitResNet(depth, 1000, exits=exits).eval()  # type: ignore[arg-type]
        with torch.no_grad():
            check_logits(imagenet(images(1, 224)), num_exits, 1, 1000)


def test_resnet_features_are_stage_outputs() -> None:
    model = MultiExitResNet(50, 10, stem="cifar")
    _, features = model(images(2, 32), return_features=True)
    assert [tuple(f.shape) for f in features] == [(2, 256, 32, 32), (2, 512, 16, 16), (2, 1024, 8, 8), (2, 2048, 4, 4)]


# --- gradients ----------------------------------------------------------------------------------------------


def attached_resnet() -> MultiExitModule:
    return attach_exits(PlainResNet(), ["layer1", "layer2", "layer3"], 10, input_shape=(1, 3, 32, 32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: MSDNet.cifar(10),
        lambda: MSDNet.imagenet(10, n_blocks=2, step=2, base=2, n_channels=8, growth_rate=4),
        lambda: MultiExitResNet(18, 10, exits="blocks", stem="cifar"),
        lambda: MultiExitResNet(50, 10, exits="stages", stem="imagenet"),
        attached_resnet,
    ],
    ids=["msdnet-cifar", "msdnet-imagenet-small", "resnet18-blocks", "resnet50-stages", "attached-resnet"],
)
def test_gradients_reach_every_parameter(make: object) -> None:
    torch.manual_seed(0)
    model = make()  # type: ignore[operator]
    logits = model(images(2, 32))
    y = torch.tensor([1, 3])
    sum(nn.functional.cross_entropy(z, y) for z in logits).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


# --- attach_exits -------------------------------------------------------------------------------------------


def test_attach_exits_on_sequential_keeps_the_final_output() -> None:
    torch.manual_seed(0)
    backbone = small_cnn().eval()
    x = images(4, 32)
    with torch.no_grad():
        expected = backbone(x)
    model = attach_exits(backbone, ["2", "5"], 10, input_shape=(1, 3, 32, 32)).eval()
    with torch.no_grad():
        out, features = model(x, return_features=True)
        alone = backbone(x)
    check_logits(out, 3, 4, 10)
    assert torch.equal(out[-1], expected) and torch.equal(alone, expected)  # hooks are inert on their own
    assert [tuple(f.shape) for f in features] == [(4, 8, 32, 32), (4, 16, 16, 16), (4, 10)]


def test_attach_exits_on_resnet_keeps_the_final_output() -> None:
    torch.manual_seed(0)
    backbone = PlainResNet().eval()
    x = images(3, 32)
    with torch.no_grad():
        expected = backbone(x)
        model = attach_exits(backbone, ["layer1", "layer2", "layer3"], 10, input_shape=(1, 3, 32, 32))
        out = model(x)
    check_logits(out, 4, 3, 10)
    assert torch.equal(out[-1], expected)
    model.remove_hooks()
    assert all(not m._forward_hooks for m in backbone.modules())


def test_attach_exits_on_torchvision_resnet() -> None:
    models = pytest.importorskip("torchvision.models")
    backbone = models.resnet18(num_classes=10).eval()
    x = images(1, 64)
    with torch.no_grad():
        expected = backbone(x)
        out = attach_exits(backbone, ["layer1", "layer2", "layer3"], 10, input_shape=(1, 3, 64, 64))(x)
    assert torch.equal(out[-1], expected)


def test_attach_exits_without_final_stops_the_backbone() -> None:
    backbone = small_cnn()
    calls = []
    backbone[6].register_forward_hook(lambda *args: calls.append(1))
    model = attach_exits(backbone, ["2", "5"], 7, include_final=False, input_shape=(1, 3, 16, 16))
    check_logits(model(images(2, 16)), 2, 2, 7)
    assert model.num_exits == 2 and not calls


def test_attach_exits_custom_heads_and_deepcopy() -> None:
    torch.manual_seed(0)
    backbone = small_cnn()
    model = attach_exits(backbone, ["2"], 10, head=lambda name: nn.Sequential(nn.Flatten(), nn.LazyLinear(10)))
    heads = [nn.Sequential(nn.Flatten(), nn.LazyLinear(10)) for _ in range(2)]
    listed = attach_exits(small_cnn(), ["2", "5"], 10, head=heads)
    x = images(2, 8)
    check_logits(model(x), 2, 2, 10)
    check_logits(listed(x), 3, 2, 10)
    twin = copy.deepcopy(model)  # the hooks of the copy feed the copy's heads
    with torch.no_grad():
        twin.heads[0][1].weight.zero_()
        twin.heads[0][1].bias.fill_(1.0)
    assert torch.equal(twin(x)[0], torch.ones(2, 10))
    assert not torch.equal(model(x)[0], torch.ones(2, 10))


# --- bad input ----------------------------------------------------------------------------------------------


def test_model_argument_errors() -> None:
    with pytest.raises(ValueError, match="depth"):
        MultiExitResNet(19, 10)
    with pytest.raises(ValueError, match="exits"):
        MultiExitResNet(18, 10, exits="layers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stem"):
        MultiExitResNet(18, 10, stem="mnist")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        MSDNet.cifar(0)
    with pytest.raises(TypeError, match="num_classes"):
        MultiExitResNet(18, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gr_factor"):
        MSDNet(10, gr_factor=(1, 2), bn_factor=(1, 2, 4))
    with pytest.raises(ValueError, match="step_mode"):
        MSDNet(10, step_mode="odd")  # type: ignore[arg-type]


def test_attach_exits_argument_errors() -> None:
    with pytest.raises(TypeError, match="backbone"):
        attach_exits(lambda x: x, ["0"], 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at"):
        attach_exits(small_cnn(), "2", 10)
    with pytest.raises(ValueError, match="at"):
        attach_exits(small_cnn(), [], 10)
    with pytest.raises(ValueError, match=r"at\[1\] = 'layer9'"):
        attach_exits(small_cnn(), ["2", "layer9"], 10)
    with pytest.raises(ValueError, match="repeat"):
        attach_exits(small_cnn(), ["2", "2"], 10)
    with pytest.raises(ValueError, match="head"):
        attach_exits(small_cnn(), ["2", "5"], 10, head=[nn.Identity()])
    with pytest.raises(TypeError, match="head"):
        attach_exits(small_cnn(), ["2"], 10, head=nn.Linear(8, 10))
    with pytest.raises(ValueError, match="input_shape"):
        attach_exits(small_cnn(), ["2"], 10, input_shape=(1, 3, 0, 32))


def test_attach_exits_runtime_errors() -> None:
    with pytest.raises(ValueError, match="order"):
        attach_exits(small_cnn(), ["5", "2"], 10)(images(2, 8))
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Conv2d(4, 4, 3), shared, nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match="once per forward"):
        attach_exits(twice, ["1"], 10)(images(2, 8))
    with pytest.raises(ValueError, match="include_final"):
        attach_exits(small_cnn(num_classes=5), ["2"], 10)(images(2, 8))
