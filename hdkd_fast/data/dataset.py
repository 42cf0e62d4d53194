"""The map-style image datasets every loader returns: uint8 ``[C, H, W]`` images with int64 labels."""

from __future__ import annotations

import copy
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from .._validation import check_positive_int

Indices = Tensor | Sequence[int]
"""A 1-D integer tensor or a sequence of ints."""


class ImageDataset(Dataset[tuple[Tensor, int]], ABC):
    """A labelled image dataset: ``dataset[i] -> (uint8 Tensor[C, H, W], int label)``.

    ``labels`` is an int64 ``Tensor[N]``; ``image_shape`` is ``(C, H, W)``; :meth:`batch` returns a whole
    batch at once (uint8 ``[b, C, H, W]``, int64 ``[b]``), the fast path of :class:`~hdkd_fast.data.EpochLoader`.
    ``in_memory`` tells whether the images are held decoded in memory (indexing is a tensor gather) or
    decoded lazily from files (worth worker processes).
    """

    in_memory: ClassVar[bool]
    labels: Tensor
    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int; got {type(index).__name__}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} images")
        images, labels = self._fetch(torch.tensor([i % n]))
        return images[0], int(labels[0])

    def batch(self, indices: Indices) -> tuple[Tensor, Tensor]:
        """The images (uint8 ``[b, C, H, W]``) and labels (int64 ``[b]``) at ``indices`` (``b`` of them)."""
        return self._fetch(self._check_indices(indices))

    def subset(self, indices: Indices) -> ImageDataset:
        """A dataset of the images at ``indices``, in that order."""
        return self._select(self._check_indices(indices))

    def relabeled(self, labels: Tensor) -> ImageDataset:
        """The same images (shared, not copied) with ``labels`` (an integer ``Tensor[N]``) instead of theirs."""
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer Tensor; got {_describe(labels)}")
        if labels.shape != self.labels.shape:
            raise ValueError(f"labels must have shape {list(self.labels.shape)} (one per image); got "
                             f"{list(labels.shape)}")
        out = copy.copy(self)
        out.labels = labels.to(device="cpu", dtype=torch.int64)
        return out

    def _check_indices(self, indices: Indices) -> Tensor:
        if not isinstance(indices, Tensor):
            if not isinstance(indices, Sequence) or isinstance(indices, (str, bytes)):
                raise TypeError(
                    f"indices must be a 1-D integer Tensor or a sequence of ints; got {type(indices).__name__}"
                )
            indices = torch.as_tensor(indices, dtype=torch.int64) if len(indices) else torch.empty(0, dtype=torch.int64)
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices must hold integers; got dtype {indices.dtype}")
        if indices.dim() != 1:
            raise ValueError(f"indices must be 1-D; got shape {list(indices.shape)}")
        indices = indices.to(device="cpu", dtype=torch.int64)
        n = len(self)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
            raise IndexError(f"indices hold {bad}, out of range for a dataset of {n} images")
        return indices

    @abstractmethod
    def _fetch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at checked, non-negative int64 CPU ``indices``."""

    @abstractmethod
    def _select(self, indices: Tensor) -> ImageDataset:
        """The subset at checked, non-negative int64 CPU ``indices``."""


class TensorImageDataset(ImageDataset):
    """Images held decoded in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` integer ``[N]``."""

    in_memory = True

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 Tensor; got {_describe(images)}")
        if images.dim() != 4:
            raise ValueError(f"images must be a Tensor[N, C, H, W]; got shape {list(images.shape)}")
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer Tensor; got {_describe(labels)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape [{images.shape[0]}] (one per image); got {list(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        c, h, w = images.shape[1:]
        self.image_shape = (int(c), int(h), int(w))

    def _fetch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[indices], self.labels[indices]

    def resized(self, size: int, *, chunk: int = 8192) -> TensorImageDataset:
        r"""The images area-resampled to ``size``×``size`` (each output pixel the mean of the input pixels it
        covers, as :func:`torch.nn.functional.interpolate` ``mode="area"``: a plain k×k block mean when the
        side shrinks by an integer factor k), rounded to uint8; ``chunk`` images at a time."""
        size = check_positive_int(size, "size")
        if self.image_shape[1:] == (size, size):
            return self
        parts = [F.interpolate(part.float(), size=(size, size), mode="area").round_().clamp_(0, 255).to(torch.uint8)
                 for part in self.images.split(chunk)]
        return TensorImageDataset(torch.cat(parts), self.labels)

    def _select(self, indices: Tensor) -> TensorImageDataset:
        return TensorImageDataset(self.images[indices], self.labels[indices])

    def __repr__(self) -> str:
        return f"TensorImageDataset({len(self)} images of shape {list(self.image_shape)})"


def channel_stats(
    dataset: ImageDataset, indices: Tensor, *, batch_size: int = 256
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation, in [0, 1] pixel units, of the images at ``indices``.

    Returns ``(mean, std)``; sums are accumulated in float64 over every pixel of every image.
    """
    channels = dataset.image_shape[0]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, indices.numel(), batch_size):
        images, _ = dataset.batch(indices[start : start + batch_size])
        x = images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(channels, -1)
        total += x.sum(dim=1)
        squares += x.square().sum(dim=1)
        count += x.shape[1]
    if count == 0:
        raise ValueError("cannot compute channel statistics of an empty dataset")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} Tensor"
    return type(value).__name__
