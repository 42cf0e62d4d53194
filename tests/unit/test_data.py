"""hdkd_fast.data: CIFAR files in their real format, digits, image folders, augmentation, epoch batches."""

from __future__ import annotations

import collections
import math
import pickle
import re
import tarfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from hdkd_fast.data import (
    DATASETS,
    Augment,
    DataBundle,
    EpochLoader,
    FolderImageDataset,
    ImageDataset,
    TensorImageDataset,
    load_dataset,
    symmetric_noise,
    with_label_noise,
)
from hdkd_fast.data.noise import NOISE_STREAM, TRAIN_SPLIT
from hdkd_fast.data.splits import mix_seed
from tests.support.cifar_files import dump, write_cifar10, write_cifar100

CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
CIFAR100_FILES = ["train", "test", "meta"]


@pytest.fixture
def np() -> ModuleType:
    return pytest.importorskip("numpy")


# --- CIFAR files written in the real format ---------------------------------------------------------------


def make_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def as_images(rows: Any) -> Tensor:
    return torch.from_numpy(rows.copy()).view(-1, 3, 32, 32)


def images_of(dataset: ImageDataset) -> Tensor:
    assert isinstance(dataset, TensorImageDataset)
    return dataset.images


def paths_of(dataset: ImageDataset) -> tuple[str, ...]:
    assert isinstance(dataset, FolderImageDataset)
    return dataset.paths


def multiset(*datasets: ImageDataset) -> collections.Counter[tuple[bytes, int]]:
    """Every (image bytes, label) pair of the datasets, with multiplicity."""
    counts: collections.Counter[tuple[bytes, int]] = collections.Counter()
    for dataset in datasets:
        images, labels = dataset.batch(torch.arange(len(dataset)))
        counts.update((image.numpy().tobytes(), int(label)) for image, label in zip(images, labels, strict=True))
    return counts


def test_cifar10_folder_round_trip(np: ModuleType, tmp_path: Path) -> None:
    written = write_cifar10(np, tmp_path / "cifar-10-batches-py")
    bundle = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", val_size=6, seed=3)
    assert isinstance(bundle, DataBundle)
    assert (bundle.name, bundle.num_classes, bundle.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert bundle.class_names == written["names"]
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2470, 0.2435, 0.2616)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (14, 6, 5)
    # test split: test_batch, in order, pixel-exact in CHW layout
    images, labels = bundle.test.batch(torch.arange(5))
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32)
    assert torch.equal(images, as_images(written["test"]))
    assert labels.dtype == torch.int64 and labels.tolist() == written["test_labels"]
    row = written["test"][2]
    assert images[2, 1, 4, 7] == row[1024 + 4 * 32 + 7] and images[2, 2, 31, 0] == row[2048 + 31 * 32]
    image, label = bundle.test[2]
    assert torch.equal(image, images[2]) and label == written["test_labels"][2]
    # train + val: exactly the 20 training images, disjoint, each pixel-exact with its label
    full = TensorImageDataset(as_images(written["train"]), torch.tensor(written["train_labels"]))
    assert multiset(bundle.train, bundle.val) == multiset(full)
    # a subset keeps the original order
    keys = [image.numpy().tobytes() for image in full.batch(torch.arange(20))[0]]
    order = [keys.index(image.numpy().tobytes()) for image in bundle.train.batch(torch.arange(14))[0]]
    assert order == sorted(order)


def test_cifar100_folder_round_trip(np: ModuleType, tmp_path: Path) -> None:
    written = write_cifar100(np, tmp_path / "cifar-100-python")
    bundle = load_dataset("cifar100", tmp_path, val_size=0.2)
    assert (bundle.name, bundle.num_classes, bundle.class_names) == ("cifar100", 100, written["names"])
    assert bundle.mean == (0.5071, 0.4865, 0.4409) and bundle.std == (0.2673, 0.2564, 0.2762)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 7)
    images, labels = bundle.test.batch(torch.arange(7))
    assert torch.equal(images, as_images(written["test"])) and labels.tolist() == written["test_labels"]
    full = TensorImageDataset(as_images(written["train"]), torch.tensor(written["train_labels"]))
    assert multiset(bundle.train, bundle.val) == multiset(full)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_archive_equals_folder(np: ModuleType, tmp_path: Path, variant: str) -> None:
    folder_name, archive_name = (
        ("cifar-10-batches-py", "cifar-10-python.tar.gz")
        if variant == "cifar10"
        else ("cifar-100-python", "cifar-100-python.tar.gz")
    )
    (write_cifar10 if variant == "cifar10" else write_cifar100)(np, tmp_path / "src" / folder_name)
    (tmp_path / "dl").mkdir()
    archive = make_archive(tmp_path / "src" / folder_name, tmp_path / "dl" / archive_name)
    from_folder = load_dataset(variant, tmp_path / "src", val_size=4, seed=1)
    for source in (tmp_path / "dl", archive):  # the folder holding the archive, or the archive itself
        for name in (variant, None):  # given or detected
            from_archive = load_dataset(name, source, val_size=4, seed=1)
            assert from_archive.name == variant and from_archive.class_names == from_folder.class_names
            for split in ("train", "val", "test"):
                a, b = getattr(from_archive, split), getattr(from_folder, split)
                assert torch.equal(images_of(a), images_of(b)) and torch.equal(a.labels, b.labels)


