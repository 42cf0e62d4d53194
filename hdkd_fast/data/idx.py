"""MNIST, Fashion-MNIST and Kuzushiji-MNIST: 28×28 grayscale images in the IDX format, and their download.

The three datasets share the format and the file names (``train-*`` is the training set, ``t10k-*`` the
official test set), each file either raw or gzip-compressed (``.gz``; raw is read when both exist)::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]

An IDX file is a big-endian header, then the data in row-major order: two zero bytes, the type code
(``0x08``: unsigned bytes, the only one these datasets use), the number of dimensions (3 for images
``[N, rows, cols]``, 1 for labels ``[N]``), one int32 per dimension. :func:`read_idx` checks all of it and
that the file holds exactly that many bytes; a file that fails raises a ValueError naming it. It reads the
header first, then exactly the bytes the header announces (streaming, in chunks) and one byte more to
detect trailing data, so a file cannot make it use more memory than its header says: a raw file whose
size differs from the header's is refused before its data is read (a sparse file's hole included), a
``.gz`` that claims more than DEFLATE can inflate it to (:data:`MAX_INFLATION` times its size) is
refused unread, and one that inflates past its header's count is refused without inflating the rest.
Both splits must hold at least one image (checked when they are read, naming the file).

Where the files are (:func:`locate`): the folder itself, or a subfolder named after a dataset as the
usual tools lay them out (``fashion-mnist/``, as in the Debian package ``dataset-fashion-mnist``, which
installs ``/usr/share/datasets/fashion-mnist/``; torchvision's ``FashionMNIST/raw/``; ...). Which of the
three a folder holds (:func:`identify`) is read from the folder's path (a component named like a
dataset, nearest first), else from the checksum of the decompressed ``train-labels-idx1-ubyte``
(:attr:`IdxFormat.labels_sha256`; MNIST and Fashion-MNIST, raw or gzip, however compressed: Debian's
recompressed files too), else from the published MD5 of ``train-labels-idx1-ubyte.gz`` (the official
file itself; KMNIST is recognised this way only).

:func:`download` fetches the official ``.gz`` files from the maintainers' servers (or the base URL of
``$HDKD_FAST_DOWNLOAD_URL``, a local mirror), checks each against its published MD5 and only then moves
it into place (temporary file in the same folder, then :func:`os.replace`): a failed or corrupt
download leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import math
import os
import re
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from .dataset import TensorImageDataset

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
"""The four files of every dataset, without the ``.gz`` they are published with."""

UBYTE = 0x08
"""IDX type code of unsigned bytes."""
NUM_CLASSES = 10

DOWNLOAD_URL_ENV = "HDKD_FAST_DOWNLOAD_URL"
"""Environment variable: a base URL that replaces the official servers (``<base>/<file>.gz``)."""
SYSTEM_DIR = Path("/usr/share/datasets")
"""Where Debian's ``dataset-*`` packages install datasets (``apt-get install dataset-fashion-mnist``)."""
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
MAX_INFLATION = 1032
"""DEFLATE's largest expansion (258 bytes out of one length/distance pair of at least 2 bits): a ``.gz`` file
whose IDX header claims more than this many times the file's size is corrupt, and is refused unread."""
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IdxFormat:
    """One dataset in the IDX format: names, where it is published, and how it is augmented.

    ``md5``: the published MD5 of each ``<file>.gz`` (in :data:`FILES` order; what :func:`download` checks);
    ``labels_sha256``: the SHA-256 of the decompressed ``train-labels-idx1-ubyte`` (60008 bytes), which
    :func:`identify` recognises however the file was compressed (``None``: not known); ``mirrors``: base URLs,
    tried in order; ``folders``: subfolder names it is found under (also what :func:`identify` matches
    path components against, ignoring case and punctuation); ``flip``: whether mirroring an image keeps
    its class (clothes: yes; digits and characters: no).
    """

    name: str
    title: str
    mirrors: tuple[str, ...]
    md5: tuple[str, str, str, str]
    class_names: tuple[str, ...]
    folders: tuple[str, ...]
    flip: bool
    labels_sha256: str | None = None


