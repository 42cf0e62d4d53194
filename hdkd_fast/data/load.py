"""``load_dataset``: a named or auto-detected dataset split into train / validation / test."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .._validation import check_int, check_positive_int
from . import cifar, folder, idx
from .dataset import ImageDataset, channel_stats
from .digits import CLASS_NAMES as DIGIT_NAMES
from .digits import read_digits
from .splits import (
    STATS_STREAM,
    TEST_STREAM,
    TRAIN_SUBSET_STREAM,
    VAL_STREAM,
    holdout_size,
    random_holdout,
    seeded_permutation,
    stratified_holdout,
)

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", *idx.FORMATS)
"""Every dataset :func:`load_dataset` knows (and ``hdkd-fast train --dataset`` offers)."""
IDX_DATASETS = tuple(idx.FORMATS)
"""The MNIST family (IDX files): ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"``."""

CIFAR_VAL_SIZE = 5000
"""Default validation split of CIFAR: 5000 training images, as in MSDNet and HDKD."""
IDX_VAL_SIZE = 5000
"""Default validation split of the MNIST family: 5000 of the 60000 training images (the usual 55000/5000)."""
IDX_CROP_PADDING = 2
"""Random-crop padding of the MNIST family's 28×28 images: shifts of up to 2 pixels (7%, as CIFAR's 4 of
32 pixels) keep a centred digit, character or garment whole; no flip for digits and characters (mirrored,
they are other symbols), a flip for Fashion-MNIST (a mirrored garment is the same garment)."""
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
MAX_IMAGE_SIZE = 1024
"""Largest ``image_size`` of any dataset. Image folders resize every image to it (its shorter side, up or down:
they hold images of any size, decoded one batch at a time); the MNIST family's images, held in memory, are
only shrunk: at most their stored side (28)."""


@dataclass(frozen=True)
class DataBundle:
    """A dataset split three ways, with what a model and :class:`~hdkd_fast.data.Augment` need to know.

    ``mean``/``std``: per channel, in [0, 1] pixel units (CIFAR: the published statistics; the others:
    computed on ``train``). ``crop_padding``/``flip``: the training augmentation that suits the images
    (:class:`~hdkd_fast.data.Augment`'s arguments): random crop with 4 pixels of padding and flips for CIFAR and
    image folders, 1 pixel and no flip for the 8×8 digits, see :data:`IDX_CROP_PADDING` for the MNIST family.
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
    crop_padding: int = 4
    flip: bool = True


def load_dataset(
    name: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | float | None = None,
    seed: int = 0,
    image_size: int | None = None,
    train_size: int | None = None,
    download: bool = False,
) -> DataBundle:
    """Load a dataset and split off its validation set (and its test set where it has none).

    Args:
        name: one of :data:`DATASETS`, or ``None``: ``"digits"`` without ``data_dir``, else detected from
            ``data_dir``: a CIFAR-10 or CIFAR-100 python folder (``data_dir`` itself, ``data_dir/cifar-10-batches-py``
            or ``data_dir/cifar-100-python``), their ``.tar.gz`` archive (``data_dir`` or inside it), the IDX
            files of the MNIST family (``data_dir`` or a subfolder named after the dataset, see
            :mod:`hdkd_fast.data.idx`; which of the three is read from the path or the published checksums),
            or an image folder (``data_dir/train/<class>/...``).
        data_dir: where the files are (not used by ``"digits"``, which ships with scikit-learn). The MNIST
            family without one is looked for in ``/usr/share/datasets/<name>`` (Debian's ``dataset-<name>``
            package), then in the download cache ``~/.cache/hdkd_fast/<name>``.
        val_size: training images held out as the validation split: a count, or a fraction in (0, 1) of
            the training images. Default: 5000 on CIFAR (as in MSDNet/HDKD) and the MNIST family, 10%
            otherwise.
        seed: fixes the validation split (a seeded random permutation, the same in every process) and, for
            image folders, the sample their mean/std is estimated on. The test split that digits and image
            folders without ``test``/``val`` get (stratified, 20%) does not depend on it.
        image_size: side of the square images, at most :data:`MAX_IMAGE_SIZE`: image folders (default 32;
            every image is resized to it, smaller ones upsampled) and the MNIST family (default and largest:
            the stored side, 28; a smaller side is area-resampled, e.g. 14 averages 2×2 blocks: a 4× cheaper
            model on a CPU; a larger one is refused, as it would only upsample every image in memory).
        train_size: train on a seeded random subset of this many of the training images (after the validation
            split is held out; the validation and test splits and the normalization statistics are unchanged),
            e.g. a limited-data regime; ``None``: all of them.
        download: the MNIST family only (``name`` required): first fetch the missing official files into
            ``data_dir`` (default: the download cache), see :func:`download_dataset`.

    Raises:
        ValueError / TypeError naming the argument; FileNotFoundError naming a missing file; ValueError
        naming a corrupt file.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None; got {type(name).__name__}")
    if name is not None and name not in DATASETS:
        raise ValueError(f"name must be one of {', '.join(DATASETS)} (or None to detect it); got {name!r}")
    seed = check_int(seed, "seed")
    if image_size is not None:
        image_size = check_int(image_size, "image_size", "an int or None")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {image_size}")
        if image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be <= {MAX_IMAGE_SIZE} (the largest side images are resampled to); "
                             f"got {image_size}")
    if train_size is not None:
        train_size = check_positive_int(train_size, "train_size", "a positive int (a number of images) or None")
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool; got {type(download).__name__}")
    bundle = _load(name, data_dir, val_size, seed, image_size, download)
    if train_size is None or train_size >= len(bundle.train):
        return bundle
    subset = seeded_permutation(len(bundle.train), seed, TRAIN_SUBSET_STREAM)[:train_size].sort().values
    return dataclasses.replace(bundle, train=bundle.train.subset(subset))