def test_cifar_detection(np: ModuleType, tmp_path: Path) -> None:
    write_cifar10(np, tmp_path / "a" / "cifar-10-batches-py")
    write_cifar100(np, tmp_path / "b" / "cifar-100-python")
    assert load_dataset(None, tmp_path / "a", val_size=2).name == "cifar10"
    assert load_dataset(None, tmp_path / "a" / "cifar-10-batches-py", val_size=2).name == "cifar10"
    assert load_dataset(None, tmp_path / "b", val_size=2).name == "cifar100"
    assert load_dataset(None, str(tmp_path / "b" / "cifar-100-python"), val_size=2).name == "cifar100"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"cannot tell which dataset data_dir .*empty holds"):
        load_dataset(None, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"data_dir .*nowhere"):
        load_dataset(None, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no CIFAR-100 data in"):
        load_dataset("cifar100", tmp_path / "a")


def test_cifar_val_split_is_seeded(np: ModuleType, tmp_path: Path) -> None:
    write_cifar10(np, tmp_path / "cifar-10-batches-py", per_batch=20)
    first = load_dataset("cifar10", tmp_path, val_size=25, seed=7)
    again = load_dataset("cifar10", tmp_path, val_size=25, seed=7)
    other = load_dataset("cifar10", tmp_path, val_size=25, seed=8)
    assert torch.equal(images_of(first.val), images_of(again.val)) and torch.equal(
        images_of(first.train), images_of(again.train)
    )
    assert not torch.equal(images_of(first.val), images_of(other.val))
    assert torch.equal(images_of(first.test), images_of(other.test))
    assert (len(first.train), len(first.val)) == (75, 25)
    assert len(load_dataset("cifar10", tmp_path, val_size=0.1).val) == 10
    assert len(load_dataset("cifar10", tmp_path, val_size=0).val) == 0
    with pytest.raises(ValueError, match=r"val_size = 5000 .* only 100"):  # the CIFAR default needs 5001 images
        load_dataset("cifar10", tmp_path)


def test_cifar_numpy1_pickles_load(np: ModuleType, tmp_path: Path) -> None:
    """The original files name numpy 1.x's module path (numpy.core.multiarray), which numpy 2 renamed."""
    written = write_cifar10(np, tmp_path / "c")
    path = tmp_path / "c" / "test_batch"
    raw = path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    path.write_bytes(raw)
    bundle = load_dataset("cifar10", tmp_path / "c", val_size=2)
    assert torch.equal(images_of(bundle.test), as_images(written["test"]))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickle_variants(np: ModuleType, tmp_path: Path, protocol: int) -> None:
    """Python 3 re-pickles: str keys and names, any protocol (5 stores arrays out of band, read-only)."""
    written = write_cifar100(np, tmp_path / "c")
    for split in ("train", "test"):
        content = {"data": written[split], "fine_labels": written[f"{split}_labels"]}
        (tmp_path / "c" / split).write_bytes(pickle.dumps(content, protocol=protocol))
    (tmp_path / "c" / "meta").write_bytes(pickle.dumps({"fine_label_names": list(written["names"])}, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bundle = load_dataset(None, tmp_path / "c", val_size=3)
    assert bundle.name == "cifar100" and bundle.class_names == written["names"]
    assert torch.equal(images_of(bundle.test), as_images(written["test"]))


# --- CIFAR: bad files ---------------------------------------------------------------------------------------


def test_cifar_missing_file(np: ModuleType, tmp_path: Path) -> None:
    write_cifar10(np, tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 is missing"):
        load_dataset("cifar10", tmp_path / "c", val_size=2)


def test_cifar_truncated_pickle(np: ModuleType, tmp_path: Path) -> None:
    write_cifar10(np, tmp_path / "c")
    path = tmp_path / "c" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ValueError, match=r"data_batch_2 is not a readable CIFAR pickle"):
        load_dataset("cifar10", tmp_path / "c", val_size=2)


def test_cifar_refuses_code_in_pickles(np: ModuleType, tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (print, ("pwned",))

    write_cifar10(np, tmp_path / "c")
    dump(tmp_path / "c" / "test_batch", {b"data": Exploit()})
    with pytest.raises(
        ValueError, match=r"test_batch is not a CIFAR pickle: it refers to .*print, which a CIFAR file never does"
    ):
        load_dataset("cifar10", tmp_path / "c", val_size=2)


BAD_BATCHES = {
    "no data": r"has no key 'data' \(keys: labels\)",
    "data not an array": r"'data' must be a uint8 array \[N, 3072\] .* got str",
    "wrong row size": r"'data' must be a uint8 array \[N, 3072\] .*got a uint8 array of shape \[2, 3000\]",
    "wrong dtype": r"'data' must be a uint8 array .*got a float32 array",
    "too few labels": r"'labels' must be 2 integer labels .*shape \[1\]",
    "label out of range": r"'labels' holds 10, outside 0..9",
    "not a dict": r"must hold a pickled dict; got list",
}


def bad_batch(np: ModuleType, case: str) -> Any:
    rows = np.zeros((2, 3072), dtype=np.uint8)
    return {
        "no data": {b"labels": [0, 1]},
        "data not an array": {b"data": "pixels", b"labels": [0, 1]},
        "wrong row size": {b"data": np.zeros((2, 3000), dtype=np.uint8), b"labels": [0, 1]},
        "wrong dtype": {b"data": rows.astype(np.float32), b"labels": [0, 1]},
        "too few labels": {b"data": rows, b"labels": [0]},
        "label out of range": {b"data": rows, b"labels": [0, 10]},
        "not a dict": [1, 2, 3],
    }[case]


@pytest.mark.parametrize(("case", "message"), list(BAD_BATCHES.items()))
def test_cifar_bad_batch(np: ModuleType, tmp_path: Path, case: str, message: str) -> None:
    write_cifar10(np, tmp_path / "c")
    dump(tmp_path / "c" / "data_batch_4", bad_batch(np, case))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "c" / "data_batch_4")) + ".*" + message):
        load_dataset("cifar10", tmp_path / "c", val_size=2)


def test_cifar_bad_meta(np: ModuleType, tmp_path: Path) -> None:
    write_cifar100(np, tmp_path / "c")
    dump(tmp_path / "c" / "meta", {b"fine_label_names": [b"a", b"b"]})
    with pytest.raises(ValueError, match=r"meta: 'fine_label_names' must list 100 class names; got 2 entries"):
        load_dataset("cifar100", tmp_path / "c", val_size=2)


def test_cifar_bad_archives(np: ModuleType, tmp_path: Path) -> None:
    write_cifar10(np, tmp_path / "src" / "cifar-10-batches-py")
    archive = make_archive(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    truncated = tmp_path / "t" / "cifar-10-python.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(truncated))}"):
        load_dataset("cifar10", truncated.parent, val_size=2)
    garbage = tmp_path / "g" / "cifar-10-python.tar.gz"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a tar archive")
    with pytest.raises(ValueError, match=f"cannot read the CIFAR-10 archive {re.escape(str(garbage))}"):
        load_dataset(None, garbage, val_size=2)
    (tmp_path / "src" / "cifar-10-batches-py" / "test_batch").unlink()
    partial = make_archive(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "p.tar.gz")
    with pytest.raises(
        ValueError, match=f"archive {re.escape(str(partial))} has no member cifar-10-batches-py/test_batch"
    ):
        load_dataset("cifar10", partial, val_size=2)
    with pytest.raises(ValueError, match=r"cannot tell which dataset data_dir .*p.tar.gz"):
        load_dataset(None, partial)


# --- digits -------------------------------------------------------------------------------------------------


def test_digits_default() -> None:
    pytest.importorskip("sklearn")
    from hdkd_fast.data.digits import read_digits

    bundle = load_dataset()
    assert (bundle.name, bundle.num_classes, bundle.input_shape) == ("digits", 10, (1, 8, 8))
    assert bundle.class_names == tuple("0123456789")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1294, 144, 359)
    everything = read_digits()
    assert multiset(bundle.train, bundle.val, bundle.test) == multiset(everything)
    assert everything.images.dtype == torch.uint8 and everything.images.shape == (1797, 1, 8, 8)
    assert everything.images.min() == 0 and everything.images.max() == 255
    assert set(torch.unique(everything.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert torch.bincount(bundle.test.labels).tolist() == [
        round(0.2 * int(n)) for n in torch.bincount(everything.labels)
    ]  # stratified
    x = images_of(bundle.train).double() / 255
    assert bundle.mean == pytest.approx((x.mean().item(),)) and bundle.std == pytest.approx(
        (x.std(correction=0).item(),)
    )


def test_digits_splits_are_seeded() -> None:
    pytest.importorskip("sklearn")
    a, b, c = (
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=2, val_size=144),
    )
    assert torch.equal(images_of(a.val), images_of(b.val)) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(images_of(a.val), images_of(c.val))
    assert torch.equal(images_of(a.test), images_of(c.test))  # the test split does not depend on the run's seed
    assert len(load_dataset(val_size=100).val) == 100 and len(load_dataset(val_size=0.5).val) == 719


# --- image folders ------------------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    """A ``size = (width, height)`` image: a 10-pixel red band left and a blue one right, ``color`` between."""
    image_module = pytest.importorskip("PIL.Image")
    image = image_module.new("RGB", size, color)
    image.paste((255, 0, 0), (0, 0, 10, size[1]))
    image.paste((0, 0, 255), (size[0] - 10, 0, size[0], size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path)


def write_folder(root: Path, splits: tuple[str, ...] = ("train", "test"), per_class: int = 5) -> None:
    colors = {"cat": (0, 200, 0), "dog": (40, 80, 120)}
    for split in splits:
        for name, color in colors.items():
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", (80, 30 + i), color)
    write_image(root / "train" / "dog" / "sub" / "gray.PNG", (70, 30), (90, 90, 90), mode="L")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()


def test_image_folder(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    write_folder(tmp_path)
    bundle = load_dataset(None, tmp_path, val_size=2, image_size=8)
    assert (bundle.name, bundle.num_classes, bundle.class_names, bundle.input_shape) == (
        "imagefolder",
        2,
        ("cat", "dog"),
        (3, 8, 8),
    )
    assert isinstance(bundle.train, FolderImageDataset) and not bundle.train.in_memory
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 2, 10)
    assert sorted(bundle.train.labels.tolist() + bundle.val.labels.tolist()) == [0] * 5 + [1] * 6
    images, labels = bundle.test.batch(torch.arange(10))
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 8, 8)
    assert labels.tolist() == [0] * 5 + [1] * 5
    # the center square lies inside the middle band: every pixel is the band's color (resize of a flat area)
    assert torch.equal(images[0], torch.tensor([0, 200, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    assert torch.equal(images[9], torch.tensor([40, 80, 120], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    pool = FolderImageDataset(
        paths_of(bundle.train) + paths_of(bundle.val), torch.cat([bundle.train.labels, bundle.val.labels]), 8
    )
    assert not any(p.endswith(".txt") for p in pool.paths)  # other files and hidden folders are skipped
    gray = [i for i, p in enumerate(pool.paths) if p.endswith("gray.PNG")]  # any case, in a subfolder
    assert len(gray) == 1
    image, label = pool[gray[0]]  # a grayscale file is decoded to RGB
    assert label == 1 and image.shape == (3, 8, 8) and torch.all(image == 90)
    x = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))]).double() / 255
    assert bundle.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()))
    assert bundle.std == pytest.approx(tuple(x.std(dim=(0, 2, 3), correction=0).tolist()))
    assert load_dataset("imagefolder", tmp_path, val_size=2).input_shape == (3, 32, 32)  # default image_size