# URLs and MD5s: the maintainers' published ones (as listed in torchvision.datasets.mnist; Fashion-MNIST's
# also in zalandoresearch/fashion-mnist's README). yann.lecun.com often refuses downloads, hence the PyTorch
# mirror first for MNIST. labels_sha256: the decompressed train labels, as several independent projects pin
# them; Fashion-MNIST's is also that of Debian's dataset-fashion-mnist (recompressed .gz files, so another
# .gz MD5), whose decompressed files have the published decompressed MD5s (train labels: 9018921c...).
# KMNIST's decompressed checksum was not found published: it is recognised by its .gz MD5 only.
MNIST = IdxFormat(
    name="mnist",
    title="MNIST",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    md5=(
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
    class_names=tuple(str(digit) for digit in range(10)),
    folders=("mnist", "MNIST/raw"),
    flip=False,
    labels_sha256="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
)
FASHION_MNIST = IdxFormat(
    name="fashion-mnist",
    title="Fashion-MNIST",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    md5=(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ),
    folders=("fashion-mnist", "FashionMNIST/raw"),
    flip=True,
    labels_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
)
KMNIST = IdxFormat(
    name="kmnist",
    title="Kuzushiji-MNIST",
    mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    md5=(
        "bdb82020997e1d708af4cf47b453dcf7",
        "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7",
        "7320c461ea6c1c855c0b718fb2a4b134",
    ),
    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),  # romanized hiragana, label order
    folders=("kmnist", "KMNIST/raw", "kuzushiji-mnist"),
    flip=False,
)
FORMATS = {fmt.name: fmt for fmt in (MNIST, FASHION_MNIST, KMNIST)}


class DownloadError(ValueError):
    """A file could not be fetched, or what was fetched does not match its published checksum.

    A ValueError, like every other "the data is not there / not right" error of :mod:`hdkd_fast.data`,
    so that the command line reports it in one line.
    """


# -- finding and identifying the files --------------------------------------------------------------------


