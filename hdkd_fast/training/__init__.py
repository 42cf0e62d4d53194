"""Training runs of the command line (``hdkd-fast train``): configuration, methods (and their options), the
loop, checkpoints and reports. The Python entry point is :func:`train`."""

from .config import TrainConfig
from .loop import train
from .methods import (
    METHODS,
    MethodOptions,
    TrainMethod,
    method_class,
    method_names,
    option,
    register_method,
    unregister_method,
)

__all__ = ["METHODS", "MethodOptions", "TrainConfig", "TrainMethod", "method_class", "method_names", "option",
           "register_method", "train", "unregister_method"]