def test_image_folder_is_decoded_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PIL")
    import hdkd_fast.data.folder
    import hdkd_fast.data.load

    write_folder(tmp_path)
    decoded: list[str] = []
    decode = hdkd_fast.data.folder.decode_image

    def counting_decode(path: str, size: int) -> Tensor:
        decoded.append(path)
        return decode(path, size)

    monkeypatch.setattr(hdkd_fast.data.folder, "decode_image", counting_decode)
    bundle = load_dataset(None, tmp_path, val_size=2, image_size=4)
    assert sorted(decoded) == sorted(paths_of(bundle.train))  # only the training images, for mean/std
    decoded.clear()
    bundle.test.batch([4, 1])
    assert decoded == [paths_of(bundle.test)[4], paths_of(bundle.test)[1]]
    monkeypatch.setattr(hdkd_fast.data.load, "STATS_IMAGES", 3)
    decoded.clear()
    sampled = load_dataset(None, tmp_path, val_size=2, image_size=4)
    assert len(decoded) == 3 and set(decoded) <= set(paths_of(sampled.train))  # a seeded sample of STATS_IMAGES
    assert sampled.mean != bundle.mean and load_dataset(None, tmp_path, val_size=2, image_size=4).mean == sampled.mean


def test_image_folder_names_corrupt_files(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    write_folder(tmp_path)
    bundle = load_dataset(None, tmp_path, val_size=2, image_size=4)
    broken = Path(paths_of(bundle.test)[3])
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # after loading: only reading it fails
    assert bundle.test[2][0].shape == (3, 4, 4)
    with pytest.raises(ValueError, match=f"cannot decode the image file {re.escape(str(broken))}"):
        bundle.test[3]
    with pytest.raises(ValueError, match=f"cannot decode the image file {re.escape(str(broken))}"):
        bundle.test.batch(torch.arange(10))
    empty = Path(paths_of(bundle.train)[0])
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"cannot decode the image file {re.escape(str(empty))}"):
        load_dataset(None, tmp_path, val_size=2, image_size=4)  # mean/std decode the training images


