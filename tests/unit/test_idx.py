"""MNIST, Fashion-MNIST and KMNIST (IDX files): reading raw and gzip files, the official split with its
validation holdout, detection (by folder, by checksum, Debian's location), clear errors for bad files, and
``--download`` against a real HTTP server on 127.0.0.1 (checksums, atomic writes, nothing left behind).

Every test writes its own small IDX files in the real format; none needs the network or the Debian package.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import http.server
import json
import os
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from hdkd_fast.cli import main
from hdkd_fast.data import (
    DATASETS,
    IDX_DATASETS,
    DownloadError,
    ImageDataset,
    TensorImageDataset,
    download_dataset,
    idx,
    load_dataset,
)
from hdkd_fast.training.config import IDX_EPOCHS, TrainConfig
from tests.support.cli_helpers import expect_error

FAST = ["--limit", "96", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress"]


# --- writing IDX files --------------------------------------------------------------------------------------


def idx_bytes(array: Tensor, type_code: int = idx.UBYTE) -> bytes:
    """``array`` (uint8) as an IDX file: magic 0x0000, type code, number of dimensions, big-endian dims, data."""
    header = struct.pack(f">HBB{array.dim()}I", 0, type_code, array.dim(), *array.shape)
    return header + array.contiguous().numpy().tobytes()


def write_idx(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def random_split(n: int, generator: torch.Generator, size: int = 28) -> tuple[Tensor, Tensor]:
    images = torch.randint(1, 256, (n, size, size), dtype=torch.uint8, generator=generator)  # non-zero pixels
    labels = torch.randperm(n, generator=generator) % 10
    return images, labels.to(torch.uint8)


def write_set(folder: Path, n_train: int = 40, n_test: int = 12, *, gz: str = "all", seed: int = 0,
              size: int = 28) -> dict[str, tuple[Tensor, Tensor]]:
    """The four files in ``folder``: ``gz`` = "all" (.gz), "none" (raw) or "mixed" (images .gz, labels raw)."""
    generator = torch.Generator().manual_seed(seed)
    sets = {"train": random_split(n_train, generator, size), "t10k": random_split(n_test, generator, size)}
    for prefix, (images, labels) in sets.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            compress = gz == "all" or (gz == "mixed" and kind.startswith("images"))
            write_idx(folder / f"{prefix}-{kind}-ubyte{'.gz' if compress else ''}", idx_bytes(array))
    return sets


def rows(images: Tensor, labels: Tensor) -> collections.Counter[tuple[bytes, int]]:
    return collections.Counter(zip((im.numpy().tobytes() for im in images), labels.tolist(), strict=True))


def everything(dataset: ImageDataset) -> tuple[Tensor, Tensor]:
    assert isinstance(dataset, TensorImageDataset)
    return dataset.images, dataset.labels


# --- reading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", ["all", "none", "mixed"])
def test_idx_round_trip(tmp_path: Path, gz: str) -> None:
    written = write_set(tmp_path / "f", gz=gz)
    bundle = load_dataset("fashion-mnist", tmp_path / "f", val_size=8, seed=3)
    assert (bundle.name, bundle.num_classes, bundle.input_shape) == ("fashion-mnist", 10, (1, 28, 28))
    assert bundle.class_names[:2] == ("T-shirt/top", "Trouser") and len(bundle.class_names) == 10
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (32, 8, 12)
    train_images, train_labels = written["train"]
    test_images, test_labels = written["t10k"]
    # the official split: every training image in train or val, the test set as it is, in order
    got = rows(*everything(bundle.train)) + rows(*everything(bundle.val))
    assert got == rows(train_images.unsqueeze(1), train_labels.long())
    images, labels = everything(bundle.test)
    assert torch.equal(images, test_images.unsqueeze(1)) and torch.equal(labels, test_labels.long())
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    x = everything(bundle.train)[0].double() / 255
    assert bundle.mean == pytest.approx((x.mean().item(),))
    assert bundle.std == pytest.approx((x.std(correction=0).item(),))
    assert (bundle.crop_padding, bundle.flip) == (2, True)  # a mirrored garment is the same garment


def test_idx_augmentation_and_defaults(tmp_path: Path) -> None:
    write_set(tmp_path / "d")
    for name in ("mnist", "kmnist"):
        bundle = load_dataset(name, tmp_path / "d", val_size=4)
        assert (bundle.name, bundle.crop_padding, bundle.flip) == (name, 2, False)  # mirrored digits/characters
    assert load_dataset("kmnist", tmp_path / "d", val_size=4).class_names[:3] == ("o", "ki", "su")
    for name in IDX_DATASETS:
        config = TrainConfig(dataset=name).resolved()
        assert (config.model, config.epochs) == ("msdnet-tiny", IDX_EPOCHS)
    assert IDX_DATASETS == ("mnist", "fashion-mnist", "kmnist") and set(IDX_DATASETS) <= set(DATASETS)


def test_idx_default_validation_split_is_5000_and_seeded(tmp_path: Path) -> None:
    write_set(tmp_path / "m", n_train=5040, n_test=3)
    a, b, c = (load_dataset("mnist", tmp_path / "m", seed=s) for s in (1, 1, 2))
    assert (len(a.train), len(a.val), len(a.test)) == (40, 5000, 3)
    assert torch.equal(everything(a.val)[0], everything(b.val)[0])
    assert not torch.equal(everything(a.train)[0], everything(c.train)[0])
    assert len(load_dataset("mnist", tmp_path / "m", val_size=0.5).val) == 2520


def test_images_of_another_size(tmp_path: Path) -> None:
    write_set(tmp_path / "k", size=20)
    assert load_dataset("kmnist", tmp_path / "k", val_size=4).input_shape == (1, 20, 20)


@pytest.mark.parametrize("size", [14, 7, 10, 28])
def test_image_size_area_resamples(tmp_path: Path, size: int) -> None:
    """Each pixel the mean of the 28×28 pixels it covers (a 2×2 / 4×4 block mean for 14 / 7), rounded;
    compared in float64 with adaptive average pooling, which is the same area resampling."""
    sets = write_set(tmp_path / "f", n_train=30, n_test=9)
    bundle = load_dataset("fashion-mnist", tmp_path / "f", val_size=5, image_size=size)
    assert bundle.input_shape == (1, size, size)
    assert bundle.crop_padding == max(1, round(2 * size / 28))
    test_images, test_labels = everything(bundle.test)
    want = F.adaptive_avg_pool2d(sets["t10k"][0].unsqueeze(1).double(), size).round().to(torch.uint8)
    assert torch.equal(test_images, want)
    if size == 14:  # the block mean, written out
        blocks = sets["t10k"][0].double().reshape(9, 14, 2, 14, 2).mean(dim=(2, 4)).round().to(torch.uint8)
        assert torch.equal(test_images[:, 0], blocks)
    assert torch.equal(test_labels, sets["t10k"][1].long())
    assert len(bundle.train) + len(bundle.val) == 30


def test_image_size_is_bounded(tmp_path: Path) -> None:
    """The MNIST family is only shrunk (at most its stored side); no dataset goes above MAX_IMAGE_SIZE."""
    write_set(tmp_path / "fashion-mnist", n_train=20, n_test=4, gz="none", size=20)
    assert load_dataset("fashion-mnist", tmp_path, val_size=4, image_size=20).input_shape == (1, 20, 20)
    with pytest.raises(ValueError, match=re.escape(f"image_size must be <= 20 for the Fashion-MNIST files in "
                                                   f"{tmp_path / 'fashion-mnist'} (20x20 images): it area-resamples "
                                                   "them down, never up; got 21")):
        load_dataset("fashion-mnist", tmp_path, val_size=4, image_size=21)
    for name in ("fashion-mnist", "imagefolder"):
        with pytest.raises(ValueError, match=r"image_size must be <= 1024 \(the largest side images are resampled "
                           r"to\); got 5000"):
            load_dataset(name, tmp_path, image_size=5000)


def test_train_size_is_a_seeded_subset(tmp_path: Path) -> None:
    write_set(tmp_path / "m", n_train=60, n_test=7)
    full = load_dataset("mnist", tmp_path / "m", val_size=10, seed=3)
    a, b, c = (load_dataset("mnist", tmp_path / "m", val_size=10, seed=s, train_size=12) for s in (3, 3, 4))
    assert len(a.train) == 12 and len(c.train) == 12
    assert torch.equal(everything(a.train)[0], everything(b.train)[0])  # same seed, same subset
    assert not torch.equal(everything(a.train)[0], everything(c.train)[0])
    assert not rows(*everything(a.train)) - rows(*everything(full.train))  # drawn from the training split
    assert torch.equal(everything(a.val)[0], everything(full.val)[0])  # validation, test, statistics unchanged
    assert torch.equal(everything(a.test)[0], everything(full.test)[0])
    assert (a.mean, a.std) == (full.mean, full.std)
    assert len(load_dataset("mnist", tmp_path / "m", val_size=10, train_size=1000).train) == 50
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="train_size must be a positive int"):
            load_dataset("mnist", tmp_path / "m", train_size=bad)  # type: ignore[arg-type]


# --- detection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sub", "name"), [
    ("fashion-mnist", "fashion-mnist"), ("FashionMNIST/raw", "fashion-mnist"), ("MNIST/raw", "mnist"),
    ("mnist", "mnist"), ("KMNIST/raw", "kmnist"), ("kmnist", "kmnist"),
])  # fmt: skip
def test_detection_from_the_folder(tmp_path: Path, sub: str, name: str) -> None:
    write_set(tmp_path / "data" / sub, gz="mixed")
    for data_dir in (tmp_path / "data", tmp_path / "data" / sub):  # the root or the dataset's own folder
        bundle = load_dataset(None, data_dir, val_size=4)
        assert bundle.name == name and len(bundle.test) == 12


def test_detection_by_published_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_set(tmp_path / "files")
    with pytest.raises(ValueError, match=r"holds IDX files, but which dataset is it\? .*--dataset mnist / fashion"):
        load_dataset(None, tmp_path / "files")
    digest = hashlib.md5((tmp_path / "files" / "train-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    md5 = list(idx.KMNIST.md5)
    md5[1] = digest  # as if these were the official KMNIST labels
    monkeypatch.setitem(idx.FORMATS, "kmnist", dataclasses.replace(idx.KMNIST, md5=tuple(md5)))
    assert load_dataset(None, tmp_path / "files", val_size=4).name == "kmnist"
    assert load_dataset("mnist", tmp_path / "files", val_size=4).name == "mnist"  # a name always wins


def test_named_dataset_among_several(tmp_path: Path) -> None:
    mnist = write_set(tmp_path / "mnist", seed=1)
    fashion = write_set(tmp_path / "fashion-mnist", seed=2)
    for name, written in (("mnist", mnist), ("fashion-mnist", fashion)):
        bundle = load_dataset(name, tmp_path, val_size=4)
        assert torch.equal(everything(bundle.test)[0].squeeze(1), written["t10k"][0])


def test_without_data_dir_debian_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path / "usr-share-datasets")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"no Fashion-MNIST files: .*Debian package dataset-fashion-mnist "
                       r"\(.*usr-share-datasets/fashion-mnist\).* into .*cache/hdkd_fast/fashion-mnist"):
        load_dataset("fashion-mnist")
    with pytest.raises(FileNotFoundError, match=r"no MNIST files: .* into .*cache/hdkd_fast/mnist"):
        load_dataset("mnist")
    write_set(tmp_path / "cache" / "hdkd_fast" / "fashion-mnist", seed=1)
    assert len(load_dataset("fashion-mnist", val_size=4).test) == 12
    write_set(tmp_path / "usr-share-datasets" / "fashion-mnist", n_test=5, seed=2)  # as apt-get installs it
    assert len(load_dataset("fashion-mnist", val_size=4).test) == 5  # Debian's copy comes first


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist() -> None:
    bundle = load_dataset(None, DEBIAN)
    assert (bundle.name, bundle.input_shape) == ("fashion-mnist", (1, 28, 28))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (55000, 5000, 10000)
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10


def test_detection_by_decompressed_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checksum of the decompressed train labels: the same dataset recompressed (another .gz MD5) or raw."""
    write_set(tmp_path / "files", gz="none")
    labels = tmp_path / "files" / "train-labels-idx1-ubyte"
    content = labels.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    monkeypatch.setitem(idx.FORMATS, "fashion-mnist", dataclasses.replace(idx.FASHION_MNIST, labels_sha256=digest))
    assert load_dataset(None, tmp_path / "files", val_size=4).name == "fashion-mnist"  # raw
    labels.unlink()
    for level, mtime in ((1, 0), (9, 1_591_000_000)):  # recompressed: another .gz MD5 each time
        Path(f"{labels}.gz").write_bytes(gzip.compress(content, compresslevel=level, mtime=mtime))
        assert idx.identify(tmp_path / "files") is idx.FORMATS["fashion-mnist"]
    write_idx(labels, idx_bytes(LABELS, 0x0C))  # a corrupt labels file is named, not taken for an unknown dataset
    with pytest.raises(ValueError, match=rf"{labels}: IDX type code 0x0c"):
        idx.identify(tmp_path / "files")


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist_detected_in_a_neutral_folder(tmp_path: Path) -> None:
    """Debian's recompressed .gz files (their MD5 is not the published one) are recognised by their content
    wherever they lie, compressed or not; the decompressed labels are the published ones (their published
    decompressed MD5, 60000 labels, 6000 per class)."""
    labels = DEBIAN / "train-labels-idx1-ubyte.gz"
    assert hashlib.md5(labels.read_bytes()).hexdigest() != idx.FASHION_MNIST.md5[1]
    content = gzip.decompress(labels.read_bytes())
    assert hashlib.md5(content).hexdigest() == "9018921c3c673c538a1fc5bad174d6f9"
    assert hashlib.sha256(content).hexdigest() == idx.FASHION_MNIST.labels_sha256
    assert torch.bincount(idx.read_idx(labels, 1).long()).tolist() == [6000] * 10
    neutral = tmp_path / "data"
    neutral.mkdir()
    for name in idx.FILES:
        (neutral / f"{name}.gz").symlink_to(DEBIAN / f"{name}.gz")
    assert idx.identify(neutral) is idx.FASHION_MNIST
    (neutral / "train-labels-idx1-ubyte").write_bytes(content)  # raw is read first
    assert idx.identify(neutral) is idx.FASHION_MNIST


