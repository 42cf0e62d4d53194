"""PNG plots of the evaluation results (matplotlib, drawn with the Agg canvas; imported only when plotting)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .accuracy import AnytimeAccuracy, BudgetCurve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_exit_accuracy(
    accuracy: AnytimeAccuracy,
    path: str | os.PathLike[str],
    *,
    costs: Sequence[float] | Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Top-1 and top-5 accuracy (%) of every exit, against the exit index or, with ``costs``, its FLOPs.

    ``accuracy`` is the result of :func:`anytime_accuracy`, ``costs`` e.g. :func:`exit_costs`. Writes a PNG to
    ``path`` and returns it.
    """
    if not isinstance(accuracy, AnytimeAccuracy):
        raise TypeError(f"accuracy must be an AnytimeAccuracy (from anytime_accuracy); got {type(accuracy).__name__}")
    num_exits = accuracy.top1.numel()
    if costs is None:
        x, xlabel = [float(k) for k in range(1, num_exits + 1)], "exit"
    else:
        x, xlabel = _floats(costs), "FLOPs per sample"
        if len(x) != num_exits:
            raise ValueError(f"costs must hold one value per exit (K = {num_exits}); got {len(x)}")
    fig, ax = new_figure()
    ax.plot(x, _percent(accuracy.top1), marker="o", label="top-1")
    ax.plot(x, _percent(accuracy.top5), marker="s", label="top-5")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    return save_figure(fig, ax, path, title or "accuracy per exit")


def plot_budgeted_accuracy(
    curves: BudgetCurve | Mapping[str, BudgetCurve],
    path: str | os.PathLike[str],
    *,
    exit_costs: Sequence[float] | Tensor | None = None,
    exit_accuracy: AnytimeAccuracy | None = None,
    title: str | None = None,
) -> Path:
    """Test accuracy (%) against average FLOPs per sample, one line per :class:`BudgetCurve`.

    ``curves`` is one curve or ``{label: curve}`` (several models or criteria on one plot). With
    ``exit_costs`` and ``exit_accuracy`` the single exits are drawn as points too (every sample leaving
    at exit k), as in the MSDNet paper's figures. Writes a PNG to ``path`` and returns it.
    """
    named = {"early exit": curves} if isinstance(curves, BudgetCurve) else dict(curves)
    if not named or not all(isinstance(c, BudgetCurve) for c in named.values()):
        raise TypeError("curves must be a BudgetCurve or a non-empty mapping of labels to BudgetCurve")
    if (exit_costs is None) != (exit_accuracy is None):
        raise ValueError("exit_costs and exit_accuracy must be given together")
    fig, ax = new_figure()
    for label, curve in named.items():
        order = torch.argsort(curve.cost)
        ax.plot(_floats(curve.cost[order]), _percent(curve.accuracy[order]), marker=".", label=label)
    if exit_costs is not None and exit_accuracy is not None:
        costs = _floats(exit_costs)
        if len(costs) != exit_accuracy.top1.numel():
            raise ValueError(f"exit_costs has {len(costs)} values but exit_accuracy {exit_accuracy.top1.numel()} exits")
        ax.plot(costs, _percent(exit_accuracy.top1), linestyle="none", marker="x", color="black", label="single exit")
    ax.set_xlabel("average FLOPs per sample")
    ax.set_ylabel("top-1 accuracy (%)")
    return save_figure(fig, ax, path, title or "budgeted accuracy")


def new_figure() -> tuple[Figure, Axes]:
    """A figure of the package's plot size on the Agg canvas and its one axes (also drawn on by the reports
    of :mod:`hdkd_fast.training`); an ``ImportError`` naming the extra when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'hdkd_fast[plot]'") from err
    fig = Figure(figsize=(5.0, 3.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, ax: Axes, path: str | os.PathLike[str], title: str) -> Path:
    """Title, grid and legend on ``ax``, then ``fig`` written to ``path`` as a 150-dpi PNG; returns the path."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png", dpi=150)
    return out


def _floats(values: Sequence[float] | Tensor) -> list[float]:
    return [float(v) for v in (values.detach().cpu().reshape(-1).tolist() if isinstance(values, Tensor) else values)]


def _percent(values: Tensor) -> list[float]:
    return [100.0 * v for v in _floats(values)]
