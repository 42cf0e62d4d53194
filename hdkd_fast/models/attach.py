"""Add exit heads to an existing network through forward hooks, without editing its code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import is_int
from .base import ExitCallback, ExitMap, MultiExitModule, PoolLinearHead, check_num_classes, eval_mode

HeadSpec = Sequence[nn.Module] | Callable[[str], nn.Module] | None


_HOOK_ADVICE = (
    "for early exit, attach exits only at modules whose output is the backbone's only path forward, "
    "e.g. the stages of a ResNet"
)


class _StopBackbone(Exception):
    """Raised inside a hook to stop the backbone once no row needs its later layers."""


@dataclass
class _Run:
    on_exit: ExitCallback
    rows: int  # rows the backbone is running on
    next_exit: int = 0  # the exit whose hook should fire next
    dropped: bool = False  # whether a hook already shrank the batch


class _ExitHook:
    """Forward hook of exit ``k`` (an object rather than a closure, so the model can be deep-copied and pickled)."""

    def __init__(self, owner: AttachedExits, k: int) -> None:
        self.owner = owner
        self.k = k

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        return self.owner._on_hook(self.k, output)


class _MapOutput:
    """Forward hook that returns ``fn(k, output)`` for a tensor output."""

    def __init__(self, fn: ExitMap, k: int) -> None:
        self.fn, self.k = fn, k

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        return self.fn(self.k, output) if isinstance(output, Tensor) else None


class AttachedExits(MultiExitModule):
    """A backbone plus exit heads fed by forward hooks on its modules ``at``; build with :func:`attach_exits`.

    Exit k < len(at) is ``heads[k](output of backbone.get_submodule(at[k]))``; with ``include_final``
    the last exit is the backbone's own output. The hooks are no-ops when the backbone is called on its
    own, so ``model.backbone(x)`` still computes exactly what it did before.

    Dropping rows (early exit): the hook at ``at[k]`` returns only the surviving rows of that module's
    output, so the rest of the backbone runs on a smaller batch, and it stops the backbone when no row
    is left. This is exact when the backbone reads the batch after ``at[k]`` only through that module's
    output, as at the boundary between the stages of a ResNet or the children of an ``nn.Sequential``;
    an exit inside a residual block (whose shortcut still holds every row) makes early exit fail with a
    ``RuntimeError`` that says so (plain ``forward`` is unaffected).
    """

    def __init__(
        self, backbone: nn.Module, at: Sequence[str], heads: Sequence[nn.Module], num_classes: int, include_final: bool
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.at = tuple(at)
        self.num_classes = num_classes
        self.include_final = include_final
        self._run: _Run | None = None
        self._handles = [
            backbone.get_submodule(name).register_forward_hook(_ExitHook(self, k)) for k, name in enumerate(self.at)
        ]

    @property
    def num_exits(self) -> int:
        return len(self.at) + int(self.include_final)

    def remove_hooks(self) -> None:
        """Remove the hooks from the backbone (this module stops working; the backbone is as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forward_exits(self, x: Tensor, on_exit: ExitCallback) -> None:
        run = _Run(on_exit, rows=int(x.shape[0]))
        self._run = run
        try:
            output = self.backbone(x)
        except _StopBackbone:
            return
        except RuntimeError as err:
            if not run.dropped:
                raise
            raise RuntimeError(
                f"the backbone failed after an early exit removed rows ({err}). It probably reads the batch around a "
                "hooked module (e.g. a residual shortcut); " + _HOOK_ADVICE
            ) from err
        finally:
            self._run = None
        if run.next_exit != len(self.at):
            raise RuntimeError(
                f"the module at[{run.next_exit}] = {self.at[run.next_exit]!r} did not run during the backbone's "
                "forward, so its exit was never computed"
            )
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] != self.num_classes:
            got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"include_final=True needs the backbone to return logits [B, num_classes={self.num_classes}]; "
                f"it returned {got}. Pass include_final=False to use only the attached exits."
            )
        self._check_rows(output, run, "the backbone's output")
        on_exit(len(self.at), output, output)

    def forward_exits_mapped(self, x: Tensor, on_exit: ExitCallback, into_head: ExitMap, onward: ExitMap) -> None:
        """:meth:`forward_exits` with forward hooks that map the output of each hooked module ``at[k]``, for this
        call only: ``into_head`` before the exit hook reads it, ``onward`` after (what the backbone goes on
        with). A backbone that also reads the batch around a hooked module (a residual shortcut) gets that
        path unmapped; the final exit (the backbone's output) is not mapped."""
        handles = []
        try:
            for k, name in enumerate(self.at):
                module = self.backbone.get_submodule(name)
                handles.append(module.register_forward_hook(_MapOutput(into_head, k), prepend=True))
                if k < self.num_exits - 1:
                    handles.append(module.register_forward_hook(_MapOutput(onward, k)))
            self.forward_exits(x, on_exit)
        finally:
            for handle in handles:
                handle.remove()

    def _on_hook(self, k: int, output: Any) -> Tensor | None:
        """The hook on ``at[k]``: compute exit k, then pass on the surviving rows (or stop the backbone)."""
        run = self._run
        if run is None:
            return None
        name = self.at[k]
        if run.next_exit != k:
            raise ValueError(
                f"at must list modules in the order the backbone runs them, each running once per forward; "
                f"at[{k}] = {name!r} ran when exit {run.next_exit} was due"
            )
        if not isinstance(output, Tensor):
            raise TypeError(
                f"at[{k}] = {name!r} returns a {type(output).__name__}; an exit needs a module that returns a Tensor"
            )
        self._check_rows(output, run, f"the output of at[{k}] = {name!r}")
        run.next_exit += 1
        keep = run.on_exit(k, self.heads[k](output), output)
        if k == self.num_exits - 1:  # include_final=False: nothing after the last exit is needed
            raise _StopBackbone
        if keep is None or bool(keep.all()):
            return None
        if not bool(keep.any()):
            raise _StopBackbone
        run.rows, run.dropped = int(keep.sum()), True
        return output[keep]

    @staticmethod
    def _check_rows(t: Tensor, run: _Run, what: str) -> None:
        if run.dropped and t.shape[0] != run.rows:
            raise RuntimeError(
                f"{what} has {t.shape[0]} rows but {run.rows} samples are still running after an early exit: the "
                "backbone reads the batch around a hooked module (e.g. a residual shortcut); " + _HOOK_ADVICE
            )