def test_image_folder_splits(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    write_folder(tmp_path / "a", splits=("train",), per_class=10)
    first, again = load_dataset(None, tmp_path / "a", seed=4), load_dataset(None, tmp_path / "a", seed=4)
    other = load_dataset(None, tmp_path / "a", seed=5)
    assert (len(first.train), len(first.val), len(first.test)) == (15, 2, 4)  # 20% test per class, then 10% val
    assert paths_of(first.test) == paths_of(other.test) and paths_of(first.val) == paths_of(again.val)
    assert paths_of(first.train) == paths_of(again.train) and paths_of(first.val) != paths_of(other.val)
    assert len(set(paths_of(first.train) + paths_of(first.val) + paths_of(first.test))) == 21  # disjoint, all 21 images
    assert sorted(first.test.labels.tolist()) == [0, 0, 1, 1]  # stratified
    write_folder(tmp_path / "b", splits=("train", "val"))  # val alone is the test split (ImageNet)
    assert len(load_dataset("imagefolder", tmp_path / "b", val_size=1).test) == 10
    write_folder(tmp_path / "c", splits=("train", "val", "test"))  # val and test: val is the validation split
    bundle = load_dataset("imagefolder", tmp_path / "c")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (11, 10, 10)
    assert all("/val/" in p for p in paths_of(bundle.val))
    with pytest.raises(ValueError, match="val_size must be None when the image folder has its own validation split"):
        load_dataset("imagefolder", tmp_path / "c", val_size=3)


def test_image_folder_errors(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    write_folder(tmp_path / "a")
    write_image(tmp_path / "a" / "test" / "bird" / "0.png", (8, 8), (1, 2, 3))
    with pytest.raises(
        ValueError,
        match=f"{re.escape(str(tmp_path / 'a' / 'test'))} has class folders that the training split lacks: bird",
    ):
        load_dataset(None, tmp_path / "a")
    write_folder(tmp_path / "b")
    (tmp_path / "b" / "train" / "empty").mkdir()
    with pytest.raises(
        ValueError, match=f"class folder {re.escape(str(tmp_path / 'b' / 'train' / 'empty'))} holds no image file"
    ):
        load_dataset(None, tmp_path / "b")
    (tmp_path / "c" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'c' / 'train'))} has no class folder"):
        load_dataset(None, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="is not an image folder"):
        load_dataset("imagefolder", tmp_path)


