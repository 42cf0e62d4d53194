"""Reports of training runs: read a run directory's logs, plot them, and compare finished runs.

A run directory written by ``hdkd-fast train`` holds

- ``metrics.jsonl``: one JSON object per epoch. Required are ``epoch`` and ``val/top1`` (K accuracies in
  [0, 1]); the other per-exit values (``train/top1``, ``val/top5``, ``weights/ce``) are lists of K numbers,
  ``weights/kd`` is K×K (student i row, teacher j column) with zeros outside the selected pairs, and
  unknown keys are ignored;
- ``final.json``: the test results: ``method``, ``num_exits``, ``test/top1``, ``test/top5`` (K accuracies in
  [0, 1]), ``exit_costs`` (cumulative FLOPs per sample of each exit: K finite numbers >= 0), the ``budget``
  curve (``cost``, ``accuracy`` and the threshold quantiles ``q``, lists of one length) and ``train_time_s``;
  :func:`read_final` checks every one of them (the one check of ``final.json``: ``hdkd-fast evaluate``,
  ``evaluate --compare`` and ``compare`` all read it so);
- ``config.json``: the run's arguments.

:func:`write_run_plots` draws one run's PNGs; :func:`compare_runs` (``hdkd-fast evaluate --compare``)
tabulates and plots several finished runs. The readers and tables need only the standard library; the
plots need matplotlib (``pip install 'hdkd_fast[plot]'``).
"""

from __future__ import annotations

import json
import math
import os
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from .._validation import is_int, is_real
from ..evaluation.plots import new_figure, save_figure

PathArg = str | os.PathLike[str]

METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
RECORD_KEYS = ("epoch", "val/top1")
"""Keys every ``metrics.jsonl`` record must have."""
FINAL_KEYS = ("method", "num_exits", "epochs", "test/top1", "test/top5", "exit_costs", "budget", "train_time_s")
"""Keys ``final.json`` must have."""
MAX_WEIGHT_PANELS = 5
"""Epochs shown by :func:`plot_weight_matrices`: the first, evenly spaced ones, the last."""
ANNOTATE_MAX_EXITS = 8
"""Weight heatmaps print their values up to this many exits."""

_FLOP_UNITS = ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs"))
_SPLIT_NAMES = {"train": "training", "val": "validation"}


class RunComparison(TypedDict):
    """Result of :func:`compare_runs`."""

    table: str  # plain-text per-exit test top-1 table (format_exit_table)
    markdown: str  # the same table in Markdown (format_markdown_table)
    plots: list[Path]  # compare_budget.png, compare_exits.png
    runs: dict[str, Path]  # run name (table header, plot legend) -> run directory


# --- reading ------------------------------------------------------------------------------------------------


def read_metrics(run_dir: PathArg) -> list[dict[str, Any]]:
    """The epoch records of ``run_dir/metrics.jsonl``, in file order (blank lines are skipped).

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
        ValueError: a line that is not a JSON object, lacks a key of :data:`RECORD_KEYS`, has a malformed
            per-exit value or another number of exits than the lines before (the message names the file
            and the line number), or a file without records.
    """
    path = _run_file(run_dir, METRICS_FILE)
    records: list[dict[str, Any]] = []
    num_exits: int | None = None
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            num_exits = _check_record(record, where, num_exits)
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no epoch record")
    return records


def read_final(run_dir: PathArg) -> dict[str, Any]:
    """The test results of ``run_dir/final.json``, checked for the keys of :data:`FINAL_KEYS` and the value of
    each: accuracies in [0, 1], one per exit; the exits and epochs positive integers; costs, budget quantiles
    and the training time finite and >= 0; the budget's ``cost``, ``accuracy`` and ``q`` of one length.

    Raises:
        FileNotFoundError: no ``final.json`` in ``run_dir`` (the run did not finish).
        ValueError: invalid JSON, a missing key, or a value of the wrong type, length or range (the message
            names the file and the field).
    """
    path = _run_file(run_dir, FINAL_FILE)
    final = read_json(path)
    _check_final(final, str(path))
    return final


