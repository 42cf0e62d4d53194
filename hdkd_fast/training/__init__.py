"""Training runs of the command line (``hdkd-fast train``): configuration, methods, the loop,
checkpoints and reports. The Python entry point is :func:`train`."""

from .config import TrainConfig
from .loop import train
from .methods import METHODS, TrainMethod, method_class, method_names, register_method, unregister_method

__all__ = ["METHODS", "TrainConfig", "TrainMethod", "method_class", "method_names", "register_method", "train",
           "unregister_method"]