def _load(name: str | None, data_dir: str | os.PathLike[str] | None, val_size: int | float | None, seed: int,
          image_size: int | None, download: bool) -> DataBundle:
    """:func:`load_dataset` after its argument checks, without ``train_size``."""
    root = None if data_dir is None else Path(data_dir)
    if download:
        root = download_dataset(name, root)
    if root is not None and not root.exists():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    name = dataset_name(name, root)
    if name not in (*IDX_DATASETS, "imagefolder") and image_size is not None:
        raise ValueError(f"image_size applies to image folders and the MNIST family; {name} images have a fixed size")
    if name in idx.FORMATS:
        return _idx(idx.FORMATS[name], root, val_size, seed, image_size)
    if name == "digits":
        if root is not None:
            raise ValueError(f"data_dir must be None for 'digits' (it ships with scikit-learn); got {str(root)!r}")
        return _digits(val_size, seed)
    if root is None:
        raise ValueError(f"{name} needs data_dir (the folder that holds its files)")
    if name == "imagefolder":
        return _image_folder(root, val_size, seed, image_size or DEFAULT_IMAGE_SIZE)
    return _cifar(cifar.FORMATS[name], root, val_size, seed)


def dataset_name(name: str | None, data_dir: str | os.PathLike[str] | None) -> str:
    """The dataset ``load_dataset(name, data_dir)`` loads: ``name``; without it ``"digits"`` when there is no
    ``data_dir``, else the one detected in ``data_dir`` (see :func:`load_dataset`)."""
    if name is not None:
        return name
    if data_dir is None:
        return "digits"
    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    return _detect(root)


