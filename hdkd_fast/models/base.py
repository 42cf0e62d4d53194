"""The interface every multi-exit model of :mod:`hdkd_fast.models` implements.

A model with K exits maps an input batch to K logits tensors ``[B, num_classes]``, ordered from the
shallowest exit to the final one. Besides ``forward``, each model exposes one driver,
:meth:`MultiExitModule.forward_exits`, that computes the exits in order and lets a callback drop rows
after every exit: the rows it drops are not computed any further. ``forward``, early-exit inference
(:class:`hdkd_fast.inference.EarlyExit`) and cost measurement (:func:`hdkd_fast.evaluation.exit_costs`)
are all this one driver with different callbacks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, overload

from torch import Tensor, nn

from .._validation import check_count

ExitCallback = Callable[[int, Tensor, Tensor], Tensor | None]
"""``on_exit(k, logits, feature) -> keep``: called right after exit ``k`` is computed on the rows
still running. ``logits`` is ``[rows, num_classes]``, ``feature`` the tensor the exit head read.
Return a boolean mask ``[rows]`` of the rows that go on to the next exit, or ``None`` for all of them.
The return value of the final exit's call is ignored."""

ExitMap = Callable[[int, Tensor], Tensor]
"""``map(k, s) -> s'``: replaces the trunk tensor ``s`` at exit ``k`` by ``s'`` (same value in practice; e.g. an
op that changes only the backward pass). Returning ``s`` itself means "unchanged"."""


class MultiExitModule(nn.Module, ABC):
    """Base class of the multi-exit models: ``forward(x)`` returns a list of K logits.

    Subclasses implement :attr:`num_exits` and :meth:`forward_exits`; ``forward`` is derived from them.
    """

    @property
    @abstractmethod
    def num_exits(self) -> int:
        """K, the number of exits (the last one is the final classifier)."""

    @abstractmethod
    def forward_exits(self, x: Tensor, on_exit: ExitCallback) -> None:
        """Compute the exits of ``x`` in order, calling ``on_exit`` after each (see :data:`ExitCallback`).

        Rows that ``on_exit`` drops are not computed by any later block; when no row is left the
        driver returns at once.
        """

    @overload
    def forward(self, x: Tensor, return_features: Literal[False] = ...) -> list[Tensor]: ...

    @overload
    def forward(self, x: Tensor, return_features: Literal[True]) -> tuple[list[Tensor], list[Tensor]]: ...

    def forward(self, x: Tensor, return_features: bool = False) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Every exit's logits ``[B, num_classes]``, shallowest first (the last is the final exit).

        With ``return_features=True`` also the K features the exit heads read (one per exit, in the same
        order), e.g. for feature-level distillation: ``(logits, features)``.
        """
        logits: list[Tensor] = []
        features: list[Tensor] = []

        def collect(k: int, z: Tensor, feature: Tensor) -> None:
            logits.append(z)
            if return_features:
                features.append(feature)

        self.forward_exits(x, collect)
        return (logits, features) if return_features else logits

    def forward_exits_mapped(self, x: Tensor, on_exit: ExitCallback, into_head: ExitMap, onward: ExitMap) -> None:
        """:meth:`forward_exits` with the trunk tensor :math:`s_k` that exit k's head reads replaced by
        ``h_k = into_head(k, s_k)``, and the trunk going on to exit k + 1 from ``onward(k, h_k)`` (k < K - 1).

        This is the hook of :class:`hdkd_fast.distill.GradientEquilibrium`. Models that cannot map their exit
        tensors keep this default, which raises a ``TypeError`` (see :func:`supports_exit_maps`).
        """
        raise TypeError(f"{type(self).__name__} does not implement forward_exits_mapped (the model cannot map the "
                        "tensors its exit heads read)")


def supports_exit_maps(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`MultiExitModule` that implements :meth:`~MultiExitModule.forward_exits_mapped`."""
    return (isinstance(model, MultiExitModule)
            and type(model).forward_exits_mapped is not MultiExitModule.forward_exits_mapped)


