"""``RunContext``: what training a run and evaluating it both need, built once from its settings: the
configuration, the process (``torchrun`` rank and device), the data, the model on the device, and the
numerics it runs with (autocast, channels-last, the evaluation normalization).

:func:`~hdkd_fast.training.train` builds one (``training/loop.py``) and adds the optimizer, the method and
the loaders; :func:`~hdkd_fast.training.final.finish_from_checkpoint` (``hdkd-fast evaluate``) builds one
and loads the model from the run's checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Augment, DataBundle, EpochLoader, ImageDataset, load_dataset, with_label_noise
from ..distill import GradientEquilibrium
from ..models.base import MultiExitModule, eval_mode
from ..models.zoo import build_model
from . import distributed as dist_utils
from .config import TrainConfig

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]

EVAL_BATCH_SIZE = 256
"""The smallest batch :meth:`RunContext.logits` evaluates a split with (the run's ``batch_size`` if larger)."""


@dataclass
class RunContext:
    """One run's settings, process, data and model (see the module docstring)."""

    config: TrainConfig
    dist: dist_utils.Context
    """This process's place in the run (rank, world size, device)."""
    data: DataBundle
    base: MultiExitModule
    """The multi-exit model."""
    model: nn.Module
    """What trains and is saved: :attr:`base`, or its ``GradientEquilibrium`` wrapper; on the device."""
    channels_last: bool
    autocast: Autocast
    normalize: Augment
    """The evaluation transform (normalization only) of validation and test images."""

    @classmethod
    def build(cls, config: TrainConfig, dist: dist_utils.Context, data: DataBundle) -> RunContext:
        """The context of ``config`` on ``dist.device``, its model initialized from torch's random-number
        generator (a new run seeds it first; an evaluation loads the weights)."""
        device = dist.device
        base = build_model(config.model or "", data.num_classes, data.input_shape)
        model: nn.Module = GradientEquilibrium(base) if config.gradient_equilibrium else base
        channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return cls(config, dist, data, base, model, channels_last, _autocast(config.amp, device),
                   Augment(data.mean, data.std, train=False))

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @torch.no_grad()
    def logits(self, dataset: ImageDataset) -> tuple[list[Tensor], Tensor]:
        """Every exit's float32 logits ``[N, C]`` (on the CPU) over ``dataset`` in order, and its labels
        (the model in eval mode, restored after)."""
        per_exit: list[list[Tensor]] = []
        labels: list[Tensor] = []
        loader = EpochLoader(dataset, max(self.config.batch_size, EVAL_BATCH_SIZE), shuffle=False)
        with eval_mode(self.model):
            for images, y in loader:
                x = self.normalize(images.to(self.device))
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self.autocast():
                    out = self.model(x)
                if not per_exit:
                    per_exit = [[] for _ in out]
                for k, z in enumerate(out):
                    per_exit[k].append(z.float().cpu())
                labels.append(y)
        if not per_exit:
            raise ValueError("cannot evaluate on an empty dataset")
        return [torch.cat(zs) for zs in per_exit], torch.cat(labels)


def run_data(config: TrainConfig) -> DataBundle:
    """The run's data set, with at most ``config.limit`` images per split (the first ones; for smoke tests
    and demos), then the label noise of ``config.label_noise`` (:mod:`hdkd_fast.data.noise`)."""
    data = load_dataset(config.dataset, config.data_dir, val_size=config.val_size, seed=config.seed,
                        image_size=config.image_size, train_size=config.train_size)
    if config.limit is not None:
        limit = config.limit
        cut = {name: getattr(data, name) for name in ("train", "val", "test")}
        data = dataclasses.replace(data, **{name: ds.subset(torch.arange(min(limit, len(ds))))
                                            for name, ds in cut.items()})
    return with_label_noise(data, config.label_noise, config.seed, validation=config.label_noise_validation)


def _autocast(amp: str, device: torch.device) -> Autocast:
    """bf16 autocast on CUDA (``amp="auto"`` or ``"bf16"``) or on the CPU when asked (``"bf16"``)."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")

    def make() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    return make