# --- bad files ----------------------------------------------------------------------------------------------

LABELS = torch.arange(12, dtype=torch.uint8) % 10
IMAGES = torch.ones(12, 28, 28, dtype=torch.uint8)
BAD_FILES = {
    # case: (file, its bytes, message)
    "magic": ("t10k-images-idx3-ubyte", b"\x01\x00" + idx_bytes(IMAGES)[2:], "does not start with the magic number"),
    "type code": ("t10k-images-idx3-ubyte", idx_bytes(IMAGES, 0x0D), "IDX type code 0x0d; expected 0x08"),
    "dimensions": ("t10k-images-idx3-ubyte", idx_bytes(IMAGES.view(12, 784)), "2 dimensions; expected 3"),
    "label dimensions": ("t10k-labels-idx1-ubyte", idx_bytes(IMAGES), "3 dimensions; expected 1 (labels"),
    "truncated": ("t10k-images-idx3-ubyte", idx_bytes(IMAGES)[:-5], "says 9424: truncated or corrupt"),
    "too long": ("t10k-images-idx3-ubyte", idx_bytes(IMAGES) + b"\0",
                 "bytes but its header (12 x 28 x 28 unsigned bytes) says 9424: trailing data or corrupt"),
    "header": ("t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01\x00", "truncated IDX header"),
    "empty": ("t10k-labels-idx1-ubyte", b"", "does not start with the magic number"),
    "zero pixels": ("t10k-images-idx3-ubyte", struct.pack(">HBB3I", 0, 8, 3, 12, 0, 28), "images of 0x28 pixels"),
    "count": ("t10k-labels-idx1-ubyte", idx_bytes(LABELS[:11]), "holds 11 labels but"),
    "label": ("t10k-labels-idx1-ubyte", idx_bytes(LABELS + 1), "holds the label 10, outside 0..9"),
    "size": ("t10k-images-idx3-ubyte", idx_bytes(IMAGES[:, :27]), "images of [27, 28] pixels but"),
}