def read_json(path: Path) -> Any:
    """The JSON value stored in ``path``; invalid JSON is a ``ValueError`` naming the file and the line (a
    missing file an ``OSError``)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err


# --- plots of one run ---------------------------------------------------------------------------------------


def plot_exit_accuracy_over_epochs(
    records: Sequence[Mapping[str, Any]],
    path: PathArg,
    *,
    key: str = "val/top1",
    title: str | None = None,
) -> Path:
    """Accuracy (%) of every exit against the epoch, one line per exit, from the records' ``key``.

    ``records`` is :func:`read_metrics`'s result; every record must have ``key`` (a list of K accuracies
    in [0, 1], e.g. ``"val/top1"``, ``"val/top5"``, ``"train/top1"``). Writes a PNG to ``path`` and
    returns it.
    """
    num_exits = _check_records(records)
    series = [_accuracies(r.get(key), f"records[{n}][{key!r}]", num_exits) for n, r in enumerate(records)]
    epochs = [r["epoch"] for r in records]
    fig, ax = new_figure()
    for k in range(num_exits):
        ax.plot(epochs, [100.0 * acc[k] for acc in series], marker="o", markersize=3, label=f"exit {k + 1}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{_describe(key)} accuracy (%)")
    return save_figure(fig, ax, path, title or f"{_describe(key)} per exit")


def plot_weight_matrices(records: Sequence[Mapping[str, Any]], path: PathArg) -> Path | None:
    """The harmonized loss weights over training: a row of K×K heatmaps sharing one colorbar.

    One heatmap per shown epoch (up to :data:`MAX_WEIGHT_PANELS` of the records that logged weights: the
    first, evenly spaced ones, the last). Cell (i, j) is the KD weight γ_ij of student exit i learning
    from teacher exit j (``weights/kd``); the diagonal holds the CE weights (``weights/ce``); cells outside
    the selected pairs (zero in ``weights/kd``) are blank. Values are printed up to
    :data:`ANNOTATE_MAX_EXITS` exits. Writes a PNG to ``path`` and returns it, or returns ``None`` and
    writes nothing when no record has weights (methods without learned weights).
    """
    num_exits = _check_records(records)
    weighted = [r for r in records if "weights/ce" in r or "weights/kd" in r]
    if not weighted:
        return None
    shown = [weighted[n] for n in _spread(len(weighted), MAX_WEIGHT_PANELS)]
    matrices = [_weight_matrix(r, num_exits) for r in shown]
    values = [v for m in matrices for row in m for v in row if not math.isnan(v)]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)

    fig, _ = new_figure()  # reused for its matplotlib import check; the layout is rebuilt below
    fig.clear()
    fig.set_size_inches(0.4 + 2.3 * len(shown) + 0.9, 3.1)
    axes = [fig.add_subplot(1, len(shown), n + 1) for n in range(len(shown))]
    fontsize = 7 if num_exits <= 4 else 5
    ticks, labels = list(range(num_exits)), [str(k + 1) for k in range(num_exits)]
    for n, (ax, record, matrix) in enumerate(zip(axes, shown, matrices, strict=True)):
        image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(f"epoch {record['epoch']}", fontsize=9)
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels if n == 0 else [])
        ax.set_xlabel("teacher exit j")
        if n == 0:
            ax.set_ylabel("student exit i")
        if num_exits <= ANNOTATE_MAX_EXITS:
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        light = vmax > vmin and (v - vmin) / (vmax - vmin) > 0.6  # viridis is light at the top
                        color = "black" if light else "white"
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color=color)
    fig.subplots_adjust(left=0.4 / fig.get_figwidth(), top=0.8, bottom=0.18, wspace=0.15)
    fig.colorbar(image, ax=axes, fraction=0.04, pad=0.02, label="weight")
    fig.suptitle("loss weights: CE on the diagonal, KD γ_ij (student i, teacher j) off it", fontsize=10)
    out = Path(path)
    fig.savefig(out, format="png", dpi=150, bbox_inches="tight")
    return out


# --- comparisons of finished runs ---------------------------------------------------------------------------


def plot_budget_comparison(finals: Mapping[str, Mapping[str, Any]], path: PathArg, *, title: str | None = None) -> Path:
    """Test top-1 accuracy (%) against average FLOPs per sample, one budget curve per run.

    ``finals`` maps a run name (the legend label) to its :func:`read_final` result. Each run's single exits
    (``exit_costs``, ``test/top1``) are drawn as open circles of its curve's color. The FLOPs unit (G, M
    or k) follows the largest cost. Writes a PNG to ``path`` and returns it.
    """
    named = _check_finals(finals)
    scale, unit = _flop_unit(named.values())
    fig, ax = new_figure()
    for name, final in named.items():
        points = sorted(zip(final["budget"]["cost"], final["budget"]["accuracy"], strict=True))
        (line,) = ax.plot([c / scale for c, _ in points], [100.0 * a for _, a in points], marker=".", label=name)
        ax.plot(
            [c / scale for c in final["exit_costs"]],
            [100.0 * a for a in final["test/top1"]],
            linestyle="none",
            marker="o",
            markerfacecolor="none",
            color=line.get_color(),
        )
    ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", color="gray", label="single exits")
    ax.set_xlabel(f"average {unit} per sample")
    ax.set_ylabel("top-1 accuracy (%)")
    return save_figure(fig, ax, path, title or "budgeted accuracy")


def plot_exit_comparison(finals: Mapping[str, Mapping[str, Any]], path: PathArg, *, title: str | None = None) -> Path:
    """Test top-1 accuracy (%) of every exit against its cumulative FLOPs per sample, one line per run.

    ``finals`` maps a run name (the legend label) to its :func:`read_final` result. Writes a PNG to
    ``path`` and returns it.
    """
    named = _check_finals(finals)
    scale, unit = _flop_unit(named.values())
    fig, ax = new_figure()
    for name, final in named.items():
        costs = [c / scale for c in final["exit_costs"]]
        ax.plot(costs, [100.0 * a for a in final["test/top1"]], marker="o", label=name)
    ax.set_xlabel(f"{unit} per sample to reach the exit")
    ax.set_ylabel("top-1 accuracy (%)")
    return save_figure(fig, ax, path, title or "accuracy per exit")


def format_exit_table(finals: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table of test top-1 (%, one decimal): one row per exit and a last ``mean`` row, one
    column per run (headed by its name), numbers right-aligned. A run with fewer exits gets blank cells.

    ``finals`` maps a run name to its :func:`read_final` result.
    """
    return format_text_rows(*_exit_table(finals))


