"""Backend registry and dispatch.

Every backend is a module exposing ``NAME``, ``unavailable_reason(device) -> str | None`` and the two
ops of :mod:`hdkd_fast.backends.torch_backend` (``losses_and_grad`` and ``jvp``) with the same
signatures. ``"auto"`` takes the first available backend of the device type's preference order.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "native")
"""Every backend name; ``"auto"`` picks one of them."""

_AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
_HOW_TO_GET = {
    "triton": "it needs CUDA tensors and Triton (pip install 'hdkd_fast[triton]')",
    "native": "it needs the compiled extension hdkd_fast._C, built on first use or by `hdkd-fast build` "
    "(a C++ compiler and ninja; HDKD_FAST_NO_EXT unset)",
}

DeviceLike = torch.device | str | None

_modules: dict[str, ModuleType | None] = {}


def _load(name: str) -> ModuleType | None:
    """Import ``hdkd_fast.backends.<name>_backend`` once; ``None`` when this build lacks it."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}_backend")
        except ImportError:
            _modules[name] = None
    return _modules[name]


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    module = _load(name)
    if module is None:
        return f"this installation has no {name} backend"
    reason: str | None = module.unavailable_reason(device)
    return reason


def _as_device(device: DeviceLike) -> torch.device:
    return torch.get_default_device() if device is None else torch.device(device)


def available_backends(device: DeviceLike = None) -> list[str]:
    """The backend names usable for tensors on ``device`` (default: torch's default device),
    fastest first, i.e. in the order ``backend="auto"`` tries them."""
    dev = _as_device(device)
    order = _AUTO_ORDER.get(dev.type, ("torch",))
    return [name for name in order if _unavailable_reason(name, dev) is None]


def check_backend(backend: object) -> str:
    """``"auto"`` or one of :data:`BACKENDS` (whether it is available is checked at call time)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}; got {backend!r}")
    return str(backend)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device``; raises when it cannot run there."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    if backend == "auto":
        return available_backends(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}; got {backend!r}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        hint = _HOW_TO_GET.get(backend, "")
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors: {reason}"
            + (f"; {hint}" if hint else "")
            + f". Available here: {available_backends(device)}"
        )
    return backend


# Import every backend now (each imports without its optional dependency and then reports itself
# unavailable): an import on first use would happen inside traced code, which torch.compile(fullgraph=True)
# cannot trace.
for _name in BACKENDS:
    _load(_name)


def get_backend(name: str) -> ModuleType:
    """The module of a resolved backend name."""
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not part of this installation")
    return module