@pytest.mark.parametrize(("case", "gz"), [(case, gz) for case in BAD_FILES for gz in (False, True)])
def test_bad_idx_file_is_named(tmp_path: Path, case: str, gz: bool) -> None:
    write_set(tmp_path, gz="none")
    name, content, message = BAD_FILES[case]
    (tmp_path / name).unlink()
    path = write_idx(tmp_path / (name + (".gz" if gz else "")), content)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_dataset("mnist", tmp_path, val_size=4)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_gzip_and_missing_files(tmp_path: Path) -> None:
    write_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=rf"{path} is not readable gzip \(truncated or corrupt\?\)"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"MNIST file .*t10k-labels-idx1-ubyte \(or .*\.gz\) is missing"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no Kuzushiji-MNIST files in .*nothing: expected"):
        load_dataset("kmnist", tmp_path / "nothing")


# --- decompression bombs and lying headers (issue 22, item 1) ---------------------------------------------

BOMB_SIZE = 256 << 20
"""What each bomb holds past the bytes its header announces: 256 MiB (a few hundred KiB on disk)."""
READ_IN_A_SUBPROCESS = """
import resource, sys
from pathlib import Path
from hdkd_fast.data import idx
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    idx.read_idx(Path(sys.argv[1]), 3)
    print("accepted")
except ValueError as err:
    print(err)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def gzip_bomb(path: Path) -> Path:
    """A .gz whose header claims 3 images, followed by 256 MiB of zeros: gzip members, each 1 MiB of zeros
    compressed once and repeated (a multi-member .gz is one stream to every reader)."""
    member = gzip.compress(bytes(1 << 20), compresslevel=9, mtime=0)
    path.write_bytes(gzip.compress(idx_bytes(IMAGES[:3]), mtime=0) + member * (BOMB_SIZE >> 20))
    return path


def sparse_bomb(path: Path) -> Path:
    """A raw file: the header and data of 3 images, then a 256 MiB hole (nothing on disk)."""
    with path.open("wb") as file:
        file.write(idx_bytes(IMAGES[:3]))
        file.truncate(len(idx_bytes(IMAGES[:3])) + BOMB_SIZE)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (gzip_bomb, "holds more than 2368 bytes but its header (3 x 28 x 28 unsigned bytes) says 2368: trailing data"),
    (sparse_bomb, f"holds {2368 + BOMB_SIZE} bytes but its header (3 x 28 x 28 unsigned bytes) says 2368: "
                  "trailing data or corrupt"),
], ids=["gzip", "sparse"])  # fmt: skip
def test_bomb_is_refused_without_reading_it(tmp_path: Path, make: object, message: str) -> None:
    """Refused with the file named, and the reading process's peak memory grows by far less than the bomb
    (the whole file read or inflated would add 256 MiB or more)."""
    assert callable(make)
    path = make(tmp_path / ("train-images-idx3-ubyte" + (".gz" if make is gzip_bomb else "")))
    assert path.stat().st_blocks * 512 < 1 << 20  # small on disk
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", READ_IN_A_SUBPROCESS, str(path)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    error, grown_kib = done.stdout.strip().splitlines()
    assert int(grown_kib) < 32 * 1024, f"peak memory grew by {int(grown_kib) >> 10} MiB"
    assert error.startswith(f"{path} ") and message in error, error


def test_header_claiming_more_than_gzip_can_hold(tmp_path: Path) -> None:
    """A .gz cannot inflate more than 1032-fold: a header that claims more is refused before any data is read."""
    claim = struct.pack(">HBB3I", 0, idx.UBYTE, 3, 100_000_000, 28, 28)  # 78 GB of images, in a file of ~70 bytes
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", claim + bytes(64))
    with pytest.raises(ValueError, match=re.escape(f"{path} holds {path.stat().st_size} bytes of gzip but its header "
                                                   "(100000000 x 28 x 28 unsigned bytes) says 78400000016, more than "
                                                   "DEFLATE can inflate them to (at most 1032-fold): corrupt")):
        idx.read_idx(path, 3)
    raw = write_idx(tmp_path / "train-images-idx3-ubyte", claim + bytes(64))  # raw: its size, before reading
    with pytest.raises(ValueError, match=re.escape(f"{raw} holds 80 bytes but its header (100000000 x 28 x 28 "
                                                   "unsigned bytes) says 78400000016: truncated or corrupt")):
        idx.read_idx(raw, 3)


def test_gzip_checked_to_its_end(tmp_path: Path) -> None:
    """Reading one byte past the announced data reaches the end of the gzip stream, so its CRC is still checked."""
    content = gzip.compress(idx_bytes(IMAGES), mtime=0)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(content[:-8] + bytes(4) + content[-4:])  # the CRC-32 zeroed, the data intact
    with pytest.raises(ValueError, match=rf"{path} is not readable gzip \(truncated or corrupt\?\): CRC check failed"):
        idx.read_idx(path, 3)
    path.write_bytes(content)
    assert torch.equal(idx.read_idx(path, 3), IMAGES)


# --- empty splits (issue 22, item 3) -------------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "split"), [("t10k", "test"), ("train", "training")])
def test_empty_split_is_refused_when_read(tmp_path: Path, prefix: str, split: str) -> None:
    write_set(tmp_path, gz="none")
    for kind, array in (("images-idx3", IMAGES[:0]), ("labels-idx1", LABELS[:0])):
        write_idx(tmp_path / f"{prefix}-{kind}-ubyte", idx_bytes(array))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / prefix}-images-idx3-ubyte holds no images (its "
                                                   f"header says 0): the {split} split cannot be empty")):
        load_dataset("mnist", tmp_path, val_size=4)


# --- download -----------------------------------------------------------------------------------------------


class Server:
    """http.server on 127.0.0.1 in a thread, serving ``root``; ``requests`` lists the paths asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    (tmp_path / "served" / "files").mkdir(parents=True)
    served = Server(tmp_path / "served")
    yield served
    served.close()