def format_markdown_table(finals: Mapping[str, Mapping[str, Any]]) -> str:
    """The table of :func:`format_exit_table` in Markdown (run names with ``|`` escaped)."""
    return format_markdown_rows(*_exit_table(finals))


def format_text_rows(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, a dashed rule."""
    widths = [max(len(row[c]) for row in (header, *rows)) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cells[0].ljust(widths[0]) if c == 0 else cells[c].rjust(widths[c]) for c in range(len(cells)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def format_markdown_rows(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (header cells with ``|`` escaped; the other columns right-aligned)."""
    header = [cell.replace("|", r"\|") for cell in header]
    widths = [max(3, *(len(row[c]) for row in (header, *rows))) for c in range(len(header))]
    rule = [":" + "-" * (widths[0] - 1), *("-" * (w - 1) + ":" for w in widths[1:])]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True))]
        return "| " + " | ".join(padded) + " |"

    return "\n".join([line(header), line(rule), *(line(row) for row in rows)])


def compare_runs(run_dirs: Sequence[PathArg], out_dir: PathArg) -> RunComparison:
    """Compare finished runs (``hdkd-fast evaluate --compare run1 run2 ...``).

    Reads every run's ``final.json`` and names each run by its ``method`` when the methods are all
    different, else by its directory name (else by the path as given). Writes ``compare_budget.png``
    (:func:`plot_budget_comparison`) and ``compare_exits.png`` (:func:`plot_exit_comparison`) into
    ``out_dir`` (created if missing) and returns the tables, the plot paths and the run names.
    """
    if isinstance(run_dirs, (str, os.PathLike)) or not isinstance(run_dirs, Sequence):
        raise TypeError(f"run_dirs must be a sequence of run directories; got {type(run_dirs).__name__}")
    if not run_dirs:
        raise ValueError("run_dirs is empty: give at least one run directory")
    dirs = [_path(d, f"run_dirs[{n}]") for n, d in enumerate(run_dirs)]
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ValueError(f"run_dirs lists a run more than once: {[str(d) for d in dirs]}")
    finals = [read_final(d) for d in dirs]
    names = _run_names(dirs, finals)
    named = dict(zip(names, finals, strict=True))
    out = _path(out_dir, "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_budget_comparison(named, out / "compare_budget.png"),
        plot_exit_comparison(named, out / "compare_exits.png"),
    ]
    return RunComparison(
        table=format_exit_table(named),
        markdown=format_markdown_table(named),
        plots=plots,
        runs=dict(zip(names, dirs, strict=True)),
    )


