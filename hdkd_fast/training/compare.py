r"""``hdkd-fast compare``: train several methods over several seeds with otherwise equal settings and report
per-exit test top-1 as mean ± standard deviation, training time per method, and every method's
accuracy-versus-FLOPs curve in one plot.

Layout of the comparison directory ``out``: one run directory per method and seed, ``out/<method>/seed<s>``
(an ordinary ``hdkd-fast train`` run: logs, checkpoint, ``final.json``, plots), and the comparison's own
files ``comparison.json``, ``comparison.md`` and ``compare_budget.png``. A run that already finished is
reused and a stopped one resumed from its checkpoint, so an interrupted comparison continues with the
same command.

Statistics over the n seeds: the mean :math:`\bar a = \frac1n\sum_s a_s` and the sample standard deviation
:math:`\sqrt{\frac{1}{n-1}\sum_s (a_s-\bar a)^2}` (0 for one seed). A method's budget curve is the mean over
seeds of the (cost, accuracy) points at each threshold quantile q (every run of a comparison sweeps the
same q, see ``--budget-protocol``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

from .checkpoint import CHECKPOINT, writing
from .config import TrainConfig
from .loop import train
from .methods import method_class
from .report import FINAL_FILE, flop_unit, format_markdown_rows, format_text_rows, read_final

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
BUDGET_PLOT = "compare_budget.png"


class MethodSummary(TypedDict):
    """One method's results over its seeds."""

    seeds: list[int]
    top1_mean: list[float]  # per exit, in [0, 1]
    top1_std: list[float]
    exit_costs: list[float]  # mean over seeds (FLOPs per sample to reach each exit)
    budget_cost: list[float]  # mean curve over seeds
    budget_accuracy: list[float]
    train_time_s: float  # mean over seeds, seconds per run
    runs: list[str]


def run_dir(out: Path, method: str, seed: int) -> Path:
    """Where the run of ``method`` with ``seed`` lives in the comparison directory ``out``."""
    return out / method / f"seed{seed}"


def compare_methods(config: TrainConfig, methods: Sequence[str], seeds: Sequence[int], out: str | Path, *,
                    log: Callable[[str], None] = print) -> dict[str, MethodSummary]:
    """Train (or reuse) ``config`` with every method of ``methods`` and every seed of ``seeds`` under ``out``,
    then write and return the per-method summaries (see the module docstring).

    ``config.method``, ``config.seed`` and ``config.out`` are replaced per run. Every run's settings are
    checked before the first one trains.
    """
    if isinstance(methods, str) or not methods:
        raise ValueError("methods must be a non-empty list of method names")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods lists a method more than once: {list(methods)}")
    if isinstance(seeds, (str, bytes)) or not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct seeds; got {seeds!r}")
    for method in methods:
        method_class(method)  # names the bad one
    root = Path(out)
    configs = {(m, s): dataclasses.replace(config, method=m, seed=s, out=str(run_dir(root, m, s))).validate()
               for m in methods for s in seeds}
    for n, ((method, seed), cfg) in enumerate(configs.items(), start=1):
        where = Path(cfg.out or "")
        prefix = f"[{n}/{len(configs)}] {method}, seed {seed}"
        if (where / FINAL_FILE).exists():
            log(f"{prefix}: finished earlier, reusing {where}")
            continue
        resume = (where / CHECKPOINT).exists()
        log(f"{prefix}: {'resuming' if resume else 'training'} {where}")
        train(cfg, resume=resume, log=log)
    summaries = {m: summarize([run_dir(root, m, s) for s in seeds], list(seeds)) for m in methods}
    write_comparison(summaries, root)
    return summaries


