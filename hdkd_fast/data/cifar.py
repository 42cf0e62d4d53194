"""CIFAR-10 and CIFAR-100 in the python-pickle format of https://www.cs.toronto.edu/~kriz/cifar.html.

A source is either the extracted folder (``cifar-10-batches-py/`` or ``cifar-100-python/``) or the
``.tar.gz`` archive it comes in; the archive is read in one pass with :mod:`tarfile`, without extracting.

Every batch file is a pickled dict (written by Python 2: bytes keys; str keys are accepted too) with
``b"data"``, a uint8 array ``[N, 3072]`` whose rows are the 1024 red, then green, then blue values of a
32×32 image in row-major order (so ``data.reshape(N, 3, 32, 32)`` is CHW), and the labels, a list of N ints:
``b"labels"`` (CIFAR-10: ``data_batch_1`` … ``data_batch_5``, ``test_batch``) or ``b"fine_labels"``
(CIFAR-100: ``train``, ``test``). The meta file holds the class names: ``batches.meta`` ``b"label_names"``
(CIFAR-10), ``meta`` ``b"fine_label_names"`` (CIFAR-100).

The pickles are loaded by an unpickler that only resolves the numpy globals an array needs, so a
tampered file cannot run code. A missing file raises :class:`FileNotFoundError`, a corrupt one
:class:`ValueError`, both naming the file.
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .dataset import TensorImageDataset


@dataclass(frozen=True)
class CifarFormat:
    """Where a CIFAR variant keeps its files and what they hold."""

    name: str
    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


# mean/std: the published per-channel statistics of the 50000 training images (numpy mean/std over all pixels).
CIFAR10 = CifarFormat(
    name="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarFormat(
    name="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
FORMATS = {fmt.name: fmt for fmt in (CIFAR10, CIFAR100)}

PIXELS = 3 * 32 * 32

# The globals a pickled numpy uint8 array refers to (numpy 1.x names; numpy >= 2 moved numpy.core to numpy._core).
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _UnsafeGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`_SAFE_GLOBALS`."""


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals of :data:`_SAFE_GLOBALS`: numpy arrays, dicts, lists, bytes and numbers."""

    def find_class(self, module: str, name: str) -> Any:
        old_name = module.replace("numpy._core", "numpy.core")
        if (old_name, name) not in _SAFE_GLOBALS:
            raise _UnsafeGlobal(f"it refers to {module}.{name}, which a CIFAR file never does (not loaded)")
        for candidate in dict.fromkeys((old_name.replace("numpy.core", "numpy._core"), old_name)):
            try:
                return super().find_class(candidate, name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name} with the installed numpy")


@dataclass(frozen=True)
class _Entry:
    content: Mapping[str, Any]
    origin: str


def locate(fmt: CifarFormat, data_dir: Path) -> Path | None:
    """The folder or archive under ``data_dir`` that holds ``fmt``'s files, or ``None``.

    Looks at ``data_dir`` itself (one of the files in it, or ``data_dir`` being the archive by its canonical
    name), then ``data_dir/<folder>`` and ``data_dir/<archive>``.
    """
    if data_dir.is_file():
        return data_dir if data_dir.name == fmt.archive else None
    if any((data_dir / name).is_file() for name in fmt.files):
        return data_dir
    if (data_dir / fmt.folder).is_dir():
        return data_dir / fmt.folder
    if (data_dir / fmt.archive).is_file():
        return data_dir / fmt.archive
    return None


def read_cifar(fmt: CifarFormat, source: Path) -> tuple[TensorImageDataset, TensorImageDataset, tuple[str, ...]]:
    """The training set, the test set and the class names of ``fmt`` read from a folder or an archive."""
    np = _numpy()
    entries = _read_archive(fmt, source) if source.is_file() else _read_folder(fmt, source)
    train = _concat([_arrays(fmt, entries[name], np) for name in fmt.train_files])
    test = _concat([_arrays(fmt, entries[name], np) for name in fmt.test_files])
    return train, test, _class_names(fmt, entries[fmt.meta_file])


def _read_folder(fmt: CifarFormat, folder: Path) -> dict[str, _Entry]:
    entries = {}
    for name in fmt.files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{fmt.title} file {path} is missing; the {fmt.folder} folder holds {', '.join(fmt.files)}"
            )
        with path.open("rb") as file:
            entries[name] = _load(file, str(path))
    return entries


def _read_archive(fmt: CifarFormat, archive: Path) -> dict[str, _Entry]:
    wanted = set(fmt.files)
    entries: dict[str, _Entry] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                path = member.name.removeprefix("./")
                folder, _, name = path.rpartition("/")
                if member.isfile() and folder == fmt.folder and name in wanted and name not in entries:
                    file = tar.extractfile(member)
                    if file is not None:
                        entries[name] = _load(file, f"member {path} of the archive {archive}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"cannot read the {fmt.title} archive {archive}: {err}") from err
    missing = [f"{fmt.folder}/{name}" for name in fmt.files if name not in entries]
    if missing:
        raise ValueError(f"the {fmt.title} archive {archive} has no member {', '.join(missing)}")
    return entries


def _load(file: IO[bytes], origin: str) -> _Entry:
    try:
        content = _ArrayUnpickler(file, encoding="bytes").load()
    except _UnsafeGlobal as err:
        raise ValueError(f"{origin} is not a CIFAR pickle: {err}") from err
    except Exception as err:  # a corrupt pickle can raise nearly anything; all of it means "not a CIFAR file"
        raise ValueError(f"{origin} is not a readable CIFAR pickle (truncated or corrupt?): {err!r}") from err
    if not isinstance(content, dict):
        raise ValueError(f"{origin} must hold a pickled dict; got {type(content).__name__}")
    keys = {(key.decode("latin-1") if isinstance(key, bytes) else key): value for key, value in content.items()}
    return _Entry(keys, origin)


def _arrays(fmt: CifarFormat, entry: _Entry, np: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = _field(entry, "data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        got = type(data).__name__
        if isinstance(data, np.ndarray):
            got = f"a {data.dtype} array of shape {list(data.shape)}"
        raise ValueError(f"{entry.origin}: 'data' must be a uint8 array [N, {PIXELS}] (N images 3x32x32); got {got}")
    raw_labels = _field(entry, fmt.label_key)
    labels = np.asarray(raw_labels) if isinstance(raw_labels, (list, tuple, np.ndarray)) else None
    n = data.shape[0]
    if labels is None or labels.shape != (n,) or not (n == 0 or np.issubdtype(labels.dtype, np.integer)):
        got = f"shape {list(labels.shape)}, dtype {labels.dtype}" if labels is not None else type(raw_labels).__name__
        raise ValueError(f"{entry.origin}: '{fmt.label_key}' must be {n} integer labels (one per image); got {got}")
    if n and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise ValueError(f"{entry.origin}: '{fmt.label_key}' holds {bad}, outside 0..{fmt.num_classes - 1}")
    images = torch.from_numpy(np.require(data, requirements=["C", "W"])).view(n, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _class_names(fmt: CifarFormat, entry: _Entry) -> tuple[str, ...]:
    names = _field(entry, fmt.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != fmt.num_classes:
        got = f"{len(names)} entries" if isinstance(names, (list, tuple)) else type(names).__name__
        raise ValueError(f"{entry.origin}: '{fmt.names_key}' must list {fmt.num_classes} class names; got {got}")
    return tuple(name.decode("utf-8", errors="replace") if isinstance(name, bytes) else str(name) for name in names)


def _field(entry: _Entry, key: str) -> Any:
    if key not in entry.content:
        keys = ", ".join(sorted(map(str, entry.content))) or "none"
        raise ValueError(f"{entry.origin} has no key {key!r} (keys: {keys})")
    return entry.content[key]


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> TensorImageDataset:
    images = parts[0][0] if len(parts) == 1 else torch.cat([images for images, _ in parts])
    labels = parts[0][1] if len(parts) == 1 else torch.cat([labels for _, labels in parts])
    return TensorImageDataset(images, labels)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading CIFAR needs numpy: pip install 'hdkd_fast[train]'") from err
    return numpy