def write_run_plots(run_dir: PathArg) -> list[Path]:
    """Draw one run's plots into ``run_dir`` and return their paths.

    From ``metrics.jsonl``: ``exit_accuracy.png`` (validation top-1 of every exit over the epochs) and
    ``weights.png`` (only when loss weights were logged); from ``final.json``, when the run finished:
    ``budget.png`` (:func:`plot_budget_comparison` of the single run, labelled by its method).
    """
    run = _path(run_dir, "run_dir")
    records = read_metrics(run)
    paths = [plot_exit_accuracy_over_epochs(records, run / "exit_accuracy.png")]
    weights = plot_weight_matrices(records, run / "weights.png")
    if weights is not None:
        paths.append(weights)
    if (run / FINAL_FILE).is_file():
        final = read_final(run)
        paths.append(plot_budget_comparison({str(final["method"]): final}, run / "budget.png"))
    return paths


# --- helpers ------------------------------------------------------------------------------------------------


def _path(value: object, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike); got {type(value).__name__}")
    return Path(value)


def _run_file(run_dir: PathArg, filename: str) -> Path:
    run = _path(run_dir, "run_dir")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    path = run / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run} a run directory of hdkd-fast train?)")
    return path


def _numbers(value: object, what: str, length: int | None = None, per: str = "exit") -> list[float]:
    """``value`` as floats; it must be a non-empty list of numbers, of ``length`` items (one per ``per``) when
    given."""
    if not isinstance(value, (list, tuple)) or not value or not all(is_real(v) for v in value):
        raise ValueError(f"{what} must be a non-empty list of numbers; got {reprlib.repr(value)}")
    if length is not None and len(value) != length:
        raise ValueError(f"{what} must hold {length} values (one per {per}); got {len(value)}")
    return [float(v) for v in value]


def _accuracies(value: object, what: str, length: int | None = None, per: str = "exit") -> list[float]:
    values = _numbers(value, what, length, per)
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{what} must hold accuracies as fractions in [0, 1]; got {reprlib.repr(values)}")
    return values


def _nonnegatives(value: object, what: str, length: int | None = None, per: str = "exit") -> list[float]:
    """Costs and quantiles: finite numbers >= 0 (no NaN, no infinity)."""
    values = _numbers(value, what, length, per)
    if not all(math.isfinite(v) and v >= 0.0 for v in values):
        raise ValueError(f"{what} must hold finite numbers >= 0; got {reprlib.repr(values)}")
    return values


