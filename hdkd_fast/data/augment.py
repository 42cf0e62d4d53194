"""Standard augmentation and normalization of whole uint8 batches with torch ops (on the images' device).

Training mode: a random crop of the image zero-padded by ``crop_padding`` on every side (per-sample
offsets), a random horizontal flip per sample, then ``(x / 255 - mean) / std``. The crop and the flip are
one gather from the padded batch (no Python loop over samples). Evaluation mode: the normalization only.
All randomness comes from a CPU :class:`torch.Generator`, so a run is reproducible and resumable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_count, is_real


@dataclass(frozen=True)
class AugmentParams:
    """The random draws of one batch: what :meth:`Augment.sample` returns and :meth:`Augment.apply` applies.

    ``offsets`` int64 ``[b, 2]``: (top, left) of each crop window in the padded image, in ``[0, 2 * padding]``
    (``padding`` is the unshifted crop); ``flips`` bool ``[b]``: which samples are mirrored left-right.
    """

    offsets: Tensor
    flips: Tensor


class Augment:
    """Random crop with zero padding + horizontal flip + normalization of uint8 ``[b, C, H, W]`` batches.

    Args:
        mean, std: per-channel statistics in [0, 1] pixel units (``len == C``; ``std > 0``).
        crop_padding: zero padding of the random crop (0: no crop).
        flip: mirror a random half of the samples left-right.
        train: ``False`` normalizes only (no randomness).

    Calling it returns float32 ``[b, C, H, W]`` on the images' device. Draws, from ``generator`` (a CPU
    generator; ``None``: torch's default one), first the offsets ``randint(0, 2 * crop_padding + 1, (b, 2))``
    when ``crop_padding > 0``, then the flips ``rand(b) < 0.5`` when ``flip``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int = 4,
        flip: bool = True,
        train: bool = True,
    ) -> None:
        self.mean = _statistic(mean, "mean")
        self.std = _statistic(std, "std")
        if len(self.std) != len(self.mean):
            raise ValueError(f"mean and std must have one entry per channel; got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0.0 for s in self.std):
            raise ValueError(f"std must be > 0 for every channel; got {self.std}")
        crop_padding = check_count(crop_padding, "crop_padding", minimum=0)
        for name, value in (("flip", flip), ("train", train)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
        self.crop_padding = crop_padding
        self.flip = flip
        self.train = train
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check_images(images)
        if not self.train:
            return self.normalize(images)
        return self.apply(images, self.sample(images.shape[0], generator))

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> AugmentParams:
        """The random draws for a batch of ``batch_size`` (CPU tensors), in the order ``__call__`` draws them."""
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
            if generator.device.type != "cpu":
                raise ValueError(f"generator must be a CPU generator; got one on {generator.device}")
        if self.crop_padding > 0:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (batch_size, 2), generator=generator)
        else:
            offsets = torch.zeros(batch_size, 2, dtype=torch.int64)
        if self.flip:
            flips = torch.rand(batch_size, generator=generator) < 0.5
        else:
            flips = torch.zeros(batch_size, dtype=torch.bool)
        return AugmentParams(offsets, flips)

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Crop, flip and normalize ``images`` with the given draws (the deterministic half of ``__call__``)."""
        self._check_images(images)
        b = images.shape[0]
        if params.offsets.shape != (b, 2) or params.flips.shape != (b,):
            raise ValueError(
                f"params must hold offsets [{b}, 2] and flips [{b}] for a batch of {b}; got "
                f"{list(params.offsets.shape)} and {list(params.flips.shape)}"
            )
        if self.crop_padding > 0 or self.flip:
            images = self._crop_flip(images, params)
        return self.normalize(images)

    def normalize(self, images: Tensor) -> Tensor:
        """``(images / 255 - mean) / std`` as float32."""
        mean, std = self._device_stats(images.device)
        return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def _crop_flip(self, images: Tensor, params: AugmentParams) -> Tensor:
        b, c, h, w = images.shape
        p = self.crop_padding
        device = images.device
        padded = F.pad(images, (p, p, p, p)) if p else images
        offsets = params.offsets.to(device, non_blocking=True)
        flips = params.flips.to(device, non_blocking=True)
        cols = torch.arange(w, device=device)
        cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:]  # [b, W]
        rows = torch.arange(h, device=device) + offsets[:, :1]  # [b, H]
        batch = torch.arange(b, device=device)[:, None, None, None]
        channels = torch.arange(c, device=device)[None, :, None, None]
        return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]

    def _device_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            shape = (len(self.mean), 1, 1)
            self._stats[device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(shape),
            )
        return self._stats[device]

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a uint8 Tensor[b, C, H, W]; got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 Tensor[b, C, H, W]; got dtype {images.dtype}")
        if images.dim() != 4 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"images must be a Tensor[b, C, H, W] with C = {len(self.mean)} (the length of mean); "
                f"got shape {list(images.shape)}"
            )

    def __repr__(self) -> str:
        return (
            f"Augment(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, flip={self.flip}, "
            f"train={self.train})"
        )


def _statistic(values: Sequence[float], name: str) -> tuple[float, ...]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of floats (one per channel); got {type(values).__name__}")
    if not values or not all(is_real(v) for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of numbers (one per channel); got {values!r}")
    result = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in result):
        raise ValueError(f"{name} must be finite; got {result}")
    return result