def test_image_folder_workers_give_the_same_batches(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    write_folder(tmp_path, splits=("train",), per_class=4)
    train = load_dataset(None, tmp_path, val_size=1, image_size=4).train
    serial = list(EpochLoader(train, 3, shuffle=True, seed=1))
    parallel = list(EpochLoader(train, 3, shuffle=True, seed=1, num_workers=1))
    assert len(serial) == len(parallel) == 2  # 9 images: 2 held out for test, 1 for val, 6 in batches of 3
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- Augment ------------------------------------------------------------------------------------------------


def reference_augment(
    images: Tensor, offsets: Tensor, flips: Tensor, padding: int, mean: Tensor, std: Tensor
) -> Tensor:
    """The per-sample loop the vectorized gather replaces."""
    _, _, h, w = images.shape
    out = []
    for image, (top, left), flip in zip(images, offsets.tolist(), flips.tolist(), strict=True):
        crop = F.pad(image, (padding,) * 4)[:, top : top + h, left : left + w]
        out.append(crop.flip(-1) if flip else crop)
    return (torch.stack(out).float() / 255 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


@pytest.mark.parametrize(
    ("padding", "flip", "shape"),
    [(4, True, (3, 32, 32)), (1, False, (1, 8, 8)), (2, True, (2, 5, 7)), (0, True, (3, 6, 6))],
)
def test_augment_matches_the_per_sample_loop(padding: int, flip: bool, shape: tuple[int, int, int]) -> None:
    mean, std = torch.rand(shape[0]).tolist(), (torch.rand(shape[0]) + 0.1).tolist()
    augment = Augment(mean, std, crop_padding=padding, flip=flip)
    images = torch.randint(0, 256, (64, *shape), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(11))
    params = augment.sample(64, torch.Generator().manual_seed(11))  # the same draws, replayed
    assert out.dtype == torch.float32 and out.shape == images.shape
    expected = reference_augment(images, params.offsets, params.flips, padding, torch.tensor(mean), torch.tensor(std))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(augment.apply(images, params), out, rtol=0, atol=0)
    assert bool(params.flips.any()) == flip and int(params.offsets.max()) <= 2 * padding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_matches_cpu() -> None:
    augment = Augment([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    images = torch.randint(0, 256, (33, 3, 32, 32), dtype=torch.uint8)
    on_cpu = augment(images, torch.Generator().manual_seed(2))
    on_gpu = augment(images.cuda(), torch.Generator().manual_seed(2))  # draws stay on the CPU generator
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


def test_augment_draws() -> None:
    augment = Augment([0.5], [0.5], crop_padding=4)
    params = augment.sample(4000, torch.Generator().manual_seed(0))
    assert params.offsets.dtype == torch.int64 and params.flips.dtype == torch.bool
    counts = torch.bincount(params.offsets.flatten(), minlength=9)
    assert counts.numel() == 9 and counts.min() > 700  # uniform over 0..8 (expected 889 each)
    assert 0.45 < params.flips.float().mean().item() < 0.55
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(3)
    first, second = augment(images, generator), augment(images, generator)
    assert not torch.equal(first, second)  # the generator advances
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(3)))


def test_augment_eval_normalizes_exactly() -> None:
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = Augment(mean, std, train=False)(images, generator)
    expected = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(generator.get_state(), state)  # evaluation draws nothing


def test_augment_flip_only() -> None:
    augment = Augment([0.0], [1.0], crop_padding=0, flip=True)
    images = torch.randint(0, 256, (32, 1, 3, 5), dtype=torch.uint8)
    params = augment.sample(32, torch.Generator().manual_seed(1))
    out = augment.apply(images, params) * 255
    expected = torch.where(params.flips.view(-1, 1, 1, 1), images.flip(-1), images).float()
    torch.testing.assert_close(out, expected)


def test_augment_errors() -> None:
    augment = Augment([0.5] * 3, [0.25] * 3)
    with pytest.raises(TypeError, match=r"images must be a uint8 Tensor.*float32"):
        augment(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"images must be a Tensor\[b, C, H, W\] with C = 3 .*\[2, 1, 4, 4\]"):
        augment(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator"):
        augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"params must hold offsets \[2, 2\]"):
        augment.apply(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), augment.sample(3))
    with pytest.raises(ValueError, match="std must be > 0"):
        Augment([0.5], [0.0])
    with pytest.raises(ValueError, match="mean and std must have one entry per channel; got 3 and 1"):
        Augment([0.5] * 3, [0.5])
    with pytest.raises(ValueError, match="mean must be finite"):
        Augment([float("nan")], [0.5])
    with pytest.raises(TypeError, match="std must be a sequence"):
        Augment([0.5], 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_padding must be >= 0"):
        Augment([0.5], [0.5], crop_padding=-1)
    with pytest.raises(TypeError, match="crop_padding must be an int"):
        Augment([0.5], [0.5], crop_padding=True)
    with pytest.raises(TypeError, match="flip must be a bool"):
        Augment([0.5], [0.5], flip=1)  # type: ignore[arg-type]


# --- EpochLoader --------------------------------------------------------------------------------------------


def indexed(n: int) -> TensorImageDataset:
    """``n`` images whose label is their index (and whose pixels are the index mod 256)."""
    return TensorImageDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n))