def download_dataset(
    name: str | None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch the official files of ``name`` (one of the MNIST family) that ``data_dir`` lacks; returns the folder.

    The files go into ``data_dir`` itself (created if needed; default: ``~/.cache/hdkd_fast/<name>``, or
    under ``$XDG_CACHE_HOME``). Files already there are kept. Each download shows a progress bar and is checked
    against its published MD5 before it is renamed into place; ``base_url`` (or ``$HDKD_FAST_DOWNLOAD_URL``)
    replaces the official servers. See :func:`hdkd_fast.data.idx.download`.

    Raises:
        ValueError for a dataset that cannot be downloaded; :class:`~hdkd_fast.data.idx.DownloadError` (a
        ValueError) naming the file and the URL when a download fails or its checksum does not match.
    """
    if name not in idx.FORMATS:
        raise ValueError(f"download needs the dataset named, one of {', '.join(idx.FORMATS)}; got {name!r}")
    fmt = idx.FORMATS[name]
    root = idx.cache_dir(fmt) if data_dir is None else Path(data_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"data_dir {root} is a file; the {fmt.title} files are downloaded into a folder")
    idx.download(fmt, root, base_url=base_url, progress=progress)
    return root


def _detect(root: Path) -> str:
    for fmt in cifar.FORMATS.values():
        if cifar.locate(fmt, root) is not None:
            return fmt.name
    found = idx.locate(root)
    if found is not None:
        idx_format = idx.identify(found)
        if idx_format is None:
            raise ValueError(
                f"{found} holds IDX files, but which dataset is it? MNIST, Fashion-MNIST and KMNIST share the "
                f"format: name it (--dataset {' / '.join(idx.FORMATS)}), or the folder after it"
            )
        return idx_format.name
    if folder.find_layout(root) is not None:
        return "imagefolder"
    raise ValueError(
        f"cannot tell which dataset data_dir {root} holds: expected the CIFAR-10 python folder "
        f"({cifar.CIFAR10.folder}: {', '.join(cifar.CIFAR10.files)}), the CIFAR-100 one ({cifar.CIFAR100.folder}: "
        f"{', '.join(cifar.CIFAR100.files)}), either .tar.gz archive, the IDX files of MNIST / Fashion-MNIST / "
        f"KMNIST ({', '.join(idx.FILES)}, raw or .gz), or an image folder (train/<class>/<image>)"
    )


def _digits(val_size: int | float | None, seed: int) -> DataBundle:
    everything = read_digits()
    pool, held = stratified_holdout(everything.labels, TEST_FRACTION, TEST_SEED, TEST_STREAM)
    train, test = everything.subset(pool), everything.subset(held)
    bundle = _bundle("digits", train, test, val_size, VAL_FRACTION, seed, DIGIT_NAMES)
    return dataclasses.replace(bundle, crop_padding=1, flip=False)


def _idx(fmt: idx.IdxFormat, root: Path | None, val_size: int | float | None, seed: int,
         image_size: int | None) -> DataBundle:
    if root is None:
        found = next((f for f in map(idx.locate, idx.default_dirs(fmt)) if f is not None), None)
        if found is None:
            system, cache = idx.default_dirs(fmt)
            raise FileNotFoundError(
                f"no {fmt.title} files: pass data_dir (the folder of {idx.TRAIN_IMAGES}[.gz] ...), "
                + (f"install the Debian package dataset-{fmt.name} ({system}), " if fmt.name == "fashion-mnist" else "")
                + f"or download them (hdkd-fast train --download, download=True) into {cache}"
            )
    else:
        found = idx.locate(root, fmt)
        if found is None:
            raise FileNotFoundError(
                f"no {fmt.title} files in {root}: expected {idx.TRAIN_IMAGES}[.gz] ... in it or in one of its "
                f"subfolders {', '.join(fmt.folders)} (download them with hdkd-fast train --download)"
            )
    train, test = idx.read_idx_dataset(fmt, found)
    padding = IDX_CROP_PADDING
    stored = min(train.image_shape[1:])
    if image_size is not None and image_size > stored:
        rows, cols = train.image_shape[1:]
        raise ValueError(f"image_size must be <= {stored} for the {fmt.title} files in {found} ({rows}x{cols} "
                         f"images): it area-resamples them down, never up; got {image_size}")
    if image_size is not None:
        padding = max(1, round(IDX_CROP_PADDING * image_size / train.image_shape[1]))  # the same shift in %
        train, test = train.resized(image_size), test.resized(image_size)
    bundle = _bundle(fmt.name, train, test, val_size, IDX_VAL_SIZE, seed, fmt.class_names)
    return dataclasses.replace(bundle, crop_padding=padding, flip=fmt.flip)


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