def find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` (raw) or else ``folder/name.gz``, whichever is a file; ``None`` if neither."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate(root: Path, fmt: IdxFormat | None = None) -> Path | None:
    """The folder that holds the IDX files: ``root`` itself or a dataset subfolder of it, or ``None``.

    A folder counts when it has the training images (raw or ``.gz``); the other files are checked when
    they are read. With ``fmt``, only that dataset's subfolders are looked at (``root`` itself always).
    """
    if not root.is_dir():
        return None
    formats = (fmt,) if fmt is not None else tuple(FORMATS.values())
    for folder in (root, *(root / sub for f in formats for sub in f.folders)):
        if find_file(folder, TRAIN_IMAGES) is not None:
            return folder
    return None


def identify(folder: Path) -> IdxFormat | None:
    """Which dataset ``folder`` holds: from its path (nearest named component first), else from the SHA-256
    of its decompressed ``train-labels-idx1-ubyte`` (raw or ``.gz``; MNIST and Fashion-MNIST, whatever
    tool compressed the file), else from the published MD5 of its ``train-labels-idx1-ubyte.gz`` (the
    official file as published; the only way to recognise KMNIST); ``None`` when none tells.

    Raises ValueError naming the labels file when it is not a valid IDX file of labels.
    """
    keys = {_key(sub.split("/")[0]): fmt for fmt in FORMATS.values() for sub in fmt.folders}
    for part in reversed(folder.absolute().parts):  # the names the user gave (symlinks not followed)
        if _key(part) in keys:
            return keys[_key(part)]
    labels = find_file(folder, TRAIN_LABELS)
    if labels is None:
        return None
    content = hashlib.sha256(_idx_content(labels, 1)[0]).hexdigest()
    published = folder / f"{TRAIN_LABELS}.gz"
    md5 = _md5(published) if published.is_file() else None
    for fmt in FORMATS.values():
        if content == fmt.labels_sha256 or md5 == fmt.md5[FILES.index(TRAIN_LABELS)]:
            return fmt
    return None


def default_dirs(fmt: IdxFormat) -> tuple[Path, Path]:
    """Where ``fmt`` is looked for without a data directory: the Debian location, then the download cache."""
    return SYSTEM_DIR / fmt.name, cache_dir(fmt)


def cache_dir(fmt: IdxFormat) -> Path:
    """Where :func:`download` puts ``fmt`` without a data directory: ``$XDG_CACHE_HOME/hdkd_fast/<name>``
    (``~/.cache/hdkd_fast/<name>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hdkd_fast" / fmt.name


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


# -- reading ----------------------------------------------------------------------------------------------


def read_idx_dataset(fmt: IdxFormat, folder: Path) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The official training and test sets of ``fmt`` from the IDX files in ``folder``."""
    paths = {}
    for name in FILES:
        path = find_file(folder, name)
        if path is None:
            raise FileNotFoundError(
                f"{fmt.title} file {folder / name} (or {name}.gz) is missing; the folder must hold "
                f"{', '.join(FILES)} (each raw or .gz)"
            )
        paths[name] = path
    train = _pair(paths[TRAIN_IMAGES], paths[TRAIN_LABELS], "training")
    test = _pair(paths[TEST_IMAGES], paths[TEST_LABELS], "test")
    if train.image_shape != test.image_shape:
        raise ValueError(
            f"{paths[TEST_IMAGES]} holds images of {list(test.image_shape[1:])} pixels but "
            f"{paths[TRAIN_IMAGES]} holds {list(train.image_shape[1:])}"
        )
    return train, test


def _pair(images_path: Path, labels_path: Path, split: str) -> TensorImageDataset:
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path} holds {labels.shape[0]} labels but {images_path} {images.shape[0]} images")
    if images.shape[0] == 0:  # refused now, not after a whole run
        raise ValueError(f"{images_path} holds no images (its header says 0): the {split} split cannot be empty")
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"{labels_path} holds the label {int(labels.max())}, outside 0..{NUM_CLASSES - 1}")
    return TensorImageDataset(images.unsqueeze(1), labels.to(torch.int64))


def read_idx(path: Path, ndim: int) -> Tensor:
    """The uint8 array of the IDX file ``path`` (raw or gzip), which must have ``ndim`` dimensions.

    The header is read first, then exactly the bytes it announces, in chunks, and one byte more to detect
    trailing data (never inflated further); a raw file's size is compared with the header before any data is
    read, and a ``.gz`` that claims more than :data:`MAX_INFLATION` times its own size is refused unread.

    Raises ValueError naming the file when it is not readable gzip, its magic number, type code or number
    of dimensions is wrong, a dimension is 0 where it must not be, or its size does not match its header.
    """
    content, dims = _idx_content(path, ndim)
    header = 4 + 4 * ndim
    if len(content) == header:  # no data: frombuffer refuses an empty buffer
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(content, dtype=torch.uint8, offset=header).view(dims)


def _idx_content(path: Path, ndim: int) -> tuple[bytearray, tuple[int, ...]]:
    """The decompressed bytes of the IDX file ``path`` (header included) and its dimensions, checked as
    :func:`read_idx` says; memory is bounded by what the header announces, whatever the file holds."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        gzipped = file.read(2) == GZIP_MAGIC
        file.seek(0)
        if not gzipped:
            return _read_stream(path, file, ndim, size, gzipped=False)
        try:
            with gzip.GzipFile(fileobj=file, mode="rb") as stream:
                return _read_stream(path, stream, ndim, size, gzipped=True)
        except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path} is not readable gzip (truncated or corrupt?): {err}") from err


def _read_stream(path: Path, stream: io.BufferedIOBase, ndim: int, size: int,
                 gzipped: bool) -> tuple[bytearray, tuple[int, ...]]:
    """:func:`_idx_content` on the open (raw or decompressing) ``stream``; ``size``: the file's size."""
    header = 4 + 4 * ndim
    data = bytearray()
    _read_into(stream, data, 4)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it does not start with the magic number 0x0000")
    if data[2] != UBYTE:
        raise ValueError(f"{path}: IDX type code 0x{data[2]:02x}; expected 0x{UBYTE:02x} (unsigned bytes)")
    if data[3] != ndim:
        what = "images [N, rows, cols]" if ndim == 3 else "labels [N]"
        raise ValueError(f"{path}: an IDX array of {data[3]} dimensions; expected {ndim} ({what})")
    _read_into(stream, data, header - 4)
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes; the header is {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if ndim == 3 and (dims[1] < 1 or dims[2] < 1):
        raise ValueError(f"{path}: images of {dims[1]}x{dims[2]} pixels")
    count = math.prod(dims)
    expected = header + count
    says = f"its header ({' x '.join(map(str, dims))} unsigned bytes) says {expected}"
    if not gzipped and size != expected:  # before reading: a sparse file's hole is never read
        problem = "truncated" if size < expected else "trailing data"
        raise ValueError(f"{path} holds {size} bytes but {says}: {problem} or corrupt")
    if gzipped and count > MAX_INFLATION * size:
        raise ValueError(f"{path} holds {size} bytes of gzip but {says}, more than DEFLATE can inflate them to "
                         f"(at most {MAX_INFLATION}-fold): corrupt")
    _read_into(stream, data, count)
    if len(data) < expected:
        raise ValueError(f"{path} holds {len(data)} bytes but {says}: truncated or corrupt")
    if stream.read(1):  # one byte past the end is enough: what follows is not inflated
        raise ValueError(f"{path} holds more than {expected} bytes but {says}: trailing data or corrupt")
    return data, dims


def _read_into(stream: io.BufferedIOBase, data: bytearray, count: int) -> None:
    """Append up to ``count`` bytes of ``stream`` to ``data``, :data:`CHUNK` at a time (fewer at its end)."""
    end = len(data) + count
    while len(data) < end:
        chunk = stream.read(min(CHUNK, end - len(data)))
        if not chunk:
            return
        data += chunk


# -- downloading ------------------------------------------------------------------------------------------


def download(
    fmt: IdxFormat, root: Path, *, base_url: str | None = None, progress: bool = True
) -> list[Path]:
    """Fetch the four official ``.gz`` files of ``fmt`` into ``root`` (created if needed); returns the new files.

    A file already in ``root`` (raw or ``.gz``) is kept as it is. Every other one is downloaded from
    ``base_url`` (default: ``$HDKD_FAST_DOWNLOAD_URL``, else the official mirrors in turn) into a temporary
    file in ``root``, with a tqdm progress bar, and renamed into place only once its MD5 matched the
    published one; the files fetched before a failure stay (they are verified). Concurrent calls (several
    ranks) are safe: each writes its own temporary file and the renames replace a file with the same bytes.

    Raises:
        DownloadError naming the file and the URL(s): unreachable, HTTP error, or an MD5 mismatch (with
        both checksums).
    """
    base = base_url if base_url is not None else os.environ.get(DOWNLOAD_URL_ENV) or None
    mirrors = (base,) if base else fmt.mirrors
    created = [folder for folder in (root, *root.absolute().parents) if not folder.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create the folder {root} for the {fmt.title} files: {err}") from err
    fetched = []
    try:
        for name, md5 in zip(FILES, fmt.md5, strict=True):
            if find_file(root, name) is not None:
                continue
            filename = f"{name}.gz"
            failures = []
            for mirror in mirrors:
                url = f"{mirror.rstrip('/')}/{filename}"
                try:
                    _fetch(url, root / filename, md5, progress)
                except DownloadError as err:
                    failures.append(str(err))
                    continue
                fetched.append(root / filename)
                break
            else:
                raise DownloadError(f"cannot download the {fmt.title} file {filename}: " + "; ".join(failures))
    finally:
        for folder in created:  # the folders made here, if nothing was saved in them
            try:
                folder.rmdir()
            except OSError:
                break
    return fetched


def _fetch(url: str, target: Path, md5: str, progress: bool) -> None:
    """``url`` -> ``target``, atomically, only if its MD5 is ``md5``."""
    from tqdm.auto import tqdm

    digest = hashlib.md5(usedforsecurity=False)
    with _temporary(target) as (temp, file):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                size = response.headers.get("Content-Length")
                total = int(size) if size and size.isdigit() else None
                with tqdm(total=total, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024,
                          disable=not progress, leave=False, dynamic_ncols=True) as bar:
                    while chunk := response.read(CHUNK):
                        file.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError/HTTPError are OSErrors; bad URL
            reason = getattr(err, "reason", None) or err
            raise DownloadError(f"{url}: {reason}") from err
        if digest.hexdigest() != md5:
            raise DownloadError(
                f"{url}: checksum mismatch: its MD5 is {digest.hexdigest()}, the published one {md5} "
                "(corrupt or not the official file; nothing was saved)"
            )
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(temp, target)


@contextlib.contextmanager
def _temporary(target: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """A temporary file next to ``target``, removed unless it was renamed to ``target``."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    file = os.fdopen(fd, "wb")
    try:
        yield temp, file
    finally:
        file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
