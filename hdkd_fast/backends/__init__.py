"""The backend registry and dispatch.

A backend is a module that implements :class:`Backend` (``hdkd_fast.backends.torch_backend`` is the
reference implementation; every other backend must return the same values within its dtype's
tolerance). It is registered with one :class:`BackendSpec` record: its name, the module, and per device
type its priority for ``backend="auto"``. Everything that lists backends derives from this registry:
:func:`available_backends`, ``"auto"``, the CLI's ``--backend`` choices, the training config's check,
``hdkd-fast info`` and the tests. Adding a backend: docs/design.md, "Adding a backend".
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import Tensor

from .._pairs import PairMask

DeviceLike = torch.device | str | None

ANY_DEVICE = "*"
"""Key of :attr:`BackendSpec.auto_priority` that stands for every device type not named."""


class Backend(Protocol):
    """What a backend module provides (module-level functions; see ``torch_backend`` for the contract
    of each argument and return value)."""

    NAME: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """``None`` when the backend runs on tensors of ``device``, else why not (one clause)."""

    def losses_and_grad(
        self,
        logits: Tensor | Sequence[Tensor],
        target: Tensor | None,
        ce_weight: Tensor | None,
        kd_weight: Tensor | None,
        *,
        temperature: float,
        mask: PairMask,
        detach_teacher: bool,
        ignore_index: int,
        reduction: str,
        compute_grad: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """``(ce, kd, grad)``: per-objective losses and, when ``compute_grad``, the logits gradient of
        the weighted objective."""

    def jvp(
        self,
        logits: Tensor | Sequence[Tensor],
        tangents: Tensor | Sequence[Tensor],
        target: Tensor | None,
        *,
        temperature: float,
        mask: PairMask,
        detach_teacher: bool,
        ignore_index: int,
        reduction: str,
    ) -> tuple[Tensor | None, Tensor]:
        """``(dce, dkd)``: forward-mode derivative of every objective along the logit tangents."""


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend.

    ``auto_priority`` maps a device type (``"cpu"``, ``"cuda"``, or :data:`ANY_DEVICE`) to the backend's
    rank for ``backend="auto"`` there: the available backend of highest priority wins. A backend may run
    on a device type it has no priority for (Triton on CPU tensors under the interpreter), but only
    when asked by name. ``how_to_get`` is appended to the error when it is asked for and unavailable.
    """

    name: str
    module: str
    """Dotted name of the module implementing :class:`Backend`."""
    auto_priority: Mapping[str, int] = field(default_factory=dict)
    how_to_get: str = ""

    def priority(self, device_type: str) -> int | None:
        return self.auto_priority.get(device_type, self.auto_priority.get(ANY_DEVICE))


_REGISTRY: dict[str, BackendSpec] = {}
_modules: dict[str, Backend | None] = {}


def register_backend(spec: BackendSpec) -> None:
    """Add ``spec`` to the registry and import its module now (an import on first use would happen
    inside traced code, which ``torch.compile(fullgraph=True)`` cannot trace). A module that fails to
    import registers as unavailable ("this installation has no ... backend")."""
    if not spec.name or spec.name == "auto":
        raise ValueError(f"a backend name must be non-empty and not 'auto'; got {spec.name!r}")
    if spec.name in _REGISTRY:
        raise ValueError(f"backend {spec.name!r} is already registered (by {_REGISTRY[spec.name].module})")
    _REGISTRY[spec.name] = spec
    _modules.pop(spec.name, None)
    _load(spec.name)


def unregister_backend(name: str) -> None:
    """Remove a registered backend (for tests and plugins that replace one)."""
    _REGISTRY.pop(name)
    _modules.pop(name, None)


def registered_backends() -> Mapping[str, BackendSpec]:
    """Every registered backend by name, in registration order (a read-only view)."""
    return MappingProxyType(_REGISTRY)


def backend_names() -> tuple[str, ...]:
    """Every registered backend name; ``backend=`` takes one of these or ``"auto"``."""
    return tuple(_REGISTRY)


