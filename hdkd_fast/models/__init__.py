"""Multi-exit networks: every model's ``forward(x)`` returns a list of K logits ``[B, num_classes]``.

- :class:`MSDNet` (Huang et al., ICLR 2018) with the presets :meth:`MSDNet.cifar` and :meth:`MSDNet.imagenet`;
- :class:`MultiExitResNet`: ResNet-18/34/50 with an exit after every stage or every block;
- :func:`attach_exits`: exits added to any existing network through forward hooks;
- :func:`build_model`: the models of ``hdkd-fast train --model`` by name, from the registry of
  :mod:`hdkd_fast.models.zoo` (:func:`register_model` adds one).

Every model here implements :class:`MultiExitModule`, whose :meth:`~MultiExitModule.forward_exits` driver lets
:class:`hdkd_fast.inference.EarlyExit` stop computing the samples that have already exited, and whose
:meth:`~MultiExitModule.forward_exits_mapped` hook lets :class:`hdkd_fast.distill.GradientEquilibrium` rescale
the gradients at every exit without knowing the model's type.
"""

from .attach import AttachedExits, attach_exits
from .base import ExitCallback, ExitMap, MultiExitModule, PoolLinearHead, StagedMultiExit, supports_exit_maps
from .msdnet import MSDNet
from .resnet import MultiExitResNet
from .zoo import ModelSpec, build_model, model_names, register_model, registered_models, unregister_model

__all__ = [
    "AttachedExits",
    "ExitCallback",
    "ExitMap",
    "MSDNet",
    "ModelSpec",
    "MultiExitModule",
    "MultiExitResNet",
    "PoolLinearHead",
    "StagedMultiExit",
    "attach_exits",
    "build_model",
    "model_names",
    "register_model",
    "registered_models",
    "supports_exit_maps",
    "unregister_model",
]