def epoch_labels(loader: EpochLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [label for _, labels in loader for label in labels.tolist()]


def test_loader_epochs() -> None:
    loader = EpochLoader(indexed(23), 5, shuffle=True, seed=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (1, 1, 1) and y.dtype == torch.int64 for x, y in batches)
    assert all(torch.equal(x.view(-1).long(), y) for x, y in batches)
    orders = [epoch_labels(loader, epoch) for epoch in range(3)]
    assert all(sorted(order) == list(range(23)) for order in orders)
    assert orders[0] != orders[1] != orders[2]
    assert epoch_labels(EpochLoader(indexed(23), 5, shuffle=True, seed=3), 1) == orders[1]  # resumable
    assert epoch_labels(EpochLoader(indexed(23), 5, shuffle=True, seed=4), 1) != orders[1]
    assert epoch_labels(EpochLoader(indexed(23), 5, shuffle=False), 2) == list(range(23))
    assert list(EpochLoader(indexed(0), 4, shuffle=True)) == []


@pytest.mark.parametrize("n", [1, 10, 12, 13])
@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_shards(n: int, drop_last: bool) -> None:
    world, batch = 3, 2
    loaders = [
        EpochLoader(indexed(n), batch, shuffle=True, seed=5, rank=r, world_size=world, drop_last=drop_last)
        for r in range(world)
    ]
    shards = [epoch_labels(loader, 2) for loader in loaders]
    lengths = {len(loader) for loader in loaders}
    assert len(lengths) == 1  # every rank steps the same number of times
    assert all(len(list(loader)) == len(loader) for loader in loaders)
    seen = [i for shard in shards for i in shard]
    if drop_last:
        assert len(seen) == len(set(seen)) == (n // (world * batch)) * world * batch and lengths == {
            n // (world * batch)
        }
    else:
        assert set(seen) == set(range(n)) and len(seen) == -(-n // world) * world  # padded by repetition only
        assert all(len(shard) == -(-n // world) for shard in shards)
    single = EpochLoader(indexed(n), batch, shuffle=True, seed=5)
    single.set_epoch(2)
    order = single.indices().tolist()  # the epoch's order: the same on every rank
    assert [shards[i % world][i // world] for i in range(len(seen))] == (order * world)[: len(seen)]


def test_loader_errors() -> None:
    data = indexed(4)
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        EpochLoader(data, 0, shuffle=True)
    with pytest.raises(TypeError, match="batch_size must be an int; got float"):
        EpochLoader(data, 2.0, shuffle=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size = 2\); got 2"):
        EpochLoader(data, 2, shuffle=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be >= 1; got 0"):
        EpochLoader(data, 2, shuffle=True, world_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        EpochLoader(data, 2, shuffle=True, num_workers=-1)
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        EpochLoader(data, 2, shuffle=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dataset must be an ImageDataset; got list"):
        EpochLoader([1, 2], 2, shuffle=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        EpochLoader(data, 2, shuffle=True).set_epoch(-1)


# --- datasets and load_dataset arguments --------------------------------------------------------------------


def test_image_dataset_indexing() -> None:
    data = indexed(5)
    assert data[-1][1] == 4 and len(data) == 5 and data.image_shape == (1, 1, 1)
    assert data.batch([4, 0])[1].tolist() == [4, 0] and data.subset(torch.tensor([3, 1])).labels.tolist() == [3, 1]
    assert data.batch([])[0].shape == (0, 1, 1, 1)
    with pytest.raises(IndexError, match="index 5 is out of range for a dataset of 5 images"):
        data[5]
    with pytest.raises(IndexError, match="indices hold -1"):
        data.batch(torch.tensor([0, -1]))
    with pytest.raises(TypeError, match=r"indices must hold integers; got dtype torch.float32"):
        data.batch(torch.zeros(2))
    with pytest.raises(ValueError, match="indices must be 1-D"):
        data.batch(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="images must be a uint8 Tensor"):
        TensorImageDataset(torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        TensorImageDataset(torch.zeros(2, 1, 1, 1, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_load_dataset_arguments(tmp_path: Path) -> None:
    assert DATASETS == ("digits", "cifar10", "cifar100", "imagefolder", "mnist", "fashion-mnist", "kmnist")
    with pytest.raises(ValueError, match=r"name must be one of digits, cifar10, .*, kmnist .*'svhn'"):
        load_dataset("svhn")
    with pytest.raises(TypeError, match="name must be a str or None; got int"):
        load_dataset(10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        load_dataset(seed="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        load_dataset("imagefolder", tmp_path, image_size=0)
    with pytest.raises(ValueError, match="image_size applies to image folders and the MNIST family; digits"):
        load_dataset("digits", image_size=8)
    with pytest.raises(ValueError, match="cifar10 needs data_dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="data_dir must be None for 'digits'"):
        load_dataset("digits", tmp_path)
    pytest.importorskip("sklearn")
    with pytest.raises(TypeError, match=r"val_size must be an int .* or a float in \(0, 1\); got bool"):
        load_dataset(val_size=True)
    with pytest.raises(ValueError, match=r"val_size as a fraction must be in \(0, 1\); got 1.5"):
        load_dataset(val_size=1.5)
    with pytest.raises(ValueError, match="val_size must be >= 0; got -1"):
        load_dataset(val_size=-1)
    with pytest.raises(
        ValueError, match="val_size = 1438 holds out 1438 images but the split it is taken from has only 1438"
    ):
        load_dataset(val_size=1438)


# --- label noise (issue 23 item 3) -------------------------------------------------------------------------


def test_symmetric_noise_flips_p_of_the_labels_to_uniformly_drawn_other_classes() -> None:
    n, classes, p = 200_000, 10, 0.3
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))
    noisy = symmetric_noise(labels, classes, p, 7, NOISE_STREAM, TRAIN_SPLIT)
    changed = noisy != labels
    # the realised rate: Binomial(n, p) / n, within 5 standard deviations of p
    assert abs(changed.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # every drawn flip (u < p, the first draw) changed the label: none went back to its own class
    drawn = torch.rand(n, generator=torch.Generator().manual_seed(mix_seed(7, NOISE_STREAM, TRAIN_SPLIT))) < p
    assert torch.equal(changed, drawn)
    # the new class is uniform over the C - 1 others: each (y, y') pair, y' != y, within 5 sigma of its share
    pairs = torch.zeros(classes, classes)
    pairs.index_put_((labels[changed], noisy[changed]), torch.ones(int(changed.sum())), accumulate=True)
    assert not pairs.diagonal().any()
    for y in range(classes):
        flipped = pairs[y].sum().item()
        q = 1 / (classes - 1)
        others = torch.cat([pairs[y, :y], pairs[y, y + 1:]])
        assert (others - flipped * q).abs().max() < 5 * math.sqrt(flipped * q * (1 - q))


def test_symmetric_noise_is_seeded_and_nested() -> None:
    labels = torch.randint(0, 5, (5000,), generator=torch.Generator().manual_seed(0))
    a = symmetric_noise(labels, 5, 0.2, 3)
    assert torch.equal(a, symmetric_noise(labels, 5, 0.2, 3))
    assert not torch.equal(a, symmetric_noise(labels, 5, 0.2, 4))
    more = symmetric_noise(labels, 5, 0.4, 3)  # same seed, larger rate: a superset, to the same classes
    flipped = a != labels
    assert torch.equal(more[flipped], a[flipped]) and (more != labels).sum() > flipped.sum()
    assert torch.equal(symmetric_noise(labels, 5, 0.0, 3), labels)


@pytest.mark.parametrize(("p", "error", "message"), [
    (1.0, ValueError, r"p must be a probability in \[0, 1\)"),
    (-0.1, ValueError, r"p must be a probability in \[0, 1\)"),
    (math.nan, ValueError, r"p must be a probability in \[0, 1\).*got nan"),
    (True, TypeError, "p must be a real number"),
])
def test_symmetric_noise_rejects_a_bad_rate(p: float, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        symmetric_noise(torch.zeros(4, dtype=torch.int64), 3, p, 0)


def test_symmetric_noise_needs_two_classes_and_labels_in_range() -> None:
    with pytest.raises(ValueError, match="two classes or more"):
        symmetric_noise(torch.zeros(4, dtype=torch.int64), 1, 0.5, 0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        symmetric_noise(torch.tensor([0, 3]), 3, 0.5, 0)


def test_label_noise_of_a_bundle_keeps_validation_and_test_clean_unless_asked() -> None:
    pytest.importorskip("sklearn")
    clean = load_dataset("digits", seed=2)
    noisy = with_label_noise(clean, 0.5, 2)
    assert noisy.train.labels.shape == clean.train.labels.shape
    assert (noisy.train.labels != clean.train.labels).double().mean().item() == pytest.approx(0.5, abs=0.1)
    assert torch.equal(images_of(noisy.train), images_of(clean.train))
    assert torch.equal(noisy.val.labels, clean.val.labels) and torch.equal(noisy.test.labels, clean.test.labels)
    assert torch.equal(with_label_noise(load_dataset("digits", seed=2), 0.5, 2).train.labels, noisy.train.labels)
    assert not torch.equal(with_label_noise(clean, 0.5, 3).train.labels, noisy.train.labels)
    both = with_label_noise(clean, 0.5, 2, validation=True)
    assert torch.equal(both.train.labels, noisy.train.labels)  # the training draw does not depend on the option
    assert (both.val.labels != clean.val.labels).double().mean().item() == pytest.approx(0.5, abs=0.15)
    assert torch.equal(both.test.labels, clean.test.labels)
    assert with_label_noise(clean, 0.0, 2, validation=True) is clean
    _, batch_labels = noisy.train.batch([3, 1])
    assert torch.equal(batch_labels, noisy.train.labels[torch.tensor([3, 1])])
    assert torch.equal(noisy.train.subset([3, 1]).labels, batch_labels)


def test_relabeled_checks_its_labels() -> None:
    dataset = TensorImageDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must have shape \[3\]"):
        dataset.relabeled(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels must be an integer Tensor"):
        dataset.relabeled(torch.zeros(3))
    assert dataset.relabeled(torch.tensor([2, 2, 2]))[0][1] == 2 and dataset[0][1] == 0