def attach_exits(
    backbone: nn.Module,
    at: Sequence[str],
    num_classes: int,
    head: HeadSpec = None,
    *,
    include_final: bool = True,
    input_shape: Sequence[int] | None = None,
) -> AttachedExits:
    """Turn ``backbone`` into a multi-exit model with an exit after each module named in ``at``.

    The backbone's code is untouched: a forward hook on ``backbone.get_submodule(name)`` feeds that
    module's output ``h`` to the exit head. ``model(x)`` returns ``[heads[0](h_0), ..., heads[-1](h_{-1}),
    backbone(x)]`` (without the last entry when ``include_final=False``, which also stops the backbone
    after the last hooked module). The backbone becomes ``model.backbone`` and the heads
    ``model.heads``; ``return_features=True`` returns the ``h_k`` and, for the final exit, the backbone's
    output itself.

    Args:
        backbone: any ``nn.Module``; with ``include_final`` it must return logits ``[B, num_classes]``.
        at: names of submodules (as in ``backbone.named_modules()``) in the order the forward runs them;
            each must run exactly once per forward and return a batch-first Tensor.
        num_classes: number of classes of every exit.
        head: ``None`` for the default head, global average pooling over the dimensions after the
            channel dimension of a ``[B, C, ...]`` feature, then linear (its input width is inferred on
            the first forward by :class:`torch.nn.LazyLinear`); a list of ``len(at)`` modules; or a
            factory ``name -> nn.Module`` called once per entry of ``at``.
        include_final: keep the backbone's own output as the last exit.
        input_shape: if given (e.g. ``(1, 3, 224, 224)``), one forward on random data of that shape, in
            eval mode and without gradients (BatchNorm statistics unchanged), materializes the lazy
            heads now, so an optimizer can be built at once; otherwise run a forward before building it.
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module; got {type(backbone).__name__}")
    names = _check_at(backbone, at)
    num_classes = check_num_classes(num_classes)
    if not isinstance(include_final, bool):
        raise TypeError(f"include_final must be a bool; got {type(include_final).__name__}")
    model = AttachedExits(backbone, names, _make_heads(head, names, num_classes), num_classes, include_final)
    if input_shape is not None:
        _dry_run(model, input_shape)
    return model


def _check_at(backbone: nn.Module, at: Sequence[str]) -> list[str]:
    if isinstance(at, str) or not isinstance(at, Sequence):
        raise TypeError(f"at must be a list of module names; got {type(at).__name__}")
    names = list(at)
    if not names:
        raise ValueError("at must name at least one module")
    modules = dict(backbone.named_modules())
    for k, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"at[{k}] must be a module name (str); got {type(name).__name__}")
        if name == "" or name not in modules:
            known = ", ".join(repr(n) for n in list(modules)[1:9])
            raise ValueError(f"at[{k}] = {name!r} is not a submodule of the backbone (some names: {known}, ...)")
    if len(set(names)) != len(names):
        raise ValueError(f"at must not repeat a module; got {names}")
    return names


def _make_heads(head: HeadSpec, names: list[str], num_classes: int) -> list[nn.Module]:
    if head is None:
        return [PoolLinearHead(num_classes) for _ in names]
    if isinstance(head, (list, tuple, nn.ModuleList)):
        heads = list(head)
        if len(heads) != len(names):
            raise ValueError(f"head must hold one module per entry of at ({len(names)}); got {len(heads)}")
    elif isinstance(head, nn.Module):
        raise TypeError("head must be a list of modules (one per exit) or a factory name -> nn.Module; got one module")
    elif callable(head):
        heads = [head(name) for name in names]
    else:
        raise TypeError(
            f"head must be None, a list of modules or a factory name -> nn.Module; got {type(head).__name__}"
        )
    for k, h in enumerate(heads):
        if not isinstance(h, nn.Module):
            raise TypeError(f"head for at[{k}] = {names[k]!r} must be an nn.Module; got {type(h).__name__}")
    return heads


def _dry_run(model: AttachedExits, input_shape: Sequence[int]) -> None:
    shape = tuple(input_shape)
    if not shape or not all(is_int(d) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints; got {input_shape!r}")
    param = next(model.backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    generator = torch.Generator(device=device).manual_seed(0)
    with eval_mode(model), torch.no_grad():
        model(torch.randn(shape, generator=generator, device=device, dtype=dtype))
