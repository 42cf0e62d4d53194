"""Deterministic, resumable batches of an :class:`~hdkd_fast.data.ImageDataset` for one (DDP) rank."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._validation import check_count, check_int
from .dataset import ImageDataset
from .splits import EPOCH_STREAM, seeded_permutation


class EpochLoader:
    """The batches of one epoch for one rank: uint8 images ``[b, C, H, W]`` and int64 labels ``[b]`` (CPU).

    The order of an epoch is a pure function of ``(seed, epoch)`` (``shuffle=True``: a permutation drawn from
    a generator seeded with ``mix_seed(seed, EPOCH_STREAM, epoch)``; ``shuffle=False``: ``0 .. N-1``), the
    same on every rank, so a run resumes at any epoch boundary by calling :meth:`set_epoch`.

    Distributed (``world_size > 1``): rank ``r`` takes the positions ``r, r + world_size, ...`` of the
    epoch's order. With ``drop_last=False`` the order is first padded to a multiple of ``world_size`` by
    repeating its first indices (as :class:`~torch.utils.data.DistributedSampler` does), so every image is
    seen and every rank gets the same number of batches, the last one possibly smaller than ``batch_size``.
    With ``drop_last=True`` the order is cut to a multiple of ``world_size * batch_size``: full batches only,
    no image repeated.

    In-memory datasets are sliced with :meth:`ImageDataset.batch` in this process. Lazily decoded ones with
    ``num_workers > 0`` are decoded by a :class:`~torch.utils.data.DataLoader` whose workers build whole
    batches (each batch from the same indices, so the output does not depend on ``num_workers``).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset; got {type(dataset).__name__}")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
        batch_size, seed, rank, world_size, num_workers = (check_int(value, name) for name, value in (
            ("batch_size", batch_size),
            ("seed", seed),
            ("rank", rank),
            ("world_size", world_size),
            ("num_workers", num_workers),
        ))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}); got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses."""
        self.epoch = check_count(epoch, "epoch", minimum=0)

    def indices(self) -> Tensor:
        """The dataset indices this rank visits in the current epoch, in order (int64, CPU)."""
        n = len(self.dataset)
        order = seeded_permutation(n, self.seed, EPOCH_STREAM, self.epoch) if self.shuffle else torch.arange(n)
        if self.drop_last:
            order = order[: n - n % (self.world_size * self.batch_size)]
        elif n % self.world_size:
            padding = self.world_size - n % self.world_size
            order = torch.cat([order, order.repeat(math.ceil(padding / n))[:padding]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // (self.world_size * self.batch_size)
        return math.ceil(math.ceil(n / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self.indices()
        batches = list(indices.split(self.batch_size)) if indices.numel() else []
        if self.dataset.in_memory or self.num_workers == 0:
            return (self.dataset.batch(indices) for indices in batches)
        loader = DataLoader(_Batches(self.dataset), sampler=batches, batch_size=None, num_workers=self.num_workers)
        return iter(loader)

    def __repr__(self) -> str:
        return (
            f"EpochLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last}, "
            f"num_workers={self.num_workers}, epoch={self.epoch})"
        )


class _Batches(Dataset[tuple[Tensor, Tensor]]):
    """``dataset.batch`` as a map-style dataset indexed by index tensors: a worker builds a whole batch."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.dataset.batch(indices)
