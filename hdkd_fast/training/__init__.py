"""Training runs of the command line (``hdkd-fast train``): configuration, methods, the loop,
checkpoints and reports. The Python entry point is :func:`train`."""

from .config import METHODS, TrainConfig
from .loop import train
from .methods import METHOD_CLASSES, TrainMethod

__all__ = ["METHODS", "METHOD_CLASSES", "TrainConfig", "TrainMethod", "train"]