def _check_record(record: object, where: str, num_exits: int | None) -> int:
    """Check one epoch record; return its number of exits, which must equal ``num_exits`` when given."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: an epoch record must be a JSON object; got {type(record).__name__}")
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    epoch = record["epoch"]
    if not is_int(epoch):
        raise ValueError(f"{where}: 'epoch' must be an integer; got {epoch!r}")
    k = len(_accuracies(record["val/top1"], f"{where}: 'val/top1'"))
    if num_exits is not None and k != num_exits:
        raise ValueError(f"{where}: 'val/top1' has {k} exits but the records before have {num_exits}")
    if "weights/ce" in record:
        _numbers(record["weights/ce"], f"{where}: 'weights/ce'", k)
    if "weights/kd" in record:
        kd = record["weights/kd"]
        if not isinstance(kd, (list, tuple)) or len(kd) != k:
            raise ValueError(f"{where}: 'weights/kd' must be a {k}×{k} list of lists; got {reprlib.repr(kd)}")
        for i, row in enumerate(kd):
            _numbers(row, f"{where}: 'weights/kd' row {i}", k)
    return k


def _check_records(records: object) -> int:
    """Check the epoch records given to a plot; return K."""
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a sequence of epoch records (read_metrics); got {type(records).__name__}")
    if not records:
        raise ValueError("records is empty")
    num_exits = _check_record(records[0], "records[0]", None)
    for n, record in enumerate(records[1:], start=1):
        _check_record(record, f"records[{n}]", num_exits)
    return num_exits


def _check_final(final: object, where: str) -> int:
    """Check one ``final.json`` content; return K."""
    if not isinstance(final, Mapping):
        raise ValueError(f"{where}: the final results must be a JSON object; got {type(final).__name__}")
    missing = [key for key in FINAL_KEYS if key not in final]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    if not isinstance(final["method"], str):
        raise ValueError(f"{where}: 'method' must be a string; got {final['method']!r}")
    k = final["num_exits"]
    if not is_int(k) or k < 1:
        raise ValueError(f"{where}: 'num_exits' must be a positive integer; got {k!r}")
    epochs = final["epochs"]
    if not is_int(epochs) or epochs < 1:
        raise ValueError(f"{where}: 'epochs' must be a positive integer; got {epochs!r}")
    _accuracies(final["test/top1"], f"{where}: 'test/top1'", k)
    _accuracies(final["test/top5"], f"{where}: 'test/top5'", k)
    _nonnegatives(final["exit_costs"], f"{where}: 'exit_costs'", k)
    budget = final["budget"]
    if not isinstance(budget, Mapping) or "cost" not in budget or "accuracy" not in budget:
        raise ValueError(f"{where}: 'budget' must be an object with 'cost' and 'accuracy' lists")
    points = len(_nonnegatives(budget["cost"], f"{where}: 'budget.cost'"))
    _accuracies(budget["accuracy"], f"{where}: 'budget.accuracy'", points, "budget point")
    if "q" not in budget:
        raise ValueError(f"{where}: 'budget.q' is missing (the threshold quantile of each budget point)")
    _nonnegatives(budget["q"], f"{where}: 'budget.q'", points, "budget point")
    time_s = final["train_time_s"]
    if not is_real(time_s) or not math.isfinite(time_s) or time_s < 0:
        raise ValueError(f"{where}: 'train_time_s' must be a finite number of seconds >= 0; got {time_s!r}")
    return k


def _check_finals(finals: object) -> dict[str, Mapping[str, Any]]:
    if not isinstance(finals, Mapping) or not finals:
        raise TypeError("finals must be a non-empty mapping of run names to final.json contents (read_final)")
    for name, final in finals.items():
        if not isinstance(name, str):
            raise TypeError(f"finals keys must be run names (str); got {name!r}")
        _check_final(final, f"finals[{name!r}]")
    return dict(finals)


def _exit_table(finals: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (exits, then ``mean``) of the per-exit test top-1 table, as strings."""
    named = _check_finals(finals)
    accuracies = [[100.0 * a for a in final["test/top1"]] for final in named.values()]
    rows = [
        [str(k + 1), *(f"{acc[k]:.1f}" if k < len(acc) else "" for acc in accuracies)]
        for k in range(max(len(acc) for acc in accuracies))
    ]
    rows.append(["mean", *(f"{sum(acc) / len(acc):.1f}" for acc in accuracies)])
    return ["exit", *named], rows


def _describe(key: str) -> str:
    """Axis wording of a metrics key: ``"val/top1"`` -> ``"validation top-1"``."""
    split, _, metric = key.rpartition("/")
    return f"{_SPLIT_NAMES.get(split, split)} {metric.replace('top', 'top-')}".strip()


def _flop_unit(finals: Iterable[Mapping[str, Any]]) -> tuple[float, str]:
    """Scale and unit name for the largest cost of ``finals`` (budget points and exits)."""
    return flop_unit(max(max([*f["exit_costs"], *f["budget"]["cost"]]) for f in finals))


def flop_unit(largest: float) -> tuple[float, str]:
    """Scale and unit name (G, M, k or plain FLOPs) for axes whose largest cost is ``largest``."""
    return next(((scale, unit) for scale, unit in _FLOP_UNITS if largest >= scale), (1.0, "FLOPs"))


def _spread(count: int, most: int) -> list[int]:
    """Up to ``most`` indices of ``range(count)``: the first, evenly spaced ones, the last."""
    if count <= most:
        return list(range(count))
    return sorted({round(n * (count - 1) / (most - 1)) for n in range(most)})


def _weight_matrix(record: Mapping[str, Any], num_exits: int) -> list[list[float]]:
    """K×K cells: CE weights on the diagonal, nonzero KD weights off it, NaN (drawn blank) elsewhere."""
    ce, kd = record.get("weights/ce"), record.get("weights/kd")
    matrix = [[math.nan] * num_exits for _ in range(num_exits)]
    for i in range(num_exits):
        for j in range(num_exits):
            if i == j and ce is not None:
                matrix[i][j] = float(ce[i])
            elif i != j and kd is not None and kd[i][j] != 0:
                matrix[i][j] = float(kd[i][j])
    return matrix


def _run_names(dirs: Sequence[Path], finals: Sequence[Mapping[str, Any]]) -> list[str]:
    """Methods when they are all different, else directory names when those are, else the paths."""
    for names in ([str(f["method"]) for f in finals], [d.resolve().name for d in dirs]):
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in dirs]  # distinct: compare_runs rejects a directory given twice
