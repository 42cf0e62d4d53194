"""Multi-exit networks: every model's ``forward(x)`` returns a list of K logits ``[B, num_classes]``.

- :class:`MSDNet` (Huang et al., ICLR 2018) with the presets :meth:`MSDNet.cifar` and :meth:`MSDNet.imagenet`;
- :class:`MultiExitResNet`: ResNet-18/34/50 with an exit after every stage or every block;
- :func:`attach_exits`: exits added to any existing network through forward hooks.

All three implement :class:`MultiExitModule`, whose :meth:`~MultiExitModule.forward_exits` driver lets
:class:`hdkd_fast.inference.EarlyExit` stop computing the samples that have already exited.
"""

from .attach import AttachedExits, attach_exits
from .base import ExitCallback, MultiExitModule, PoolLinearHead, StagedMultiExit
from .msdnet import MSDNet
from .resnet import MultiExitResNet

__all__ = [
    "AttachedExits",
    "ExitCallback",
    "MSDNet",
    "MultiExitModule",
    "MultiExitResNet",
    "PoolLinearHead",
    "StagedMultiExit",
    "attach_exits",
]
