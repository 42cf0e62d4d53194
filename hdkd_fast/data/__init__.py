"""Datasets of the training CLI: uint8 images in memory or decoded lazily, augmentation, deterministic batches.

- :func:`load_dataset` -> :class:`DataBundle` (train / val / test :class:`ImageDataset` splits, classes,
  input shape, normalization statistics) for one of :data:`DATASETS`:

  - ``"digits"``: scikit-learn's bundled 8×8 handwritten digits, the default when no data directory is
    given (no download);
  - ``"cifar10"``, ``"cifar100"``: the python-pickle version, as a folder or its ``.tar.gz`` archive;
  - ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"``: the IDX files (raw or ``.gz``) of the MNIST family,
    found in a folder, Debian's ``/usr/share/datasets/<name>`` or fetched by :func:`download_dataset`
    (published MD5s checked);
  - ``"imagefolder"``: ``root/train/<class>/<image>`` (+ ``test``/``val``), decoded with Pillow;

- :func:`with_label_noise`: symmetric label noise on the training (and optionally validation) labels,
  seeded (:mod:`hdkd_fast.data.noise` gives the definition);
- :class:`Augment`: random crop with zero padding, horizontal flip and normalization of whole batches
  with torch ops, drawing from a given generator;
- :class:`EpochLoader`: the batches of one epoch for one (DDP) rank, a pure function of (seed, epoch).

scikit-learn, Pillow and numpy are imported only when a dataset needs them (``pip install 'hdkd_fast[train]'``).
"""

from .augment import Augment, AugmentParams
from .dataset import ImageDataset, TensorImageDataset
from .folder import IMAGE_EXTENSIONS, FolderImageDataset
from .idx import DownloadError
from .load import DATASETS, IDX_DATASETS, DataBundle, download_dataset, load_dataset
from .loader import EpochLoader
from .noise import symmetric_noise, with_label_noise

__all__ = [
    "DATASETS",
    "IDX_DATASETS",
    "IMAGE_EXTENSIONS",
    "Augment",
    "AugmentParams",
    "DataBundle",
    "DownloadError",
    "EpochLoader",
    "FolderImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "download_dataset",
    "load_dataset",
    "symmetric_noise",
    "with_label_noise",
]