class StagedMultiExit(MultiExitModule):
    """A multi-exit network that is a chain of K ``(block, head)`` stages.

    Stage k maps the running state ``s`` (a tensor, or a list of tensors for multi-scale models) to
    ``s_k = block_k(s_{k-1})`` (``s_{-1} = x``) and exit k's logits to ``head_k(exit_feature(s_k))``.
    """

    @abstractmethod
    def stages(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        """The K ``(block, head)`` pairs, in order."""

    def exit_feature(self, state: Any) -> Tensor:
        """The tensor of ``state`` the exit head reads (the state itself by default)."""
        return state

    @property
    def num_exits(self) -> int:
        return len(self.stages())

    def forward_exits(self, x: Tensor, on_exit: ExitCallback) -> None:
        self.forward_exits_mapped(x, on_exit, _unchanged, _unchanged)

    def forward_exits_mapped(self, x: Tensor, on_exit: ExitCallback, into_head: ExitMap, onward: ExitMap) -> None:
        """The stage loop; the maps act on ``exit_feature(state)`` (for a list state, on that one tensor)."""
        stages = self.stages()
        state: Any = x
        for k, (block, head) in enumerate(stages):
            state = self._map_exit_feature(block(state), k, into_head)
            feature = self.exit_feature(state)
            keep = on_exit(k, head(feature), feature)
            if k == len(stages) - 1:
                return
            state = self._map_exit_feature(state, k, onward)
            if keep is None or bool(keep.all()):
                continue
            if not bool(keep.any()):
                return
            state = take_rows(state, keep)

    def _map_exit_feature(self, state: Any, k: int, fn: ExitMap) -> Any:
        """``state`` with the tensor ``exit_feature(state)`` replaced by ``fn(k, it)``."""
        feature = self.exit_feature(state)
        mapped = fn(k, feature)
        if mapped is feature:
            return state
        if feature is state:
            return mapped
        if isinstance(state, (list, tuple)):
            for i, item in enumerate(state):
                if item is feature:
                    items = list(state)
                    items[i] = mapped
                    return type(state)(items)
        raise TypeError(
            f"to map the tensor its exit heads read, {type(self).__name__}.exit_feature(state) must return the state "
            "itself or one tensor of a list/tuple state; it returned a different tensor"
        )


def _unchanged(k: int, s: Tensor) -> Tensor:
    return s


class PoolLinearHead(nn.Module):
    """Exit head ``z = W · mean_{spatial}(h) + b`` for a feature ``h`` of shape ``[B, C, *spatial]``.

    A 2-D feature ``[B, C]`` is used as is. With ``in_channels=None`` the linear layer is an
    :class:`torch.nn.LazyLinear` that infers ``C`` on the first forward.
    """

    def __init__(self, num_classes: int, in_channels: int | None = None) -> None:
        super().__init__()
        self.fc: nn.Module = nn.LazyLinear(num_classes) if in_channels is None else nn.Linear(in_channels, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        pooled = h.flatten(2).mean(dim=2) if h.dim() > 2 else h
        return self.fc(pooled)


def take_rows(state: Any, keep: Tensor) -> Any:
    """Rows ``keep`` (boolean mask over the batch) of a tensor or a (nested) list/tuple of tensors."""
    if isinstance(state, Tensor):
        return state[keep]
    if isinstance(state, (list, tuple)):
        return type(state)(take_rows(s, keep) for s in state)
    raise TypeError(f"cannot select rows of a model state of type {type(state).__name__}")


def check_num_classes(num_classes: object) -> int:
    """A positive int (not a bool)."""
    return check_count(num_classes, "num_classes")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` (and every submodule) in eval mode; restore each one's own mode on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def init_conv_bn_linear(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, BatchNorm γ = 1 and β = 0, zero linear biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
