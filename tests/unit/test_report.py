"""Run reports: reading metrics.jsonl / final.json, the per-run and comparison plots, the exit tables."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from hdkd_fast.training.report import (
    _describe,
    _flop_unit,
    _spread,
    _weight_matrix,
    compare_runs,
    format_exit_table,
    format_markdown_table,
    plot_budget_comparison,
    plot_exit_accuracy_over_epochs,
    plot_exit_comparison,
    plot_weight_matrices,
    read_final,
    read_metrics,
    write_run_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- realistic run directories ------------------------------------------------------------------------------


def _accuracy(rng: random.Random, exit_index: int, progress: float) -> float:
    """A plausible accuracy: grows with the exit depth and the training progress, plus noise."""
    return min(1.0, max(0.0, 0.35 + 0.08 * exit_index + 0.45 * progress + rng.uniform(-0.03, 0.03)))


def make_metrics(num_exits: int, epochs: int, *, weights: bool, seed: int) -> list[dict[str, Any]]:
    """Epoch records like ``hdkd-fast train`` writes; with ``weights``, dense KD weights above the diagonal."""
    rng = random.Random(seed)
    records = []
    for epoch in range(1, epochs + 1):
        progress = epoch / epochs
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": 120 * epoch,
            "time_s": round(3.0 * epoch + rng.random(), 3),
            "lr": 0.1 * (1 - progress) + 1e-3,
            "temperature": 4.0,
            "train/loss": 2.3 * (1.1 - progress) + rng.random() * 0.1,
            "train/top1": [_accuracy(rng, k, progress) for k in range(num_exits)],
            "val/loss": 2.1 * (1.1 - progress) + rng.random() * 0.1,
            "val/top1": [_accuracy(rng, k, progress) for k in range(num_exits)],
            "val/top5": [min(1.0, _accuracy(rng, k, progress) + 0.2) for k in range(num_exits)],
            "grad_norm": rng.random(),  # an unknown key, ignored
        }
        if weights:
            record["weights/ce"] = [rng.uniform(0.5, 1.5) for _ in range(num_exits)]
            record["weights/kd"] = [
                [rng.uniform(0.2, 1.2) if i < j else 0.0 for j in range(num_exits)] for i in range(num_exits)
            ]
        records.append(record)
    return records


def make_final(method: str, num_exits: int, *, seed: int, flops_per_exit: float = 2.5e6) -> dict[str, Any]:
    rng = random.Random(seed)
    costs, total = [], 0.0
    for _ in range(num_exits):
        total += flops_per_exit * rng.uniform(0.8, 1.2)
        costs.append(total)
    top1 = sorted(_accuracy(rng, k, 1.0) * 0.95 for k in range(num_exits))
    points = 8
    budget_cost = [costs[0] + (costs[-1] - costs[0]) * p / (points - 1) for p in range(points)]
    budget_acc = [top1[0] + (top1[-1] - top1[0]) * (p / (points - 1)) ** 0.5 for p in range(points)]
    budget = list(zip(budget_cost, budget_acc, strict=True))
    rng.shuffle(budget)  # the q sweep is not in cost order; the plot sorts
    budget_cost, budget_acc = [c for c, _ in budget], [a for _, a in budget]
    return {
        "method": method,
        "dataset": "digits",
        "model": "msdnet-tiny",
        "num_exits": num_exits,
        "epochs": 10,
        "test/top1": top1,
        "test/top5": [min(1.0, a + 0.15) for a in top1],
        "exit_costs": costs,
        "budget": {"cost": budget_cost, "accuracy": budget_acc, "q": [0.5 + 0.25 * p for p in range(points)]},
        "train_time_s": 12.3,
        "num_test": 360,
    }


def make_run(
    root: Path, name: str, method: str, num_exits: int, *, epochs: int = 7, weights: bool = False, seed: int = 0
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = [json.dumps(r) for r in make_metrics(num_exits, epochs, weights=weights, seed=seed)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (run / "final.json").write_text(json.dumps(make_final(method, num_exits, seed=seed)), encoding="utf-8")
    (run / "config.json").write_text(json.dumps({"method": method, "epochs": epochs}), encoding="utf-8")
    return run


def png_shape(path: Path) -> tuple[int, ...]:
    """Check ``path`` is a real, non-trivial PNG; return its image shape (H, W, channels)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    from matplotlib.image import imread

    image = imread(path)
    assert image.std() > 0.01  # not a blank canvas
    return tuple(image.shape)


