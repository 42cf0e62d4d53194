"""The end of a training run: ``final.json`` (per-exit test accuracy, exit costs, the budgeted
accuracy-vs-FLOPs curve) and the plots, of the model a run trained (:func:`finish_run`, called by
:func:`~hdkd_fast.training.train`) or of a run's last checkpoint (:func:`finish_from_checkpoint`, what
``hdkd-fast evaluate`` does for a run without ``final.json``, e.g. one that was stopped).

The metrics themselves are :mod:`hdkd_fast.evaluation`'s; this module applies them to a run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..evaluation import DEFAULT_BUDGET_PROTOCOL, anytime_accuracy, budgeted_accuracy, exit_costs
from ..inference import Criterion
from ..models.base import MultiExitModule
from . import distributed as dist_utils
from .checkpoint import load_checkpoint, restore_field, writing
from .config import TrainConfig
from .context import RunContext, run_data
from .methods import method_class
from .records import write_final

SplitLogits = tuple[list[Tensor], Tensor]
"""Every exit's logits over a split, and its labels (:meth:`RunContext.logits`)."""


def split_metrics(logits: list[Tensor], y: Tensor) -> dict[str, Any]:
    """``top1``/``top5`` per exit (fractions) and ``loss`` = Σ_k mean CE_k of a split's logits."""
    acc = anytime_accuracy(logits, y)
    loss = sum(float(F.cross_entropy(z, y)) for z in logits)
    return {"top1": acc.top1.tolist(), "top5": acc.top5.tolist(), "loss": loss}


def final_summary(model: MultiExitModule, val: SplitLogits, test: SplitLogits, input_shape: tuple[int, ...],
                  criterion: Criterion = "maxprob", protocol: str = DEFAULT_BUDGET_PROTOCOL) -> dict[str, Any]:
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


def finish_run(run: RunContext, run_dir: Path, elapsed: float, log: Callable[[str], None],
               val_out: SplitLogits | None = None) -> None:
    """``final.json`` (test accuracy per exit, exit costs, budgeted curve) and the plots of the run's model;
    ``elapsed``: its training time; ``val_out``: the validation logits of this model when the last epoch
    already computed them."""
    config, data = run.config, run.data
    if val_out is None:
        val_out = run.logits(data.val)
    test_out = run.logits(data.test)
    summary = {"method": config.method, "dataset": data.name, "model": config.model,
               "num_exits": run.base.num_exits, "epochs": config.epochs, "train_time_s": elapsed,
               **final_summary(run.base, val_out, test_out, data.input_shape,
                               criterion=method_class(config.method).exit_criterion,
                               protocol=config.budget_protocol)}
    write_final(run_dir, summary)
    with writing(run_dir, "write the plots in"):
        _write_plots(run_dir, log)


def finish_from_checkpoint(run_dir: str | Path, *, device: str = "auto", log: Callable[[str], None] = print) -> Path:
    """Write ``final.json`` (and the plots) of a run from its last checkpoint, e.g. one that was stopped;
    returns the run directory."""
    state = load_checkpoint(run_dir)
    config = TrainConfig.from_json(state["config"])
    dist = dist_utils.setup(device)
    try:
        if dist.distributed:
            raise ValueError("evaluate runs in one process; do not start it with torchrun")
        run = RunContext.build(config, dist, run_data(config))
        restore_field(run_dir, "model", run.model.load_state_dict, state["model"])
        finish_run(run, Path(run_dir), float(state["time_s"]), log)
    finally:
        dist_utils.teardown(dist)
    return Path(run_dir)


def _write_plots(run_dir: Path, log: Callable[[str], None]) -> None:
    try:
        from .report import write_run_plots

        paths = write_run_plots(run_dir)
    except ImportError as exc:  # matplotlib missing: the run itself is complete
        log(f"plots skipped: {exc}")
        return
    log("plots: " + ", ".join(str(p) for p in paths))
