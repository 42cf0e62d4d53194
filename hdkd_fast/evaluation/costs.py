"""Compute cost of every exit, measured with ``torch.utils.flop_counter.FlopCounterMode``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from .._validation import is_int
from ..models.base import MultiExitModule, eval_mode


def exit_costs(model: MultiExitModule, input_shape: Sequence[int]) -> Tensor:
    """Cumulative FLOPs per sample to reach each exit: ``Tensor[K]`` (float64), strictly increasing.

    ``c_k`` counts everything a sample leaving at exit k has run: the blocks up to exit k and the heads
    of exits ``0 … k`` (as MSDNet's op counter does). One forward in eval mode and without gradients on
    random data of ``input_shape`` (batch first, e.g. ``(1, 3, 32, 32)``), on the model's device and
    dtype, divided by the batch size. FLOPs are ``FlopCounterMode``'s: 2 per multiply-add of
    convolutions and matrix products; normalization, activations and pooling are not counted. Papers
    that report "FLOPs" as multiply-adds (MSDNet among them) give about half these numbers.
    """
    if not isinstance(model, MultiExitModule):
        raise TypeError(
            "model must be a multi-exit model of hdkd_fast.models (MSDNet, MultiExitResNet or attach_exits(...)); "
            f"got {type(model).__name__}"
        )
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) and not isinstance(input_shape, str) else ()
    if len(shape) < 2 or not all(is_int(d) and d > 0 for d in shape):
        raise ValueError(
            "input_shape must be the shape of an input batch in positive ints, e.g. (1, 3, 32, 32); "
            f"got {input_shape!r}"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    x = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0), device=device, dtype=dtype)

    totals: list[int] = []
    counter = FlopCounterMode(display=False)

    def snapshot(k: int, logits: Tensor, feature: Tensor) -> None:
        totals.append(counter.get_total_flops())

    with eval_mode(model), torch.no_grad(), counter:
        model.forward_exits(x, snapshot)
    return torch.tensor(totals, dtype=torch.float64) / shape[0]
