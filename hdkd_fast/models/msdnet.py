"""MSDNet: the Multi-Scale Dense Network of Huang et al., ICLR 2018.

G. Huang, D. Chen, T. Li, F. Wu, L. van der Maaten, K. Q. Weinberger, "Multi-Scale Dense Networks for
Resource Efficient Image Classification", ICLR 2018 (arXiv:1703.09844). The architecture follows the
authors' PyTorch code (github.com/kalviny/MSDNet-PyTorch, ``models/msdnet.py``), with its defaults
``--prune max --reduction 0.5 --bottleneck True``; submodule names match it, so its state dicts load
(strip the ``module.`` prefix of a ``DataParallel`` checkpoint).

Structure. The network keeps S feature maps at once, scale s at resolution 1/2^s of the first. The
first layer makes them with strided convolutions; every later layer l appends ``growth · grFactor[s]``
channels at scale s, concatenated densely:

    x_s^l = [x_s^{l-1}, h_s(x_s^{l-1}), h̃_s(x_{s-1}^{l-1})]     (h: 3×3 conv, h̃: strided 3×3 conv)

(the finest scale has no h̃ term), each conv preceded by a 1×1 bottleneck of width
``min(c_in, bnFactor[s] · c_out)``. The finest scales are dropped as depth grows (one more every
``ceil(L / S)`` layers, L the total number of layers), each drop followed by a 1×1 transition that
halves the channels. Block k ends at layer ``base + k · step`` and its exit reads the coarsest scale:
two strided 3×3 conv-BN-ReLU, global average pooling, linear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_positive_int
from .base import StagedMultiExit, check_num_classes, init_conv_bn_linear

Stem = Literal["cifar", "imagenet"]


class ConvBasic(nn.Module):
    """Conv-BN-ReLU."""

    def __init__(self, n_in: int, n_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(n_in, n_out, kernel_size=kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(n_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    """Optional 1×1 bottleneck (width ``min(n_in, bn_width · n_out)``), then a 3×3 conv (stride 2 if ``down``)."""

    def __init__(self, n_in: int, n_out: int, down: bool, bottleneck: bool, bn_width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        n_inner = n_in
        if bottleneck:
            n_inner = min(n_in, bn_width * n_out)
            layers += [nn.Conv2d(n_in, n_inner, 1, bias=False), nn.BatchNorm2d(n_inner), nn.ReLU(inplace=True)]
        layers += [
            nn.Conv2d(n_inner, n_out, 3, stride=2 if down else 1, padding=1, bias=False),
            nn.BatchNorm2d(n_out),
            nn.ReLU(inplace=True),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvNormal(nn.Module):
    """Finest kept scale: ``[x, h(x)]``."""

    def __init__(self, n_in: int, n_out: int, bottleneck: bool, bn_width: int) -> None:
        super().__init__()
        self.conv_normal = ConvBN(n_in, n_out, False, bottleneck, bn_width)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv_normal(x)], dim=1)


class ConvDownNormal(nn.Module):
    """Coarser scale: ``[x, h̃(finer), h(x)]``, each new part with ``n_out // 2`` channels."""

    def __init__(self, n_in_finer: int, n_in: int, n_out: int, bottleneck: bool, bn_finer: int, bn: int) -> None:
        super().__init__()
        self.conv_down = ConvBN(n_in_finer, n_out // 2, True, bottleneck, bn_finer)
        self.conv_normal = ConvBN(n_in, n_out // 2, False, bottleneck, bn)

    def forward(self, finer: Tensor, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv_down(finer), self.conv_normal(x)], dim=1)


class MSDNFirstLayer(nn.Module):
    """Builds the S scales from the image (CIFAR: 3×3 conv; ImageNet: 7×7/2 conv + 3×3/2 max-pool)."""

    def __init__(self, n_channels: int, gr_factor: Sequence[int], stem: Stem, in_channels: int = 3) -> None:
        super().__init__()
        width = n_channels * gr_factor[0]
        first: nn.Module
        if stem == "cifar":
            first = ConvBasic(in_channels, width, kernel=3, stride=1, padding=1)
        else:  # the official code keeps the bias of this convolution
            first = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        self.layers = nn.ModuleList([first])
        for s in range(1, len(gr_factor)):
            self.layers.append(ConvBasic(width, n_channels * gr_factor[s], kernel=3, stride=2, padding=1))
            width = n_channels * gr_factor[s]

    def forward(self, x: Tensor) -> list[Tensor]:
        scales = []
        for layer in self.layers:
            x = layer(x)
            scales.append(x)
        return scales


class MSDNLayer(nn.Module):
    """One dense layer over the kept scales; drops the finest scale when ``in_scales > out_scales``."""

    def __init__(
        self,
        n_in: int,
        growth_rate: int,
        in_scales: int,
        out_scales: int,
        gr_factor: Sequence[int],
        bn_factor: Sequence[int],
        bottleneck: bool,
    ) -> None:
        super().__init__()
        n_scales = len(gr_factor)
        self.discard = in_scales - out_scales
        offset = n_scales - out_scales
        self.layers = nn.ModuleList()
        if self.discard > 0:
            first: nn.Module = ConvDownNormal(
                n_in * gr_factor[offset - 1],
                n_in * gr_factor[offset],
                growth_rate * gr_factor[offset],
                bottleneck,
                bn_factor[offset - 1],
                bn_factor[offset],
            )
        else:
            first = ConvNormal(n_in * gr_factor[offset], growth_rate * gr_factor[offset], bottleneck, bn_factor[offset])
        self.layers.append(first)
        for s in range(offset + 1, n_scales):
            self.layers.append(
                ConvDownNormal(
                    n_in * gr_factor[s - 1],
                    n_in * gr_factor[s],
                    growth_rate * gr_factor[s],
                    bottleneck,
                    bn_factor[s - 1],
                    bn_factor[s],
                )
            )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if self.discard > 0:  # xs[0] is dropped: it only feeds the strided conv of the next scale
            return [layer(xs[i], xs[i + 1]) for i, layer in enumerate(self.layers)]
        out = [self.layers[0](xs[0])]
        out += [layer(xs[i - 1], xs[i]) for i, layer in enumerate(self.layers) if i > 0]
        return out


class ParallelModule(nn.Module):
    """Applies module i to scale i (the 1×1 transition after a scale is dropped)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [m(x) for m, x in zip(self.m, xs, strict=True)]


class ClassifierModule(nn.Module):
    """Exit head on the coarsest scale: two strided conv-BN-ReLU, global average pooling, linear.

    The official code pools with ``AvgPool2d(2)``, which at the native resolution (32×32 CIFAR, 224×224
    ImageNet) sees a 2×2 map; global average pooling is the same there and lets other sizes run.
    """

    def __init__(self, n_in: int, n_inter: int, num_classes: int) -> None:
        super().__init__()
        self.m = nn.Sequential(
            ConvBasic(n_in, n_inter, kernel=3, stride=2, padding=1),
            ConvBasic(n_inter, n_inter, kernel=3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.linear = nn.Linear(n_inter, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.m(x).flatten(1))


class MSDNet(StagedMultiExit):
    """Multi-Scale Dense Network (Huang et al., ICLR 2018) with one exit per block.

    Use the presets :meth:`cifar` (7 blocks, step 2, base 4, 16 channels, growth 6, 3 scales,
    grFactor = bnFactor = 1-2-4: the CIFAR anytime-prediction model of the paper and of HDKD, DBT and
    IMTA) and :meth:`imagenet` (5 blocks, step 4, base 4, 32 channels, growth 16, 4 scales,
    grFactor = bnFactor = 1-2-4-4). Block k (0-based) holds ``base + k · step`` layers in total up to
    its exit (``step_mode="even"``) or its own ``step · k + 1`` layers after the first
    (``step_mode="lin_grow"``, the paper's budgeted-batch CIFAR model with ``step=1, base=1``).

    ``forward(x)`` returns the K = ``n_blocks`` logits; ``return_features=True`` also returns the
    coarsest-scale feature map each exit reads. Weights are initialized as the official code intends
    (He-normal fan-out convolutions, BN γ = 1, β = 0, zero linear biases; its loop only reaches
    top-level children, so the official model in fact keeps PyTorch's default initialization).

    Args:
        num_classes: number of classes.
        n_blocks: number of blocks = exits (``--nBlocks``).
        step, base, step_mode: layers per block (``--step``, ``--base``, ``--stepmode``).
        n_channels: channels of the finest scale after the first layer (``--nChannels``).
        growth_rate: channels each layer adds at the finest scale (``--growthRate``).
        gr_factor: per-scale growth multipliers; its length is the number of scales (``--grFactor``).
        bn_factor: per-scale bottleneck width multipliers (``--bnFactor``).
        bottleneck: use the 1×1 bottleneck convolutions (``--bottleneck``).
        reduction: channel compression of the transition after a scale is dropped (``--reduction``).
        stem: ``"cifar"`` (3×3 first conv, 128-channel exit heads) or ``"imagenet"`` (7×7/2 conv and
            max-pool, exit heads as wide as their input).
        in_channels: channels of the input images (3 for RGB).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        n_blocks: int = 7,
        step: int = 2,
        base: int = 4,
        step_mode: Literal["even", "lin_grow"] = "even",
        n_channels: int = 16,
        growth_rate: int = 6,
        gr_factor: Sequence[int] = (1, 2, 4),
        bn_factor: Sequence[int] = (1, 2, 4),
        bottleneck: bool = True,
        reduction: float = 0.5,
        stem: Stem = "cifar",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        check_choice(step_mode, "step_mode", ("even", "lin_grow"))
        check_choice(stem, "stem", ("cifar", "imagenet"))
        for name, value in (("n_blocks", n_blocks), ("step", step), ("base", base), ("n_channels", n_channels),
                            ("in_channels", in_channels)):
            check_positive_int(value, name)
        if len(gr_factor) < 1 or len(bn_factor) != len(gr_factor):
            raise ValueError(
                f"gr_factor and bn_factor must be non-empty and of equal length; got {gr_factor} and {bn_factor}"
            )
        if not 0 <= reduction <= 1:
            raise ValueError(f"reduction must be in [0, 1]; got {reduction}")

        n_scales = len(gr_factor)
        steps = [base] + [step if step_mode == "even" else step * k + 1 for k in range(1, n_blocks)]
        n_layers_all = sum(steps)
        interval = math.ceil(n_layers_all / n_scales)

        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        n_in, layer = n_channels, 0
        for k in range(n_blocks):
            layers: list[nn.Module] = [MSDNFirstLayer(n_channels, gr_factor, stem, in_channels)] if k == 0 else []
            for _ in range(steps[k]):
                layer += 1
                in_scales = n_scales - max(0, layer - 2) // interval
                out_scales = n_scales - (layer - 1) // interval
                layers.append(MSDNLayer(n_in, growth_rate, in_scales, out_scales, gr_factor, bn_factor, bottleneck))
                n_in += growth_rate
                if in_scales > out_scales and reduction > 0:
                    n_out = math.floor(reduction * n_in)
                    offset = n_scales - out_scales
                    layers.append(
                        ParallelModule(
                            [
                                ConvBasic(n_in * gr_factor[offset + s], n_out * gr_factor[offset + s], 1, 1, 0)
                                for s in range(out_scales)
                            ]
                        )
                    )
                    n_in = n_out
            self.blocks.append(nn.Sequential(*layers))
            head_in = n_in * gr_factor[-1]
            self.classifier.append(ClassifierModule(head_in, 128 if stem == "cifar" else head_in, num_classes))
        init_conv_bn_linear(self)

    @classmethod
    def cifar(cls, num_classes: int = 100, **overrides: Any) -> MSDNet:
        """The CIFAR anytime-prediction MSDNet (7 blocks, step 2, base 4, 16 channels, growth 6, grFactor
        1-2-4, bnFactor 1-2-4, 3 scales, bottleneck): the official README's
        ``--nBlocks 7 --stepmode even --step 2 --base 4 --nChannels 16``.

        Measured (one 3×32×32 image, :func:`hdkd_fast.evaluation.exit_costs`, i.e. ``FlopCounterMode``
        FLOPs = 2 per multiply-add; the paper counts multiply-adds, half these): 3.07 M parameters at
        ``num_classes=100`` (2.99 M at 10); cumulative MFLOPs to exits 1-7 at 100 classes:
        29.9, 50.5, 73.6, 91.9, 113.9, 133.1, 151.0.
        """
        return cls(num_classes, **{**_CIFAR, **overrides})

    @classmethod
    def imagenet(cls, num_classes: int = 1000, **overrides: Any) -> MSDNet:
        """The ImageNet MSDNet (5 blocks, step 4, base 4, 32 channels, growth 16, grFactor 1-2-4-4,
        bnFactor 1-2-4-4, 4 scales, bottleneck): the official README's ``--nBlocks 5 --stepmode even
        --step 4 --base 4 --nChannels 32 --growthRate 16 --grFactor 1-2-4-4 --bnFactor 1-2-4-4``.

        Measured (one 3×224×224 image, FLOPs as in :meth:`cifar`): 23.96 M parameters at
        ``num_classes=1000``; cumulative GFLOPs to exits 1-5: 0.67, 1.36, 2.01, 2.50, 2.71.
        """
        return cls(num_classes, **{**_IMAGENET, **overrides})

    @classmethod
    def tiny(cls, num_classes: int = 10, **overrides: Any) -> MSDNet:
        """A small MSDNet for tiny images and CPU demos (the embedded 8×8 digits of ``hdkd-fast train``):
        4 blocks of 1, 2, 3, 4 layers (``step_mode="lin_grow"``, step 1, base 1), 8 channels, growth 4,
        2 scales (grFactor = bnFactor = 1-2), the CIFAR stem and 128-channel exit heads. Not from the paper.

        Measured (:func:`hdkd_fast.evaluation.exit_costs`, FLOPs as in :meth:`cifar`): 0.80 M parameters
        at ``num_classes=10``; cumulative MFLOPs to exits 1-4 for one 1×8×8 image: 0.61, 1.38, 2.22, 3.34
        (3×32×32: 10.0, 22.3, 35.6, 53.6).
        """
        return cls(num_classes, **{**_TINY, **overrides})

    def stages(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        return list(zip(self.blocks, self.classifier, strict=True))

    def exit_feature(self, state: list[Tensor]) -> Tensor:
        """Every exit reads the coarsest scale."""
        return state[-1]


_CIFAR: dict[str, Any] = dict(
    n_blocks=7, step=2, base=4, step_mode="even", n_channels=16, growth_rate=6,
    gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), stem="cifar",
)  # fmt: skip
_IMAGENET: dict[str, Any] = dict(
    n_blocks=5, step=4, base=4, step_mode="even", n_channels=32, growth_rate=16,
    gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), stem="imagenet",
)  # fmt: skip
_TINY: dict[str, Any] = dict(
    n_blocks=4, step=1, base=1, step_mode="lin_grow", n_channels=8, growth_rate=4,
    gr_factor=(1, 2), bn_factor=(1, 2), stem="cifar",
)  # fmt: skip
