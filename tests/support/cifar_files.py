"""Small CIFAR-10 / CIFAR-100 folders in the original pickle format, for the data and CLI tests
(imported directly, like float64_reference)."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import ModuleType
from typing import Any


def cifar_rows(np: ModuleType, n: int, seed: int) -> Any:
    """``n`` random images as CIFAR rows: uint8 [n, 3072], each row the R, G, B planes, row-major."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def dump(path: Path, content: dict[bytes, Any]) -> None:
    with path.open("wb") as file:
        pickle.dump(content, file, protocol=2)  # the original files come from Python 2's cPickle


def write_cifar10(np: ModuleType, folder: Path, per_batch: int = 4, n_test: int = 5) -> dict[str, Any]:
    """A cifar-10-batches-py folder with 5 training batches of ``per_batch`` images; returns what it wrote."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = cifar_rows(np, per_batch, seed=i)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        filenames = [f"img_{i}_{j}.png".encode() for j in range(per_batch)]
        batch_label = f"training batch {i} of 5".encode()
        dump(
            folder / f"data_batch_{i}",
            {b"batch_label": batch_label, b"labels": labels, b"data": rows, b"filenames": filenames},
        )
        train_rows.append(rows)
        train_labels += labels
    test_rows = cifar_rows(np, n_test, seed=9)
    test_labels = rng.integers(0, 10, size=n_test).tolist()
    dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_rows})
    names = [f"class{c}".encode() for c in range(10)]
    dump(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    return {
        "train": np.concatenate(train_rows),
        "train_labels": train_labels,
        "test": test_rows,
        "test_labels": test_labels,
        "names": tuple(n.decode() for n in names),
    }


def write_cifar100(np: ModuleType, folder: Path, n_train: int = 30, n_test: int = 7) -> dict[str, Any]:
    """A cifar-100-python folder (train, test, meta); returns what it wrote."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written: dict[str, Any] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = cifar_rows(np, n, seed=len(split))
        fine = rng.integers(0, 100, size=n).tolist()
        content = {
            b"filenames": [b"x.png"] * n,
            b"batch_label": split.encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": rows,
        }
        dump(folder / split, content)
        written[split], written[f"{split}_labels"] = rows, fine
    names = [f"fine{c}".encode() for c in range(100)]
    dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    written["names"] = tuple(n.decode() for n in names)
    return written
