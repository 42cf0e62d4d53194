"""Models by name, for the command line: ``build_model("msdnet", num_classes, input_shape)``.

| name | model |
|---|---|
| ``msdnet`` | :meth:`MSDNet.cifar` for images up to 64 pixels high, :meth:`MSDNet.imagenet` above |
| ``msdnet-cifar`` / ``msdnet-imagenet`` / ``msdnet-tiny`` | the presets of :class:`MSDNet` |
| ``resnet18`` / ``resnet34`` / ``resnet50`` | :class:`MultiExitResNet` with an exit after every stage |
| ``resnet18-blocks`` / ``resnet34-blocks`` / ``resnet50-blocks`` | the same with an exit after every block |

ResNets use the CIFAR stem (3×3 convolution, no pooling) for images up to 64 pixels high and the
ImageNet stem above. Every model takes the images' channel count from ``input_shape``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._validation import check_choice
from .base import MultiExitModule, check_num_classes
from .msdnet import MSDNet
from .resnet import MultiExitResNet

SMALL_IMAGE = 64
"""Images up to this height use the CIFAR variants (stems and presets)."""

MODEL_NAMES = (
    "msdnet", "msdnet-cifar", "msdnet-imagenet", "msdnet-tiny",
    "resnet18", "resnet34", "resnet50", "resnet18-blocks", "resnet34-blocks", "resnet50-blocks",
)  # fmt: skip


def build_model(name: str, num_classes: int, input_shape: Sequence[int]) -> MultiExitModule:
    """The multi-exit model ``name`` (see the module table) for images of shape ``(C, H, W)``."""
    check_choice(name, "model", MODEL_NAMES)
    num_classes = check_num_classes(num_classes)
    if len(input_shape) != 3 or any(not isinstance(n, int) or n < 1 for n in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints; got {tuple(input_shape)}")
    channels, height = input_shape[0], input_shape[1]
    small = height <= SMALL_IMAGE
    if name.startswith("msdnet"):
        preset = name.removeprefix("msdnet-") if "-" in name else ("cifar" if small else "imagenet")
        factory = {"cifar": MSDNet.cifar, "imagenet": MSDNet.imagenet, "tiny": MSDNet.tiny}[preset]
        return factory(num_classes, in_channels=channels)
    depth = int(name.removeprefix("resnet").removesuffix("-blocks"))
    return MultiExitResNet(depth, num_classes, exits="blocks" if name.endswith("-blocks") else "stages",
                           stem="cifar" if small else "imagenet", in_channels=channels)