def publish(server: Server, monkeypatch: pytest.MonkeyPatch, name: str = "mnist") -> dict[str, tuple[Tensor, Tensor]]:
    """Real-format .gz files on the server, with their MD5s standing in for the published ones of ``name``."""
    written = write_set(server.root / "files", seed=7)
    md5 = tuple(hashlib.md5((server.root / "files" / f"{f}.gz").read_bytes()).hexdigest() for f in idx.FILES)
    monkeypatch.setitem(idx.FORMATS, name, dataclasses.replace(idx.FORMATS[name], md5=md5))
    return written


def test_download(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    written = publish(server, monkeypatch)
    target = tmp_path / "new" / "mnist"
    assert download_dataset("mnist", target, base_url=server.url + "/") == target
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{f}.gz" for f in idx.FILES)  # no temporary left
    assert sorted(server.requests) == sorted(f"/files/{f}.gz" for f in idx.FILES)
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err  # the progress bar
    bundle = load_dataset("mnist", target, val_size=4)
    assert torch.equal(everything(bundle.test)[0].squeeze(1), written["t10k"][0])
    # files already there are not fetched again; a missing one is
    (target / "t10k-labels-idx1-ubyte.gz").unlink()
    server.requests.clear()
    monkeypatch.setenv(idx.DOWNLOAD_URL_ENV, server.url)  # the environment's base URL
    assert len(load_dataset("mnist", target, val_size=4, download=True).test) == 12
    assert server.requests == ["/files/t10k-labels-idx1-ubyte.gz"]


def test_download_default_folder_is_the_cache(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(server, monkeypatch, "kmnist")
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(idx.DOWNLOAD_URL_ENV, server.url)
    assert load_dataset("kmnist", download=True, val_size=4).name == "kmnist"
    assert (tmp_path / "cache" / "hdkd_fast" / "kmnist" / "train-images-idx3-ubyte.gz").is_file()
    assert len(load_dataset("kmnist", val_size=4).test) == 12  # found there later without download


def test_corrupt_download_leaves_nothing(server: Server, tmp_path: Path) -> None:
    write_set(server.root / "files")  # real-format files, but not the official ones: every MD5 differs
    (server.root / "files" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b corrupted")
    digest = hashlib.md5(b"\x1f\x8b corrupted").hexdigest()
    target = tmp_path / "new" / "fm"
    with pytest.raises(DownloadError) as info:
        download_dataset("fashion-mnist", target, base_url=server.url)
    message = str(info.value)
    assert message.startswith("cannot download the Fashion-MNIST file train-images-idx3-ubyte.gz: ")
    assert f"{server.url}/train-images-idx3-ubyte.gz: checksum mismatch: its MD5 is {digest}" in message
    assert "the published one 8d4fb7e6c68d591d4c3dfef9ec88bf0d" in message and "nothing was saved" in message
    assert not (tmp_path / "new").exists()  # not even the folders it would have created
    target.mkdir(parents=True)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset("fashion-mnist", target, base_url=server.url)
    assert list(target.iterdir()) == []  # no temporary file either


def test_download_http_errors(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(server, monkeypatch)
    (server.root / "files" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DownloadError, match=r"MNIST file t10k-images-idx3-ubyte.gz: .*t10k-images-idx3-ubyte.gz: "
                       r"File not found"):
        download_dataset("mnist", tmp_path / "m", base_url=server.url)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [  # the verified ones stay
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    closed = Server(tmp_path)
    closed.close()  # nothing listens on its port now
    with pytest.raises(DownloadError, match=rf"{closed.url}/t10k-images-idx3-ubyte.gz: .*[Cc]onnection refused"):
        download_dataset("mnist", tmp_path / "m", base_url=closed.url)
    with pytest.raises(ValueError, match="download needs the dataset named, one of mnist, fashion-mnist, kmnist; "
                       "got 'cifar10'"):
        download_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="download needs the dataset named"):
        load_dataset(None, tmp_path, download=True)


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_trains_on_detected_idx_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_set(tmp_path / "data" / "fashion-mnist", n_train=60, n_test=20)
    out = tmp_path / "run"
    assert main(["train", *FAST, "--data-dir", str(tmp_path / "data"), "--val-size", "10", "--method", "dkd",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["model"], config["epochs"]) == ("fashion-mnist", "msdnet-tiny", 1)
    final = json.loads((out / "final.json").read_text())
    assert final["num_test"] == 20 and final["dataset"] == "fashion-mnist"
    assert "test top-1 accuracy (%) per exit" in capsys.readouterr().out


def test_cli_download(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(server, monkeypatch)
    monkeypatch.setenv(idx.DOWNLOAD_URL_ENV, server.url)
    out = tmp_path / "run"
    assert main(["train", *FAST, "--dataset", "mnist", "--download", "--data-dir", str(tmp_path / "d"),
                 "--val-size", "8", "--method", "ce", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(tmp_path / "d")
    assert len(list((tmp_path / "d").iterdir())) == 4


def test_cli_errors(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    write_set(server.root / "files")  # not the official files
    monkeypatch.setenv(idx.DOWNLOAD_URL_ENV, server.url)
    run = ["--out", str(tmp_path / "run")]
    expect_error(capsys, ["train", *FAST, *run, "--dataset", "kmnist", "--download", "--data-dir", str(tmp_path / "k")],
                 "cannot download the Kuzushiji-MNIST file train-images-idx3-ubyte.gz", "checksum mismatch",
                 "the published one bdb82020997e1d708af4cf47b453dcf7")
    assert not (tmp_path / "k").exists()
    expect_error(capsys, ["train", *FAST, *run, "--download"], "download needs the dataset named")
    write_set(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    write_idx(bad, idx_bytes(LABELS, 0x0C))
    expect_error(capsys, ["train", *FAST, *run, "--data-dir", str(tmp_path / "mnist")], str(bad),
                 "IDX type code 0x0c")
    expect_error(capsys, ["train", *FAST, *run, "--data-dir", str(server.root / "files")],
                 "holds IDX files, but which dataset is it?")
    expect_error(capsys, ["train", *FAST, *run, "--image-size", "14"], "image_size applies to image folders and "
                 "the MNIST family; digits images have a fixed size")
    expect_error(capsys, ["train", *FAST, *run, "--train-size", "0"], "train_size must be >= 1")


def test_cli_refuses_image_size_and_empty_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 22, items 2 and 3: one line naming the argument or the file, exit status 2, before any training."""
    write_set(tmp_path / "mnist", n_train=60, n_test=20)
    run = ["--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "mnist"), "--val-size", "10"]
    expect_error(capsys, ["train", *FAST, *run, "--image-size", "56"], "image_size must be <= 28 for the MNIST files",
                 "area-resamples them down, never up; got 56")
    expect_error(capsys, ["train", *FAST, *run, "--image-size", "5000"], "image_size must be <= 1024", "got 5000")
    empty = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    write_idx(empty, idx_bytes(IMAGES[:0]))
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", idx_bytes(LABELS[:0]))
    expect_error(capsys, ["train", *FAST, *run], f"{empty} holds no images", "the test split cannot be empty")
    assert not (tmp_path / "run").exists()
