"""Models by name, for the command line: ``build_model("msdnet", num_classes, input_shape)``.

The names live in a registry of :class:`ModelSpec` records (name, one-line description, builder), filled by
one :func:`register_model` line per model at the end of this module. Everything that lists models derives
from it: :func:`model_names`, :func:`build_model`'s check, and the choices and help text of
``hdkd-fast train --model`` (``hdkd-fast train --help`` prints every name with its description). A model of
your own is one more line: ``register_model(ModelSpec("mine", "what it is", build))``, where
``build(num_classes, (C, H, W))`` returns a :class:`~hdkd_fast.models.MultiExitModule`.

The built-in models take the images' channel count from ``input_shape``; ``msdnet`` and the ResNets pick
the CIFAR variant (MSDNet preset, ResNet stem: 3×3 convolution, no pooling) for images up to
:data:`SMALL_IMAGE` pixels high and the ImageNet one above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .._validation import check_choice, is_int
from .base import MultiExitModule, check_num_classes
from .msdnet import MSDNet
from .resnet import MultiExitResNet

SMALL_IMAGE = 64
"""Images up to this height use the CIFAR variants (stems and presets)."""

ModelBuilder = Callable[[int, tuple[int, int, int]], MultiExitModule]
"""``build(num_classes, (C, H, W))``: the model for images of that shape (both arguments already checked)."""


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its ``--model`` name, a one-line description for ``--help``, its builder."""

    name: str
    description: str
    build: ModelBuilder


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Add ``spec`` to the registry (it becomes a ``--model`` choice).

    Raises:
        TypeError: ``spec`` is not a :class:`ModelSpec`, or its builder is not callable.
        ValueError: the name is empty, holds whitespace, or is taken; the description is empty or not one line.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec; got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name or spec.name != "".join(spec.name.split()):
        raise ValueError(f"a model name must be a non-empty string without whitespace; got {spec.name!r}")
    if spec.name in _REGISTRY:
        raise ValueError(f"a model named {spec.name!r} is already registered")
    if not isinstance(spec.description, str) or not spec.description.strip() or "\n" in spec.description:
        raise ValueError(f"model {spec.name!r} needs a one-line description; got {spec.description!r}")
    if not callable(spec.build):
        raise TypeError(f"the builder of model {spec.name!r} must be callable; got {type(spec.build).__name__}")
    _REGISTRY[spec.name] = spec


def unregister_model(name: str) -> None:
    """Remove the model ``name`` from the registry (e.g. a test's toy model)."""
    check_choice(name, "name", model_names())
    del _REGISTRY[name]


def registered_models() -> Mapping[str, ModelSpec]:
    """Every registered model by name, in registration order (a read-only view)."""
    return MappingProxyType(_REGISTRY)


def model_names() -> tuple[str, ...]:
    """The registered models' names, in registration order: the choices of ``--model``."""
    return tuple(_REGISTRY)


def build_model(name: str, num_classes: int, input_shape: Sequence[int]) -> MultiExitModule:
    """The registered multi-exit model ``name`` for images of shape ``(C, H, W)``."""
    check_choice(name, "model", model_names())
    num_classes = check_num_classes(num_classes)
    if len(input_shape) != 3 or any(not is_int(n) or n < 1 for n in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints; got {tuple(input_shape)}")
    channels, height, width = (int(n) for n in input_shape)
    model = _REGISTRY[name].build(num_classes, (channels, height, width))
    if not isinstance(model, MultiExitModule):
        raise TypeError(f"the builder of model {name!r} must return a MultiExitModule; got {type(model).__name__}")
    return model


def _msdnet(preset: str | None) -> ModelBuilder:
    """An MSDNet preset (``None``: by the image height)."""

    def build(num_classes: int, input_shape: tuple[int, int, int]) -> MultiExitModule:
        channels, height, _ = input_shape
        chosen = preset or ("cifar" if height <= SMALL_IMAGE else "imagenet")
        factory = {"cifar": MSDNet.cifar, "imagenet": MSDNet.imagenet, "tiny": MSDNet.tiny}[chosen]
        return factory(num_classes, in_channels=channels)

    return build


def _resnet(depth: int, exits: Literal["stages", "blocks"]) -> ModelBuilder:
    """A :class:`MultiExitResNet` with the stem chosen by the image height."""

    def build(num_classes: int, input_shape: tuple[int, int, int]) -> MultiExitModule:
        channels, height, _ = input_shape
        return MultiExitResNet(depth, num_classes, exits=exits, stem="cifar" if height <= SMALL_IMAGE else "imagenet",
                               in_channels=channels)

    return build


# The built-in models: one line each.
register_model(ModelSpec("msdnet", f"msdnet-cifar for images up to {SMALL_IMAGE} pixels high, msdnet-imagenet "
                         "above", _msdnet(None)))
register_model(ModelSpec("msdnet-cifar", "the paper's CIFAR MSDNet (7 exits, 3 scales)", _msdnet("cifar")))
register_model(ModelSpec("msdnet-imagenet", "the paper's ImageNet MSDNet (5 exits, 4 scales)", _msdnet("imagenet")))
register_model(ModelSpec("msdnet-tiny", "a small MSDNet (4 exits, 0.8 M parameters) for tiny images and CPU demos",
                         _msdnet("tiny")))
register_model(ModelSpec("resnet18", "ResNet-18, an exit after every stage (4 exits)", _resnet(18, "stages")))
register_model(ModelSpec("resnet34", "ResNet-34, an exit after every stage (4 exits)", _resnet(34, "stages")))
register_model(ModelSpec("resnet50", "ResNet-50, an exit after every stage (4 exits)", _resnet(50, "stages")))
register_model(ModelSpec("resnet18-blocks", "ResNet-18, an exit after every block (8 exits)", _resnet(18, "blocks")))
register_model(ModelSpec("resnet34-blocks", "ResNet-34, an exit after every block (16 exits)", _resnet(34, "blocks")))
register_model(ModelSpec("resnet50-blocks", "ResNet-50, an exit after every block (16 exits)", _resnet(50, "blocks")))
