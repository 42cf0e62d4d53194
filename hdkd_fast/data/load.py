"""``load_dataset``: a named or auto-detected dataset split into train / validation / test."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cifar, folder
from .dataset import ImageDataset, channel_stats
from .digits import CLASS_NAMES as DIGIT_NAMES
from .digits import read_digits
from .splits import STATS_STREAM, TEST_STREAM, VAL_STREAM, holdout_size, random_holdout, stratified_holdout

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

CIFAR_VAL_SIZE = 5000
"""Default validation split of CIFAR: 5000 training images, as in MSDNet and HDKD."""
VAL_FRACTION = 0.1
"""Default validation split of digits and image folders: 10% of the training images."""
TEST_FRACTION = 0.2
"""Test split held out of datasets without one (digits; an image folder without ``test``/``val``)."""
TEST_SEED = 0
"""Seed of that test split: fixed, so every run (whatever its ``seed``) is scored on the same images."""
STATS_IMAGES = 1000
"""Lazily decoded datasets (image folders): mean/std are estimated on at most this many training images (a
seeded sample); in-memory ones use every training image."""
DEFAULT_IMAGE_SIZE = 32


@dataclass(frozen=True)
class DataBundle:
    """A dataset split three ways, with what a model and :class:`~hdkd_fast.data.Augment` need to know.

    ``mean``/``std``: per channel, in [0, 1] pixel units (CIFAR: the published statistics; digits and image
    folders: computed on ``train``).
    """

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


def load_dataset(
    name: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | float | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataBundle:
    """Load a dataset and split off its validation set (and its test set where it has none).

    Args:
        name: one of :data:`DATASETS`, or ``None``: ``"digits"`` without ``data_dir``, else detected from
            ``data_dir``: a CIFAR-10 or CIFAR-100 python folder (``data_dir`` itself, ``data_dir/cifar-10-batches-py``
            or ``data_dir/cifar-100-python``), their ``.tar.gz`` archive (``data_dir`` or inside it), or an
            image folder (``data_dir/train/<class>/...``).
        data_dir: where the files are (not used by ``"digits"``, which ships with scikit-learn).
        val_size: training images held out as the validation split: a count, or a fraction in (0, 1) of
            the training images. Default: 5000 on CIFAR (as in MSDNet/HDKD), 10% otherwise.
        seed: fixes the validation split (a seeded random permutation, the same in every process) and, for
            image folders, the sample their mean/std is estimated on. The test split that digits and image
            folders without ``test``/``val`` get (stratified, 20%) does not depend on it.
        image_size: image folders only: side of the square images (default 32).

    Raises:
        ValueError / TypeError naming the argument; FileNotFoundError naming a missing file; ValueError
        naming a corrupt file.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None; got {type(name).__name__}")
    if name is not None and name not in DATASETS:
        raise ValueError(f"name must be one of {', '.join(DATASETS)} (or None to detect it); got {name!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise TypeError(f"image_size must be an int or None; got {type(image_size).__name__}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {image_size}")
    root = None if data_dir is None else Path(data_dir)
    if root is not None and not root.exists():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    if name is None:
        name = "digits" if root is None else _detect(root)
    if name != "imagefolder" and image_size is not None:
        raise ValueError(f"image_size applies to image folders only; {name} images have a fixed size")
    if name == "digits":
        if root is not None:
            raise ValueError(f"data_dir must be None for 'digits' (it ships with scikit-learn); got {str(root)!r}")
        return _digits(val_size, seed)
    if root is None:
        raise ValueError(f"{name} needs data_dir (the folder that holds its files)")
    if name == "imagefolder":
        return _image_folder(root, val_size, seed, image_size or DEFAULT_IMAGE_SIZE)
    return _cifar(cifar.FORMATS[name], root, val_size, seed)


def _detect(root: Path) -> str:
    for fmt in cifar.FORMATS.values():
        if cifar.locate(fmt, root) is not None:
            return fmt.name
    if folder.find_layout(root) is not None:
        return "imagefolder"
    raise ValueError(
        f"cannot tell which dataset data_dir {root} holds: expected the CIFAR-10 python folder "
        f"({cifar.CIFAR10.folder}: {', '.join(cifar.CIFAR10.files)}), the CIFAR-100 one ({cifar.CIFAR100.folder}: "
        f"{', '.join(cifar.CIFAR100.files)}), either .tar.gz archive, or an image folder (train/<class>/<image>)"
    )


def _digits(val_size: int | float | None, seed: int) -> DataBundle:
    everything = read_digits()
    pool, held = stratified_holdout(everything.labels, TEST_FRACTION, TEST_SEED, TEST_STREAM)
    train, test = everything.subset(pool), everything.subset(held)
    return _bundle("digits", train, test, val_size, VAL_FRACTION, seed, DIGIT_NAMES)


def _cifar(fmt: cifar.CifarFormat, root: Path, val_size: int | float | None, seed: int) -> DataBundle:
    source = root if root.is_file() else cifar.locate(fmt, root)
    if source is None:
        raise FileNotFoundError(
            f"no {fmt.title} data in {root}: expected {fmt.files[0]} ... in it, a {fmt.folder} folder or {fmt.archive}"
        )
    train, test, names = cifar.read_cifar(fmt, source)
    return _bundle(fmt.name, train, test, val_size, CIFAR_VAL_SIZE, seed, names, stats=(fmt.mean, fmt.std))


def _image_folder(root: Path, val_size: int | float | None, seed: int, image_size: int) -> DataBundle:
    layout = folder.find_layout(root)
    if layout is None:
        raise FileNotFoundError(f"{root} is not an image folder: {root / 'train'} (train/<class>/<image>) is missing")
    paths, labels, names = folder.scan_split(layout.train)
    train: ImageDataset = folder.FolderImageDataset(paths, labels, image_size)
    test: ImageDataset
    if layout.test is None:
        pool, held = stratified_holdout(train.labels, TEST_FRACTION, TEST_SEED, TEST_STREAM)
        train, test = train.subset(pool), train.subset(held)
    else:
        test = _folder_split(layout.test, names, image_size)
    if layout.val is None:
        return _bundle("imagefolder", train, test, val_size, VAL_FRACTION, seed, names)
    if val_size is not None:
        raise ValueError(f"val_size must be None when the image folder has its own validation split ({layout.val})")
    return _finish("imagefolder", train, _folder_split(layout.val, names, image_size), test, seed, names)


def _folder_split(split: Path, names: tuple[str, ...], image_size: int) -> folder.FolderImageDataset:
    paths, labels, _ = folder.scan_split(split, names)
    return folder.FolderImageDataset(paths, labels, image_size)


def _bundle(
    name: str,
    pool: ImageDataset,
    test: ImageDataset,
    val_size: int | float | None,
    default_val: int | float,
    seed: int,
    names: tuple[str, ...],
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataBundle:
    count = holdout_size(val_size, len(pool), default=default_val)
    kept, held = random_holdout(len(pool), count, seed, VAL_STREAM)
    return _finish(name, pool.subset(kept), pool.subset(held), test, seed, names, stats)


def _finish(
    name: str,
    train: ImageDataset,
    val: ImageDataset,
    test: ImageDataset,
    seed: int,
    names: tuple[str, ...],
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataBundle:
    if stats is None:
        n = len(train)
        if train.in_memory or n <= STATS_IMAGES:
            sample = torch.arange(n)
        else:
            sample = random_holdout(n, STATS_IMAGES, seed, STATS_STREAM)[1]
        stats = channel_stats(train, sample)
    mean, std = stats
    return DataBundle(name, train, val, test, len(names), train.image_shape, mean, std, names)