def summarize(runs: Sequence[Path], seeds: list[int]) -> MethodSummary:
    """Mean and standard deviation over ``runs`` (one method, one run per seed) of their ``final.json``."""
    finals = [read_final(run) for run in runs]
    exits = {len(f["test/top1"]) for f in finals}
    quantiles = {tuple(f["budget"]["q"]) for f in finals}
    if len(exits) != 1 or len(quantiles) != 1:
        raise ValueError(f"the runs {[str(r) for r in runs]} differ in their number of exits or budget sweep")

    def mean(values: Sequence[Sequence[float]]) -> list[float]:
        return [statistics.fmean(column) for column in zip(*values, strict=True)]

    def std(values: Sequence[Sequence[float]]) -> list[float]:
        return [statistics.stdev(column) if len(column) > 1 else 0.0 for column in zip(*values, strict=True)]

    top1 = [f["test/top1"] for f in finals]
    return MethodSummary(
        seeds=seeds, top1_mean=mean(top1), top1_std=std(top1),
        exit_costs=mean([f["exit_costs"] for f in finals]),
        budget_cost=mean([f["budget"]["cost"] for f in finals]),
        budget_accuracy=mean([f["budget"]["accuracy"] for f in finals]),
        train_time_s=statistics.fmean(float(f.get("train_time_s", math.nan)) for f in finals),
        runs=[str(run) for run in runs],
    )


def comparison_rows(summaries: Mapping[str, MethodSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table: per exit (then the mean over exits) ``mean ± std`` of test
    top-1 in %, and the mean training time per run."""
    if not summaries:
        raise ValueError("summaries is empty")
    k = max(len(s["top1_mean"]) for s in summaries.values())

    def cell(s: MethodSummary, i: int) -> str:
        if i >= len(s["top1_mean"]):
            return ""
        return f"{100 * s['top1_mean'][i]:.2f} ± {100 * s['top1_std'][i]:.2f}"

    rows = [[f"exit {i + 1}", *(cell(s, i) for s in summaries.values())] for i in range(k)]
    # the std of the exit-mean over seeds is not the mean of the per-exit stds: report the mean only
    rows.append(["mean", *(f"{100 * statistics.fmean(s['top1_mean']):.2f}" for s in summaries.values())])
    rows.append(["train time / run", *(f"{s['train_time_s']:.1f} s" for s in summaries.values())])
    return ["", *summaries], rows


def format_comparison(summaries: Mapping[str, MethodSummary]) -> str:
    """The comparison table as plain text (see :func:`comparison_rows`)."""
    return format_text_rows(*comparison_rows(summaries))


def write_comparison(summaries: Mapping[str, MethodSummary], out: Path) -> list[Path]:
    """``comparison.json``, ``comparison.md`` and (with matplotlib) ``compare_budget.png`` in ``out``."""
    seeds = next(iter(summaries.values()))["seeds"]
    header = f"Test top-1 (%) per exit, mean ± std over seeds {seeds}\n\n"
    written = []
    for name, text in ((COMPARISON_JSON, json.dumps(summaries, indent=2) + "\n"),
                       (COMPARISON_MD, header + format_markdown_rows(*comparison_rows(summaries)) + "\n")):
        with writing(out / name):
            (out / name).write_text(text)
        written.append(out / name)
    with contextlib.suppress(ImportError), writing(out / BUDGET_PLOT):  # without matplotlib: the tables only
        written.append(plot_method_budgets(summaries, out / BUDGET_PLOT))
    return written


def plot_method_budgets(summaries: Mapping[str, MethodSummary], path: Path) -> Path:
    """Mean test top-1 (%) against average FLOPs per sample, one budget curve per method, with every exit's
    mean ± std as an error bar of the curve's color."""
    from ..evaluation.plots import _figure, _save

    scale, unit = flop_unit(max(max(s["exit_costs"]) for s in summaries.values()))
    fig, ax = _figure()
    for method, s in summaries.items():
        points = sorted(zip(s["budget_cost"], s["budget_accuracy"], strict=True))
        (line,) = ax.plot([c / scale for c, _ in points], [100 * a for _, a in points], marker=".",
                          label=f"{method} (n={len(s['seeds'])})")
        ax.errorbar([c / scale for c in s["exit_costs"]], [100 * a for a in s["top1_mean"]],
                    yerr=[100 * d for d in s["top1_std"]], linestyle="none", marker="o", markerfacecolor="none",
                    color=line.get_color(), capsize=3)
    ax.set_xlabel(f"average {unit} per sample")
    ax.set_ylabel("top-1 accuracy (%)")
    return _save(fig, ax, path, "budgeted accuracy, mean over seeds")