def backend_choices() -> tuple[str, ...]:
    """``("auto", *backend_names())``: the values the CLI and the training config accept."""
    return ("auto", *_REGISTRY)


def _load(name: str) -> Backend | None:
    """The module of a registered backend, imported once; ``None`` when this installation lacks it."""
    if name not in _modules:
        try:
            _modules[name] = cast(Backend, importlib.import_module(_REGISTRY[name].module))
        except ImportError:
            _modules[name] = None
    return _modules[name]


def unavailable_reason(name: str, device: DeviceLike = None) -> str | None:
    """``None`` when backend ``name`` runs on tensors of ``device``, else why not."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}; got {name!r}")
    module = _load(name)
    if module is None:
        return f"this installation has no {name} backend"
    return module.unavailable_reason(_as_device(device))


def _as_device(device: DeviceLike) -> torch.device:
    return torch.get_default_device() if device is None else torch.device(device)


def auto_order(device: DeviceLike = None) -> list[str]:
    """The backends ``"auto"`` considers on ``device``'s type, highest priority first, available or not."""
    device_type = _as_device(device).type
    ranked: list[tuple[int, int, str]] = []
    for name, spec in _REGISTRY.items():  # a plain loop: torch.compile traces this on every call
        priority = spec.priority(device_type)
        if priority is not None:
            ranked.append((-priority, len(ranked), name))
    return [name for _, _, name in sorted(ranked)]


def available_backends(device: DeviceLike = None) -> list[str]:
    """The backend names ``backend="auto"`` may pick for tensors on ``device`` (default: torch's
    default device), fastest first, i.e. in the order it tries them."""
    dev = _as_device(device)
    return [name for name in auto_order(dev) if unavailable_reason(name, dev) is None]


def runnable_backends(device: DeviceLike = None) -> list[str]:
    """Every backend that runs on ``device`` when asked by name: :func:`available_backends`, then the
    ones ``"auto"`` never picks there (Triton on CPU tensors under ``TRITON_INTERPRET=1``)."""
    dev = _as_device(device)
    auto = available_backends(dev)
    return auto + [name for name in _REGISTRY if name not in auto and unavailable_reason(name, dev) is None]


def check_backend(backend: object) -> str:
    """``"auto"`` or a registered name (whether it is available is checked at call time)."""
    if backend != "auto" and backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}; got {backend!r}")
    return str(backend)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device``; raises when it cannot run there."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    if backend == "auto":
        names = available_backends(device)
        if not names:
            raise RuntimeError(f"no backend runs on {device.type} tensors (registered: {backend_names()})")
        return names[0]
    reason = unavailable_reason(check_backend(backend), device)
    if reason is not None:
        hint = _REGISTRY[backend].how_to_get
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors: {reason}"
            + (f"; {hint}" if hint else "")
            + f". Available here: {available_backends(device)}"
        )
    return backend


def get_backend(name: str) -> Backend:
    """The module of a resolved backend name."""
    module = _load(name) if name in _REGISTRY else None
    if module is None:
        raise RuntimeError(f"backend {name!r} is not part of this installation")
    return module


if TYPE_CHECKING:  # mypy checks each built-in backend module against the protocol
    from . import native_backend, torch_backend, triton_backend

    _BUILT_IN: tuple[Backend, ...] = (torch_backend, triton_backend, native_backend)

# The built-in backends: one line each.
register_backend(BackendSpec("torch", f"{__name__}.torch_backend", {ANY_DEVICE: 0}))
register_backend(BackendSpec(
    "triton", f"{__name__}.triton_backend", {"cuda": 20},
    how_to_get="it needs CUDA tensors and Triton (pip install 'hdkd_fast[triton]')",
))
register_backend(BackendSpec(
    "native", f"{__name__}.native_backend", {"cpu": 20, "cuda": 10},
    how_to_get="it needs the compiled extension hdkd_fast._C, built on first use or by `hdkd-fast build` "
    "(a C++ compiler and ninja; HDKD_FAST_NO_EXT unset)",
))
