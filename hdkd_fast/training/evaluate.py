"""Evaluation of a trained multi-exit model: the logits of a whole split, and the ``final.json``
summary (per-exit test accuracy, exit costs, the budgeted accuracy-vs-FLOPs curve)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Augment, EpochLoader, ImageDataset
from ..evaluation import DEFAULT_BUDGET_PROTOCOL, anytime_accuracy, budgeted_accuracy, exit_costs
from ..inference import Criterion
from ..models.base import MultiExitModule, eval_mode


@torch.no_grad()
def collect_logits(model: nn.Module, dataset: ImageDataset, normalize: Augment, *, batch_size: int,
                   device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager[Any]],
                   channels_last: bool = False) -> tuple[list[Tensor], Tensor]:
    """Every exit's float32 logits ``[N, C]`` (on the CPU) over ``dataset`` in order, and its labels."""
    per_exit: list[list[Tensor]] = []
    labels: list[Tensor] = []
    loader = EpochLoader(dataset, batch_size, shuffle=False)
    with eval_mode(model):
        for images, y in loader:
            x = normalize(images.to(device))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = model(x)
            if not per_exit:
                per_exit = [[] for _ in out]
            for k, z in enumerate(out):
                per_exit[k].append(z.float().cpu())
            labels.append(y)
    if not per_exit:
        raise ValueError("cannot evaluate on an empty dataset")
    return [torch.cat(zs) for zs in per_exit], torch.cat(labels)


def split_metrics(logits: list[Tensor], y: Tensor) -> dict[str, Any]:
    """``top1``/``top5`` per exit (fractions) and ``loss`` = Σ_k mean CE_k of a split's logits."""
    acc = anytime_accuracy(logits, y)
    loss = sum(float(F.cross_entropy(z, y)) for z in logits)
    return {"top1": acc.top1.tolist(), "top5": acc.top5.tolist(), "loss": loss}


def final_summary(model: MultiExitModule, val: tuple[list[Tensor], Tensor], test: tuple[list[Tensor], Tensor],
                  input_shape: tuple[int, ...], criterion: Criterion = "maxprob",
                  protocol: str = DEFAULT_BUDGET_PROTOCOL) -> dict[str, Any]:
    """What ``final.json`` holds besides the run's identity: per-exit test accuracy, cumulative FLOPs per
    exit (one sample), and MSDNet's budgeted evaluation (thresholds fit on the validation split) with the
    exit ``criterion`` (``"maxprob"``, or ``"entropy"`` for ERDE-trained models) over the q sweep of
    ``protocol`` (a name of :data:`~hdkd_fast.evaluation.BUDGET_PROTOCOLS`)."""
    test_logits, test_y = test
    costs = exit_costs(model, (1, *input_shape))
    acc = anytime_accuracy(test_logits, test_y)
    curve = budgeted_accuracy(val[0], val[1], test_logits, test_y, costs, criterion, q=protocol)
    return {
        "test/top1": acc.top1.tolist(),
        "test/top5": acc.top5.tolist(),
        "test/loss": split_metrics(test_logits, test_y)["loss"],
        "exit_costs": costs.tolist(),
        "budget": {"cost": curve.cost.tolist(), "accuracy": curve.accuracy.tolist(), "q": curve.q.tolist(),
                   "criterion": criterion, "protocol": protocol},
        "num_test": int(test_y.numel()),
    }
