"""ImageFolder-style datasets, decoded lazily with Pillow.

Layout: ``root/train/<class>/<image>`` and, optionally, ``root/test/<class>/...`` and ``root/val/<class>/...``.
The classes are the sorted names of the folders in ``train`` (hidden ones skipped); the images are the files
under a class folder (recursively) whose extension is one of :data:`IMAGE_EXTENSIONS` (any case), sorted by
path. ``test`` is the test split; without it, ``val`` is (the ImageNet convention); with both, ``val`` is
the validation split.

Every image is decoded to RGB, its shorter side resized to ``image_size`` and center-cropped to
``image_size × image_size`` (one bilinear, antialiased Pillow resize of the central square), and returned
as a uint8 ``Tensor[3, image_size, image_size]``. A file Pillow cannot decode raises a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .dataset import ImageDataset

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FolderLayout:
    """The split folders of an image-folder root."""

    train: Path
    test: Path | None
    val: Path | None


def find_layout(root: Path) -> FolderLayout | None:
    """The layout of ``root``, or ``None`` when it has no ``train`` folder."""
    if not (root / "train").is_dir():
        return None
    test, val = root / "test", root / "val"
    if test.is_dir():
        return FolderLayout(root / "train", test, val if val.is_dir() else None)
    return FolderLayout(root / "train", val if val.is_dir() else None, None)


def scan_split(folder: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], Tensor, tuple[str, ...]]:
    """The image paths, labels and class names of one split folder.

    ``classes=None`` reads the classes from ``folder`` (the training split); otherwise every class folder
    must be one of ``classes`` and takes its label from them.
    """
    found = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise ValueError(f"{folder} has no class folder: expected {folder}/<class>/<image>")
    names = tuple(found) if classes is None else tuple(classes)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{folder} has class folders that the training split lacks: {', '.join(unknown)}")
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        files = sorted(
            str(path)
            for path in (folder / name).rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
        )
        if not files:
            raise ValueError(f"the class folder {folder / name} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [names.index(name)] * len(files)
    return tuple(paths), torch.tensor(labels, dtype=torch.int64), names


class FolderImageDataset(ImageDataset):
    """Image files decoded on access: ``paths[i]`` with label ``labels[i]``, as uint8 ``[3, size, size]``."""

    in_memory = False

    def __init__(self, paths: Sequence[str], labels: Tensor, image_size: int) -> None:
        if labels.shape != (len(paths),):
            raise ValueError(f"labels must have shape [{len(paths)}] (one per path); got {list(labels.shape)}")
        self.paths = tuple(paths)
        self.labels = labels.to(torch.int64)
        self.image_size = image_size
        self.image_shape = (3, image_size, image_size)

    def _fetch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        images = [decode_image(self.paths[i], self.image_size) for i in indices.tolist()]
        stacked = torch.stack(images) if images else torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return stacked, self.labels[indices]

    def _select(self, indices: Tensor) -> FolderImageDataset:
        return FolderImageDataset([self.paths[i] for i in indices.tolist()], self.labels[indices], self.image_size)

    def __repr__(self) -> str:
        return f"FolderImageDataset({len(self)} images, decoded to {list(self.image_shape)})"


def decode_image(path: str, size: int) -> Tensor:
    """The image file at ``path`` as RGB uint8 ``[3, size, size]``: shorter side resized, center crop."""
    image_module = _pillow()
    try:
        with image_module.open(path) as image:
            image.draft("RGB", (size, size))  # lets JPEG decode at a reduced scale that is still >= size
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as err:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error ...)
        raise ValueError(f"cannot decode the image file {path}: {err}") from err
    width, height = rgb.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    square = rgb.resize((size, size), image_module.Resampling.BILINEAR, box=box)
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).contiguous()


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("image folders are decoded with Pillow: pip install 'hdkd_fast[train]'") from err
    return Image
