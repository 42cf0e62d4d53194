"""The embedded default dataset: scikit-learn's bundled 8×8 handwritten digits (no download).

``sklearn.datasets.load_digits()`` ships inside the scikit-learn wheel: 1797 grayscale images of 8×8
pixels with values 0..16 (UCI "Optical Recognition of Handwritten Digits", test part), 10 classes.
They are scaled to uint8 0..255 (``round(v * 255 / 16)``) and shaped ``[N, 1, 8, 8]``.
"""

from __future__ import annotations

import torch

from .dataset import TensorImageDataset

CLASS_NAMES = tuple(str(digit) for digit in range(10))


def read_digits() -> TensorImageDataset:
    """All 1797 digits as one in-memory dataset (uint8 ``[1797, 1, 8, 8]``, labels 0..9)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the embedded 'digits' dataset ships with scikit-learn: pip install 'hdkd_fast[train]' "
            "(or pass a data directory with CIFAR or an image folder)"
        ) from err
    digits = load_digits()
    values = torch.as_tensor(digits.images, dtype=torch.float64)
    images = values.mul(255.0 / 16.0).round_().to(torch.uint8).unsqueeze(1)
    return TensorImageDataset(images, torch.as_tensor(digits.target, dtype=torch.int64))
