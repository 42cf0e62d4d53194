"""ResNet-18/34/50 (He et al., CVPR 2016) with an exit head after every stage or every residual block.

Blocks follow torchvision's ``resnet.py`` (ResNet v1.5: the stride of a bottleneck block sits on its
3×3 convolution; 1×1 conv-BN projection shortcuts where the shape changes). ``stem="imagenet"`` is the
7×7/2 convolution and 3×3/2 max-pool of the paper; ``stem="cifar"`` the 3×3/1 convolution without
pooling that CIFAR early-exit work uses on 32×32 images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from .._validation import check_choice, check_positive_int
from .base import PoolLinearHead, StagedMultiExit, check_num_classes, init_conv_bn_linear


class BasicBlock(nn.Module):
    """Two 3×3 convolutions: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, n_in: int, width: int, stride: int) -> None:
        super().__init__()
        n_out = width * self.expansion
        self.conv1 = nn.Conv2d(n_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, n_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(n_in, n_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, plus the shortcut."""

    expansion = 4

    def __init__(self, n_in: int, width: int, stride: int) -> None:
        super().__init__()
        n_out = width * self.expansion
        self.conv1 = nn.Conv2d(n_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, n_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(n_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(n_in, n_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(n_in: int, n_out: int, stride: int) -> nn.Module:
    if stride == 1 and n_in == n_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(n_in, n_out, 1, stride, bias=False), nn.BatchNorm2d(n_out))


_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class MultiExitResNet(StagedMultiExit):
    """ResNet-``depth`` with a pool + linear exit after every stage (K = 4) or every block.

    With ``exits="blocks"`` K is the number of residual blocks (8 for ResNet-18, 16 for ResNet-34/50).
    The last exit is the usual ResNet classifier (global average pooling, linear), so the network
    without its early heads is the standard ResNet; each earlier head is the same pool + linear on
    that stage's (block's) output, which is also the feature ``return_features=True`` returns.

    Measured with :func:`hdkd_fast.evaluation.exit_costs` (``exits="stages"``, 1000 classes, one
    3×224×224 image; FLOPs = 2 per multiply-add): ResNet-18 12.14 M parameters, cumulative GFLOPs
    1.16, 1.98, 2.81, 3.63; ResNet-34 22.25 M, 1.62, 3.37, 6.04, 7.33; ResNet-50 27.35 M,
    1.57, 3.63, 6.56, 8.18.

    Args:
        depth: 18, 34 or 50.
        num_classes: number of classes.
        exits: ``"stages"`` or ``"blocks"``.
        stem: ``"imagenet"`` (7×7/2 conv + max-pool) or ``"cifar"`` (3×3/1 conv, no pooling).
        in_channels: channels of the input images (3 for RGB).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        exits: Literal["stages", "blocks"] = "stages",
        stem: Literal["imagenet", "cifar"] = "imagenet",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_choice(depth, "depth", tuple(_LAYOUTS))
        num_classes = check_num_classes(num_classes)
        check_choice(exits, "exits", ("stages", "blocks"))
        check_choice(stem, "stem", ("imagenet", "cifar"))
        in_channels = check_positive_int(in_channels, "in_channels")
        block_type, counts = _LAYOUTS[depth]

        first: list[nn.Module]
        if stem == "imagenet":
            first = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
            first.append(nn.MaxPool2d(3, 2, 1))
        else:
            first = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]

        groups: list[list[nn.Module]] = []  # the modules of each stage (exits="stages") or block
        widths: list[int] = []  # their output channels
        n_in = 64
        for stage, (count, width) in enumerate(zip(counts, (64, 128, 256, 512), strict=True)):
            stage_blocks: list[nn.Module] = []
            for i in range(count):
                stage_blocks.append(block_type(n_in, width, 2 if stage > 0 and i == 0 else 1))
                n_in = width * block_type.expansion
            groups += [stage_blocks] if exits == "stages" else [[b] for b in stage_blocks]
            widths += [n_in] * (1 if exits == "stages" else count)
        groups[0] = first + groups[0]

        self.blocks = nn.ModuleList(nn.Sequential(*group) for group in groups)
        self.heads = nn.ModuleList(PoolLinearHead(num_classes, w) for w in widths)
        init_conv_bn_linear(self)

    def stages(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        return list(zip(self.blocks, self.heads, strict=True))