# --- reading ------------------------------------------------------------------------------------------------


def test_read_metrics_and_final(tmp_path: Path) -> None:
    run = make_run(tmp_path, "hdkd_run", "hdkd", 4, weights=True, seed=1)
    records = read_metrics(run)
    assert records == make_metrics(4, 7, weights=True, seed=1)  # blank lines skipped, unknown keys kept
    final = read_final(str(run))
    assert final == make_final("hdkd", 4, seed=1)


def test_read_metrics_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(run / "metrics.jsonl"))):
        read_metrics(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metrics(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="run_dir"):
        read_metrics(3)  # type: ignore[arg-type]

    good = [json.dumps(r) for r in make_metrics(3, 4, weights=True, seed=2)]

    def write(lines: list[str]) -> None:
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    write([*good[:2], '{"epoch": 3, "val/top1": [0.1, 0.2', good[3]])
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        read_metrics(run)
    write([good[0], "", json.dumps({"epoch": 2, "val/loss": 1.0})])
    with pytest.raises(ValueError, match=r"line 3: missing required key\(s\) \['val/top1'\]"):
        read_metrics(run)
    write([good[0], "[1, 2]"])
    with pytest.raises(ValueError, match="line 2: an epoch record must be a JSON object"):
        read_metrics(run)
    write([good[0], json.dumps({"epoch": 2, "val/top1": [0.1, 0.2, 0.3, 0.4]})])
    with pytest.raises(ValueError, match="line 2: 'val/top1' has 4 exits but the records before have 3"):
        read_metrics(run)
    write([json.dumps({"epoch": 1, "val/top1": [10.0, 20.0, 30.0]})])
    with pytest.raises(ValueError, match=r"line 1: 'val/top1' must hold accuracies as fractions in \[0, 1\]"):
        read_metrics(run)
    write([json.dumps({"epoch": "1", "val/top1": [0.1]})])
    with pytest.raises(ValueError, match="'epoch' must be an integer"):
        read_metrics(run)
    write([json.dumps({"epoch": 1, "val/top1": [0.1, 0.2, 0.3], "weights/kd": [[0.0, 1.0], [0.0, 0.0]]})])
    with pytest.raises(ValueError, match="'weights/kd' must be a 3×3"):
        read_metrics(run)
    write([json.dumps({"epoch": 1, "val/top1": [0.1, 0.2, 0.3], "weights/ce": [1.0, 1.0]})])
    with pytest.raises(ValueError, match=r"'weights/ce' must hold 3 values \(one per exit\); got 2"):
        read_metrics(run)
    write([""])
    with pytest.raises(ValueError, match="holds no epoch record"):
        read_metrics(run)


def test_read_final_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(run / "final.json"))):
        read_final(run)
    path = run / "final.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"final\.json: not valid JSON \(line 1"):
        read_final(run)

    def check(final: dict[str, Any], match: str) -> None:
        path.write_text(json.dumps(final), encoding="utf-8")
        with pytest.raises(ValueError, match=match) as info:
            read_final(run)
        assert str(path) in str(info.value)

    good = make_final("ce", 3, seed=3)
    check({k: v for k, v in good.items() if k not in ("exit_costs", "budget")}, r"\['exit_costs', 'budget'\]")
    check({**good, "num_exits": 4}, r"'test/top1' must hold 4 values \(one per exit\); got 3")
    check({**good, "test/top5": [0.9, "0.95", 1.0]}, "'test/top5' must be a non-empty list of numbers")
    check({**good, "budget": {"cost": [1.0, 2.0]}}, "'budget' must be an object with 'cost' and 'accuracy'")
    check({**good, "budget": {"cost": [1.0, 2.0], "accuracy": [0.5]}}, "'budget.accuracy' must hold 2 values")
    check({**good, "num_exits": True}, "'num_exits' must be a positive integer")
    check({**good, "method": None}, "'method' must be a string")
    for epochs in (0, 1.5, None, True):
        check({**good, "epochs": epochs}, "'epochs' must be a positive integer")
    # issue 22 item 10: every value compare and evaluate --compare read (NaN / Infinity are JSON here)
    nan, inf = float("nan"), float("inf")
    budget = good["budget"]
    check({k: v for k, v in good.items() if k != "train_time_s"}, r"missing required key\(s\) \['train_time_s'\]")
    for value in (None, "12.3", nan, inf, -1.0, True):
        check({**good, "train_time_s": value}, "'train_time_s' must be a finite number of seconds >= 0")
    check({**good, "budget": {k: v for k, v in budget.items() if k != "q"}}, "'budget.q' is missing")
    check({**good, "budget": {**budget, "q": None}}, "'budget.q' must be a non-empty list of numbers")
    check({**good, "budget": {**budget, "q": budget["q"][:-1]}},
          r"'budget.q' must hold 8 values \(one per budget point\); got 7")
    for bad in (nan, inf, -1.0):
        check({**good, "exit_costs": [bad, *good["exit_costs"][1:]]}, "'exit_costs' must hold finite numbers >= 0")
        check({**good, "budget": {**budget, "cost": [*budget["cost"][:-1], bad]}},
              "'budget.cost' must hold finite numbers >= 0")
        check({**good, "budget": {**budget, "q": [bad, *budget["q"][1:]]}}, "'budget.q' must hold finite numbers >= 0")
    check({**good, "test/top1": [nan, *good["test/top1"][1:]]},
          r"'test/top1' must hold accuracies as fractions in \[0, 1\]")
    check({**good, "budget": {**budget, "accuracy": [1.5, *budget["accuracy"][1:]]}},
          r"'budget.accuracy' must hold accuracies as fractions in \[0, 1\]")


# --- tables -------------------------------------------------------------------------------------------------


def test_format_exit_table(tmp_path: Path) -> None:
    finals = {"hdkd": make_final("hdkd", 4, seed=4), "ce-baseline": make_final("ce", 3, seed=5)}
    table = format_exit_table(finals)
    lines = table.splitlines()
    assert len(lines) == 2 + 4 + 1  # header, rule, one row per exit (K = 4 at most), mean
    assert lines[0].split() == ["exit", "hdkd", "ce-baseline"]
    assert set(lines[1]) == {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "3", "4", "mean"]
    for k in range(4):
        cells = lines[2 + k].split()
        assert cells[1] == f"{100 * finals['hdkd']['test/top1'][k]:.1f}"
        if k < 3:
            assert cells[2] == f"{100 * finals['ce-baseline']['test/top1'][k]:.1f}"
        else:
            assert len(cells) == 2  # the K = 3 run has a blank cell at exit 4
    for name, final in finals.items():
        assert f"{100 * sum(final['test/top1']) / final['num_exits']:.1f}" in lines[-1]
        # right-aligned under its header: every number of the column ends where the name ends
        end = lines[0].index(name) + len(name)
        for line in (lines[2], lines[-1]):
            assert line[end - 1].isdigit() and (len(line) == end or line[end] == " ")
    assert len({len(line) for line in lines}) == 1  # padded to the same width, blank cells included


def test_format_markdown_table() -> None:
    finals = {"a|b": make_final("hdkd", 3, seed=6), "ce": make_final("ce", 4, seed=7)}
    lines = format_markdown_table(finals).splitlines()
    assert len(lines) == 2 + 4 + 1
    assert [c.strip() for c in lines[0].strip("|").split(" | ")] == ["exit", r"a\|b", "ce"]
    assert re.fullmatch(r"\| :-+ \| -+: \| -+: \|", lines[1])
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({len(line) for line in lines}) == 1
    assert f"{100 * finals['ce']['test/top1'][3]:.1f} |" in lines[5]


def test_table_errors() -> None:
    with pytest.raises(TypeError, match="finals"):
        format_exit_table({})
    with pytest.raises(TypeError, match="finals"):
        format_exit_table([make_final("ce", 3, seed=0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"finals\['ce'\]: missing required key\(s\) \['test/top5'\]"):
        format_exit_table({"ce": {k: v for k, v in make_final("ce", 3, seed=0).items() if k != "test/top5"}})


# --- plots --------------------------------------------------------------------------------------------------


def test_plot_exit_accuracy_over_epochs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = make_metrics(4, 7, weights=False, seed=8)
    path = plot_exit_accuracy_over_epochs(records, tmp_path / "val.png")
    assert path == tmp_path / "val.png"
    assert png_shape(path) == (525, 750, 4)  # 5 x 3.5 inches at 150 dpi, as the evaluation plots
    path = plot_exit_accuracy_over_epochs(records, str(tmp_path / "train.png"), key="train/top1", title="train")
    assert png_shape(path)[:2] == (525, 750)
    with pytest.raises(ValueError, match=r"records\[0\]\['val/top9'\] must be a non-empty list"):
        plot_exit_accuracy_over_epochs(records, tmp_path / "x.png", key="val/top9")
    with pytest.raises(ValueError, match="records is empty"):
        plot_exit_accuracy_over_epochs([], tmp_path / "x.png")
    with pytest.raises(TypeError, match="records"):
        plot_exit_accuracy_over_epochs(records[0], tmp_path / "x.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"records\[1\]: 'val/top1' has 3 exits"):
        plot_exit_accuracy_over_epochs([records[0], make_metrics(3, 1, weights=False, seed=0)[0]], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("num_exits", "epochs"), [(3, 2), (4, 7), (10, 9)])
def test_plot_weight_matrices(tmp_path: Path, num_exits: int, epochs: int) -> None:
    pytest.importorskip("matplotlib")
    path = plot_weight_matrices(make_metrics(num_exits, epochs, weights=True, seed=9), tmp_path / "w.png")
    assert path == tmp_path / "w.png"
    height, width, _ = png_shape(path)
    panels = min(epochs, 5)
    assert width > height and width > 300 * panels  # a row of heatmaps


def test_plot_weight_matrices_without_weights(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert plot_weight_matrices(make_metrics(3, 5, weights=False, seed=10), tmp_path / "w.png") is None
    assert not (tmp_path / "w.png").exists()
    ce_only = [{**r, "weights/ce": [1.0, 0.5, 1.5]} for r in make_metrics(3, 2, weights=False, seed=10)]
    path = plot_weight_matrices(ce_only, tmp_path / "ce.png")
    assert path is not None and png_shape(path)[2] == 4


def test_weight_matrix_cells_and_epoch_choice() -> None:
    nan = float("nan")
    record = {"weights/ce": [1.0, 2.0, 3.0], "weights/kd": [[0.0, 0.4, 0.0], [0.0, 0.0, 0.6], [0.0, 0.0, 0.0]]}
    matrix = _weight_matrix(record, 3)
    expected = [[1.0, 0.4, nan], [nan, 2.0, 0.6], [nan, nan, 3.0]]  # adjacent pairs: others blank
    assert [[("nan" if v != v else v) for v in row] for row in matrix] == [
        [("nan" if v != v else v) for v in row] for row in expected
    ]
    assert _spread(3, 5) == [0, 1, 2]
    assert _spread(10, 5) == [0, 2, 4, 7, 9]  # first, evenly spaced, last
    assert _spread(6, 5)[0] == 0 and _spread(6, 5)[-1] == 5 and len(_spread(6, 5)) == 5


def test_flop_units() -> None:
    assert _flop_unit([make_final("a", 3, seed=0, flops_per_exit=2e9)]) == (1e9, "GFLOPs")
    assert _flop_unit([make_final("a", 3, seed=0, flops_per_exit=2e5), make_final("b", 3, seed=0)]) == (1e6, "MFLOPs")
    assert _flop_unit([make_final("a", 3, seed=0, flops_per_exit=2e4)]) == (1e3, "kFLOPs")


def test_axis_wording() -> None:
    assert [_describe(k) for k in ("val/top1", "train/top5", "test/top1", "acc")] == [
        "validation top-1",
        "training top-5",
        "test top-1",
        "acc",
    ]


def test_comparison_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    finals = {"hdkd": make_final("hdkd", 4, seed=11), "ce": make_final("ce", 3, seed=12)}
    for plot, name in ((plot_budget_comparison, "budget.png"), (plot_exit_comparison, "exits.png")):
        path = plot(finals, tmp_path / name)
        assert png_shape(path) == (525, 750, 4)
    with pytest.raises(ValueError, match=r"finals\['ce'\]: 'exit_costs' must hold 3 values"):
        plot_budget_comparison({"ce": {**finals["ce"], "exit_costs": [1.0]}}, tmp_path / "x.png")


# --- run directories ----------------------------------------------------------------------------------------


def test_write_run_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, "hdkd", "hdkd", 4, weights=True, seed=13)
    paths = write_run_plots(run)
    assert paths == [run / "exit_accuracy.png", run / "weights.png", run / "budget.png"]
    for path in paths:
        png_shape(path)

    plain = make_run(tmp_path, "ce", "ce", 3, epochs=2, seed=14)
    (plain / "final.json").unlink()  # an unfinished run
    assert write_run_plots(str(plain)) == [plain / "exit_accuracy.png"]
    assert not (plain / "weights.png").exists() and not (plain / "budget.png").exists()


def test_compare_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [
        make_run(tmp_path / "runs", "hdkd_seed0", "hdkd", 4, weights=True, seed=15),
        make_run(tmp_path / "runs", "ce_seed0", "ce", 3, seed=16),
    ]
    out = tmp_path / "report" / "nested"
    result = compare_runs(runs, out)
    assert result["plots"] == [out / "compare_budget.png", out / "compare_exits.png"]
    for path in result["plots"]:
        png_shape(path)
    assert result["runs"] == {"hdkd": runs[0], "ce": runs[1]}  # the methods differ: runs named by method
    finals = {"hdkd": read_final(runs[0]), "ce": read_final(runs[1])}
    assert result["table"] == format_exit_table(finals)
    assert result["markdown"] == format_markdown_table(finals)

    again = make_run(tmp_path / "runs", "hdkd_seed1", "hdkd", 4, weights=True, seed=17)
    result = compare_runs([str(runs[0]), again], out)
    assert list(result["runs"]) == ["hdkd_seed0", "hdkd_seed1"]  # same method: named by directory
    assert result["table"].splitlines()[0].split() == ["exit", "hdkd_seed0", "hdkd_seed1"]

    other = make_run(tmp_path / "elsewhere", "hdkd_seed0", "hdkd", 4, seed=18)
    assert list(compare_runs([runs[0], other], out)["runs"]) == [str(runs[0]), str(other)]  # paths, last resort


def test_compare_runs_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path, "hdkd", "hdkd", 3, seed=19)
    with pytest.raises(ValueError, match="run_dirs is empty"):
        compare_runs([], tmp_path / "out")
    with pytest.raises(TypeError, match="run_dirs must be a sequence"):
        compare_runs(str(run), tmp_path / "out")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"run_dirs\[1\]"):
        compare_runs([run, 5], tmp_path / "out")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="more than once"):
        compare_runs([run, tmp_path / "." / "hdkd"], tmp_path / "out")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match=r"unfinished/final\.json"):
        compare_runs([run, tmp_path / "unfinished"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
