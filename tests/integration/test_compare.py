"""``hdkd-fast compare``: several methods × seeds on the embedded digits, the mean ± std table against the
runs' own ``final.json`` files (recomputed here in float64 with numpy), the files it writes, reuse and
resumption of earlier runs (only with equal settings and usable records), the seeds bound, two processes
into one ``--out``, and its one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hdkd_fast.cli import main
from hdkd_fast.training import compare as compare_module
from hdkd_fast.training.compare import (
    BUDGET_PLOT,
    CALIBRATION_JSON,
    COMPARISON_JSON,
    COMPARISON_MD,
    EQUAL_TIME_DIR,
    MAX_SEEDS,
    compare_methods,
    equal_time_epochs,
    run_dir,
)
from hdkd_fast.training.config import TrainConfig
from hdkd_fast.training.methods import method_class
from hdkd_fast.training.report import FINAL_FILE, read_final, read_metrics
from tests.support.cli_helpers import expect_error

pytest.importorskip("sklearn")  # the embedded digits

FAST = ["--limit", "64", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress",
        "--backend", "torch"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compare(out: Path, *extra: str) -> int:
    return main(["compare", "--methods", "ce", "dkd", "--seeds", "2", "--out", str(out), *FAST, *extra])


def test_compare_reports_mean_and_std_of_its_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert compare(out) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / COMPARISON_JSON).read_text())
    assert list(summary) == ["ce", "dkd"]
    for method in ("ce", "dkd"):
        finals = [read_final(run_dir(out, method, s)) for s in (0, 1)]
        assert finals[0]["method"] == method
        top1 = np.array([f["test/top1"] for f in finals], dtype=np.float64)
        np.testing.assert_allclose(summary[method]["top1_mean"], top1.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(summary[method]["top1_std"], top1.std(axis=0, ddof=1), rtol=1e-12, atol=1e-15)
        times = [f["train_time_s"] for f in finals]
        assert summary[method]["train_time_s"] == pytest.approx(float(np.mean(times)))
        cost = np.array([f["budget"]["cost"] for f in finals]).mean(axis=0)
        np.testing.assert_allclose(summary[method]["budget_cost"], cost, rtol=1e-12)
        row = f"{100 * top1.mean(axis=0)[0]:.2f} ± {100 * top1.std(axis=0, ddof=1)[0]:.2f}"
        assert row in printed and row in (out / COMPARISON_MD).read_text()
    seeds = {json.loads((run_dir(out, "ce", s) / "config.json").read_text())["seed"] for s in (0, 1)}
    assert seeds == {0, 1}
    assert read_final(run_dir(out, "ce", 0))["test/top1"] != read_final(run_dir(out, "ce", 1))["test/top1"]
    assert (out / BUDGET_PLOT).read_bytes()[:8] == PNG_MAGIC


def test_compare_reuses_finished_runs_and_resumes_stopped_ones(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert compare(out) == 0
    before = json.loads((out / COMPARISON_JSON).read_text())
    (run_dir(out, "dkd", 1) / FINAL_FILE).unlink()  # as if stopped after its last checkpoint
    capsys.readouterr()
    assert compare(out) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, reusing") == 3
    assert f"resuming {run_dir(out, 'dkd', 1)}" in printed
    assert json.loads((out / COMPARISON_JSON).read_text()) == before  # same models, same numbers


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "ce", "--method", "dkd"], "remove --method"),
    (["--methods", "ce", "--seed", "3"], "remove --seed"),
    (["--methods", "ce", "--resume"], "remove --resume"),
    (["--methods", "ce", "--seeds", "0"], "--seeds must be a positive count"),
    (["--methods", "ce", "--seeds", str(MAX_SEEDS + 1)], f"--seeds must be a positive count of at most {MAX_SEEDS}"),
    (["--methods", "ce", "--seeds", "1000000000000"], f"at most {MAX_SEEDS}"),  # was a MemoryError (item 9)
    (["--seeds", "2"], "--methods is required"),
    (["--methods", "ce", "ce"], "methods lists a method more than once"),
    (["--methods", "ce", "dkd", "--teacher", "somewhere"], "--teacher is only used by method 'erde', not 'ce'"),
    (["--methods", "ce", "hdkd", "--dbt-schedule", "constant"],
     "--dbt-schedule is only used by method 'dbt', not 'ce' or 'hdkd'"),
])
def test_compare_errors_write_nothing(args: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    expect_error(capsys, ["compare", *args, "--out", str(out), *FAST], message)
    assert not out.exists()


def test_compare_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, ["compare", "--methods", "ce", *FAST], "--out is required")


# -- issue 22 -----------------------------------------------------------------------------------------


def test_compare_validates_one_configuration_per_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 9: the settings are checked once per method, not once per method and seed (3 million seeds
    once built 3 million configurations), and more than MAX_SEEDS seeds are refused before any."""
    validated: list[str] = []
    check = TrainConfig.validate

    def counting(self: TrainConfig) -> TrainConfig:
        validated.append(self.method)
        return check(self)

    class Stop(Exception):
        pass

    def no_training(*args: object, **kwargs: object) -> None:
        raise Stop

    monkeypatch.setattr(TrainConfig, "validate", counting)
    monkeypatch.setattr(compare_module, "train", no_training)
    config = TrainConfig(limit=64, epochs=1, device="cpu", progress=False, backend="torch")
    with pytest.raises(Stop):
        compare_methods(config, ["ce", "dkd"], range(MAX_SEEDS), tmp_path / "cmp", log=lambda _: None)
    assert validated == ["ce", "dkd"]
    with pytest.raises(ValueError, match=f"at most {MAX_SEEDS} seeds"):
        compare_methods(config, ["ce"], range(MAX_SEEDS + 1), tmp_path / "more")
    with pytest.raises(TypeError, match="seed must be an int"):
        compare_methods(config, ["ce"], [0, 1.5], tmp_path / "more")  # type: ignore[list-item]
    assert not (tmp_path / "more").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished comparison of ce over seeds 0 and 1 (FAST settings); tests work on copies (:func:`copy`)."""
    out = tmp_path_factory.mktemp("finished") / "cmp"
    assert main(["compare", "--methods", "ce", "--seeds", "2", "--out", str(out), *FAST]) == 0
    return out


def copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the comparison (the runs' stored --out differs from the copy's: --out is not compared)."""
    out = tmp_path / "cmp"
    shutil.copytree(finished, out)
    return out


def compare_ce(out: Path, *extra: str) -> int:
    return main(["compare", "--methods", "ce", "--seeds", "2", "--out", str(out), *FAST, *extra])


def edit_final(run: Path, change: Callable[[dict[str, Any]], object]) -> None:
    final = json.loads((run / FINAL_FILE).read_text())
    change(final)
    (run / FINAL_FILE).write_text(json.dumps(final))  # NaN and infinity as JSON's NaN / Infinity


@pytest.mark.parametrize(("change", "field"), [
    (lambda f: f["budget"].pop("q"), "'budget.q' is missing"),  # was a KeyError traceback
    (lambda f: f["budget"].update(q=None), "'budget.q' must be a non-empty list"),
    (lambda f: f.update(train_time_s="12 s"), "'train_time_s' must be a finite number"),
    (lambda f: f.update(train_time_s=None), "'train_time_s' must be a finite number"),
    (lambda f: f["exit_costs"].__setitem__(0, math.nan), "'exit_costs' must hold finite numbers >= 0"),
    (lambda f: f["exit_costs"].__setitem__(-1, math.inf), "'exit_costs' must hold finite numbers >= 0"),
    (lambda f: f["exit_costs"].__setitem__(0, -1.0), "'exit_costs' must hold finite numbers >= 0"),
    (lambda f: f["budget"]["cost"].__setitem__(0, math.nan), "'budget.cost' must hold finite numbers >= 0"),
    (lambda f: f["budget"]["q"].pop(), "'budget.q' must hold"),
    (lambda f: f.update(num_exits=f["num_exits"] + 1), "'test/top1' must hold"),
])
def test_compare_refuses_an_unusable_final_json(change: Callable[[dict[str, Any]], object], field: str,
                                                finished: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Item 10: every field compare and evaluate --compare read is checked; the error names the file and the
    field, nothing is reported, and --rerun-changed trains the run again."""
    out = copy(finished, tmp_path)
    run = run_dir(out, "ce", 1)
    edit_final(run, change)
    table = (out / COMPARISON_JSON).read_bytes()
    expect_error(capsys, ["compare", "--methods", "ce", "--seeds", "2", "--out", str(out), *FAST],
                 str(run / FINAL_FILE), field, "--rerun-changed")
    assert (out / COMPARISON_JSON).read_bytes() == table
    expect_error(capsys, ["evaluate", str(run_dir(out, "ce", 0)), "--compare", str(run), "--out", str(tmp_path / "e")],
                 str(run / FINAL_FILE), field)
    assert not (tmp_path / "e").exists()
    assert compare_ce(out, "--rerun-changed") == 0
    printed = capsys.readouterr().out
    assert f"the record of {run} is unusable" in printed and "training it again" in printed
    assert read_final(run)["budget"]["q"] == read_final(run_dir(finished, "ce", 1))["budget"]["q"]
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    assert json.loads((out / COMPARISON_JSON).read_text())["ce"]["top1_mean"] == \
        json.loads((finished / COMPARISON_JSON).read_text())["ce"]["top1_mean"]  # the same run, trained again


@pytest.mark.parametrize(("extra", "pieces"), [
    (["--epochs", "2", "--lr", "0.5", "--batch-size", "16"],
     ["--epochs 1 (asked 2)", "--lr 0.1 (asked 0.5)", "--batch-size 32 (asked 16)", "and 1 more run(s)"]),
    (["--nesterov", "--milestones", "0.3"], ["--nesterov False (asked True)", "--milestones 0.5 0.75 (asked 0.3)"]),
    (["--limit", "48"], ["--limit 64 (asked 48)"]),
    (["--amp", "off"], ["--amp auto (asked off)"]),
    (["--label-noise", "0.2"], ["--label-noise 0.0 (asked 0.2)"]),
])
def test_compare_refuses_runs_with_other_settings(extra: list[str], pieces: list[str], finished: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 11: a finished run trained with other settings is not reported as the requested one."""
    out = copy(finished, tmp_path)
    before = files(out)
    expect_error(capsys, ["compare", "--methods", "ce", "--seeds", "2", "--out", str(out), *FAST, *extra],
                 f"{run_dir(out, 'ce', 0)} was trained with other settings", *pieces, "--rerun-changed")
    assert files(out) == before


def files(out: Path) -> dict[Path, bytes]:
    """Every file under ``out`` but the (empty) lock files, and its contents."""
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"}


def test_compare_refuses_the_dataset_default_epochs_of_a_shorter_run(finished: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Item 11: no --epochs is the dataset's default (12 on digits), not the stored run's 1 epoch."""
    out = copy(finished, tmp_path)
    argv = [a for a in FAST if a not in ("--epochs", "1")]
    expect_error(capsys, ["compare", "--methods", "ce", "--seeds", "2", "--out", str(out), *argv],
                 "--epochs 1 (asked 12)")


def test_compare_refuses_to_resume_a_stopped_run_with_other_settings(finished: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = copy(finished, tmp_path)
    (run_dir(out, "ce", 0) / FINAL_FILE).unlink()  # stopped after its last checkpoint
    expect_error(capsys, ["compare", "--methods", "ce", "--seeds", "2", "--out", str(out), *FAST, "--lr", "0.5"],
                 f"{run_dir(out, 'ce', 0)} (stopped) was started with other settings: --lr 0.1 (asked 0.5)",
                 "and 1 more run(s)")
    assert not (run_dir(out, "ce", 0) / FINAL_FILE).exists()


def test_compare_reuses_runs_whatever_their_neutral_settings(finished: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--out (the copy), --device, --workers and the progress bars do not change what a run trains."""
    out = copy(finished, tmp_path)
    argv = ["--limit", "64", "--epochs", "1", "--batch-size", "32", "--backend", "torch", "--device", "auto",
            "--workers", "1"]
    capsys.readouterr()
    assert main(["compare", "--methods", "ce", "--seeds", "2", "--out", str(out), *argv]) == 0
    assert capsys.readouterr().out.count("finished earlier, reusing") == 2


def test_compare_reruns_changed_runs_when_asked(finished: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = copy(finished, tmp_path)
    (run_dir(out, "ce", 1) / FINAL_FILE).unlink()  # a stopped run is trained again too, not resumed
    capsys.readouterr()
    assert compare_ce(out, "--epochs", "2", "--lr", "0.5", "--batch-size", "16", "--rerun-changed") == 0
    printed = capsys.readouterr().out
    assert printed.count("with other settings: --epochs 1 (asked 2)") == 2 and "reusing" not in printed
    for seed in (0, 1):
        run = run_dir(out, "ce", seed)
        config = json.loads((run / "config.json").read_text())
        assert (config["epochs"], config["lr"], config["batch_size"]) == (2, 0.5, 16)
        assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
        assert read_final(run)["epochs"] == 2
    capsys.readouterr()
    assert compare_ce(out, "--epochs", "2", "--lr", "0.5", "--batch-size", "16") == 0  # now they match
    assert capsys.readouterr().out.count("finished earlier, reusing") == 2


def test_compare_keeps_each_methods_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 24 item 2: every method of a comparison trains with its own options (its argument group), stored
    under ``method_options``; a run with other options is refused by the option's flag, and a run whose
    ``config.json`` has the flat layout of earlier versions is read and reused."""
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "ce", "dbt", "--seeds", "1", "--out", str(out), *FAST]
    assert main([*argv, "--dbt-schedule", "constant"]) == 0
    stored = json.loads((run_dir(out, "dbt", 0) / "config.json").read_text())
    assert stored["method_options"] == {"dbt_schedule": "constant"}
    assert json.loads((run_dir(out, "ce", 0) / "config.json").read_text())["method_options"] == {}
    assert read_metrics(run_dir(out, "dbt", 0))[0]["temperature"] == 4.0  # constant: --temperature
    expect_error(capsys, argv, f"{run_dir(out, 'dbt', 0)} was trained with other settings: --dbt-schedule "
                 "constant (asked adaptive)")
    flat = {key: value for key, value in stored.items() if key != "method_options"}
    flat.update(dbt_schedule="constant", update_every=16, teacher=None)  # every method's options, as before
    (run_dir(out, "dbt", 0) / "config.json").write_text(json.dumps(flat))
    capsys.readouterr()
    assert main([*argv, "--dbt-schedule", "constant"]) == 0
    assert capsys.readouterr().out.count("finished earlier, reusing") == 2


_TOGETHER = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
from hdkd_fast.cli import main  # imported before the start line: both processes compare at once
while not go.exists():
    time.sleep(0.005)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("equal_time", [False, True], ids=["plain", "equal-time"])
def test_two_compares_into_one_out_train_each_run_once(equal_time: bool, tmp_path: Path) -> None:
    """Item 12: two processes started together into one --out: one trains ce/seed0, the other waits for its
    lock and reuses the finished run; the metrics hold epochs [1, 2] once. With --equal-time (issue 23 item
    4) one of them measures the step times, the other waits for the comparison lock and reuses them."""
    out, go = tmp_path / "cmp", tmp_path / "go"
    argv = ["compare", "--methods", "ce", "--seeds", "1", "--out", str(out), *FAST, "--epochs", "2",
            *(["--equal-time"] if equal_time else [])]
    root = out / EQUAL_TIME_DIR if equal_time else out
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                     os.environ.get("PYTHONPATH")) if p)}
    procs = [subprocess.Popen([sys.executable, "-c", _TOGETHER, str(go), *argv], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    done = [p.communicate(timeout=300) for p in procs]
    for proc, (_, stderr) in zip(procs, done, strict=True):
        assert proc.returncode == 0, stderr
    printed = [stdout for stdout, _ in done]
    trained = [p for p in printed if f"ce, seed 0: training {run_dir(root, 'ce', 0)}" in p]
    waited = [p for p in printed if "another compare is training" in p and "finished earlier, reusing" in p]
    assert len(trained) == len(waited) == 1, printed
    assert [r["epoch"] for r in read_metrics(run_dir(root, "ce", 0))] == [1, 2]
    assert json.loads((root / COMPARISON_JSON).read_text())["ce"]["seeds"] == [0]
    if equal_time:
        assert sorted("measuring the training step time of ce" in p for p in printed) == [False, True], printed
        assert sum("step times measured earlier, reusing" in p for p in printed) == 1, printed


# -- issue 23 item 4: --equal-time ------------------------------------------------------------------------


def test_equal_time_epochs_round_to_the_nearest_count() -> None:
    times = {"a": 1.0, "b": 2.0, "c": 10.0, "d": 0.4}
    assert equal_time_epochs(3, times, ["a", "b", "c", "d"]) == {"a": 3, "b": 2, "c": 1, "d": 8}  # 1.5 -> 2, 0.3 -> 1
    assert equal_time_epochs(10, times, ["b", "a"]) == {"b": 10, "a": 20}


def markdown_rows(table: str) -> dict[str, list[str]]:
    """The cells of a Markdown table's rows after the first column, by that column."""
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()
             if line.startswith("|")]
    return {row[0]: row[1:] for row in cells}


class Costs:
    """A fake step_time: each method's seconds per step from a table, every call recorded."""

    def __init__(self, **times: float) -> None:
        self.times, self.calls = times, []

    def __call__(self, config: TrainConfig) -> float:
        assert config.dataset == "digits" and config.limit == 64
        self.calls.append(config.method)
        return self.times[config.method]


EQUAL = TrainConfig(limit=64, epochs=3, batch_size=32, device="cpu", progress=False, backend="torch")


@pytest.mark.slow
def test_equal_time_scales_the_epochs_by_the_step_times(tmp_path: Path) -> None:
    """The reference (first method) trains --epochs; dkd, twice as slow per step, 3 / 2 = 1.5 -> 2 epochs;
    dbt, ten times slower, 0.3 -> 1 (at least one). The calibration is kept: a second call measures nothing
    and reuses every run, and a method added later is measured with one measured before, which rescales it."""
    out, logs = tmp_path / "cmp", []
    costs = Costs(ce=0.01, dkd=0.02, dbt=0.1)
    summaries = compare_methods(EQUAL, ["ce", "dkd", "dbt"], [0, 1], out, equal_time=True, step_cost=costs,
                                log=logs.append)
    assert costs.calls == ["ce", "dkd", "dbt"]
    root = out / EQUAL_TIME_DIR
    expected = {"ce": 3, "dkd": 2, "dbt": 1}
    for method, epochs in expected.items():
        for seed in (0, 1):
            run = run_dir(root, method, seed)
            assert json.loads((run / "config.json").read_text())["epochs"] == epochs
            assert read_final(run)["epochs"] == epochs
            assert [r["epoch"] for r in read_metrics(run)] == list(range(1, epochs + 1))
        assert summaries[method]["epochs"] == epochs
        assert summaries[method]["step_time_s"] == costs.times[method]
    assert "equal training time: ce 10 ms/step, 3 epochs, dkd 20 ms/step, 2 epochs, dbt 100 ms/step, 1 epochs" \
        in "\n".join(logs)
    stored = json.loads((root / CALIBRATION_JSON).read_text())
    assert stored["step_time_s"] == costs.times and "seed" not in stored["settings"]
    assert json.loads((root / COMPARISON_JSON).read_text()) == json.loads(json.dumps(summaries))
    table = (root / COMPARISON_MD).read_text()
    assert "equal training time: every method trains for as long as ce's 3 epoch(s)" in table
    rows = markdown_rows(table)
    assert rows["epochs"] == ["3", "2", "1"] and rows["step time (calibrated)"] == ["10 ms", "20 ms", "100 ms"]
    assert rows["train time / run"] == [f"{summaries[m]['train_time_s']:.1f} s" for m in expected]
    assert not (out / COMPARISON_JSON).exists() and not (out / "ce").exists()  # apart from a plain comparison

    logs.clear()
    again = Costs()  # measures nothing: a call would fail
    assert compare_methods(EQUAL, ["ce", "dkd", "dbt"], [0, 1], out, equal_time=True, step_cost=again,
                           log=logs.append) == summaries
    assert again.calls == [] and "step times measured earlier" in logs[0]
    assert sum("finished earlier, reusing" in line for line in logs) == 6

    later = Costs(dkd=0.04, ekd=0.12)  # a slower machine: dkd measured again to rescale ekd's time
    summaries = compare_methods(EQUAL, ["dkd", "ekd"], [2], out, equal_time=True, step_cost=later,
                                log=lambda _: None)  # dkd the reference: new runs (seed 2)
    assert later.calls == ["dkd", "ekd"]
    assert json.loads((root / CALIBRATION_JSON).read_text())["step_time_s"]["ekd"] == pytest.approx(0.06)
    assert (summaries["dkd"]["epochs"], summaries["ekd"]["epochs"]) == (3, 1)  # 3 * 0.02 / 0.06 = 1.0

    plain = compare_methods(dataclasses.replace(EQUAL, epochs=1), ["ce"], [0], out, log=lambda _: None)
    assert plain["ce"]["step_time_s"] is None and (out / "ce" / "seed0" / "final.json").exists()
    assert "step time" not in (out / COMPARISON_MD).read_text()


def test_equal_time_refuses_a_calibration_of_other_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stored calibration is a record like a run's: with other settings, or unusable, it is an error naming
    it (nothing written) unless --rerun-changed, which measures again and retrains the runs that change."""
    out = tmp_path / "cmp"
    root, path = out / EQUAL_TIME_DIR, out / EQUAL_TIME_DIR / CALIBRATION_JSON
    compare_methods(EQUAL, ["ce", "dkd"], [0], out, equal_time=True, step_cost=Costs(ce=0.01, dkd=0.02),
                    log=lambda _: None)
    argv = ["compare", "--methods", "ce", "dkd", "--seeds", "1", "--out", str(out), *FAST, "--epochs", "3",
            "--equal-time"]
    before = files(out)
    expect_error(capsys, [*argv, "--lr", "0.5"], f"{path} was measured with other settings: --lr 0.1 (asked 0.5)",
                 "pass --rerun-changed to measure the step times again")
    assert files(out) == before
    path.write_text("{")
    expect_error(capsys, argv, f"{path}: not valid JSON", "--rerun-changed")
    path.write_text(json.dumps({"settings": {}, "step_time_s": {"ce": 0}}))
    expect_error(capsys, argv, f"{path}: 'step_time_s.ce' must be a finite number of seconds > 0")
    logs: list[str] = []
    summaries = compare_methods(dataclasses.replace(EQUAL, lr=0.5), ["ce", "dkd"], [0], out, equal_time=True,
                                rerun_changed=True, step_cost=Costs(ce=0.01, dkd=0.01), log=logs.append)
    assert "measuring the step times again" in logs[0]
    assert (summaries["ce"]["epochs"], summaries["dkd"]["epochs"]) == (3, 3)
    assert json.loads((run_dir(root, "dkd", 0) / "config.json").read_text())["epochs"] == 3
    with pytest.raises(ValueError, match="the step time of ce must be a finite number of seconds > 0; got nan"):
        compare_methods(EQUAL, ["ce"], [0], tmp_path / "other", equal_time=True, step_cost=Costs(ce=math.nan))


def test_equal_time_compares_each_methods_options(tmp_path: Path) -> None:
    """A method's step time is kept with the options it was measured with (calibration.json's
    ``method_options``); other options are refused by flag, and the flat layout of earlier versions is read."""
    out, config = tmp_path / "cmp", dataclasses.replace(EQUAL, epochs=1)
    path = out / EQUAL_TIME_DIR / CALIBRATION_JSON
    constant = {"dbt": method_class("dbt").Options(dbt_schedule="constant")}
    compare_methods(config, ["ce", "dbt"], [0], out, method_options=constant, equal_time=True,
                    step_cost=Costs(ce=0.01, dbt=0.01), log=lambda _: None)
    stored = json.loads(path.read_text())
    assert stored["method_options"] == {"ce": {}, "dbt": {"dbt_schedule": "constant"}}
    with pytest.raises(ValueError, match=r"was measured with other settings: --dbt-schedule constant \(asked "
                       r"adaptive\)"):
        compare_methods(config, ["ce", "dbt"], [0], out, equal_time=True, step_cost=Costs(), log=lambda _: None)
    flat = {"settings": {**stored["settings"], "dbt_schedule": "constant", "update_every": 16, "teacher": None},
            "step_time_s": stored["step_time_s"]}
    path.write_text(json.dumps(flat))
    logs: list[str] = []
    compare_methods(config, ["ce", "dbt"], [0], out, method_options=constant, equal_time=True, step_cost=Costs(),
                    log=logs.append)
    assert "step times measured earlier" in logs[0]
    with pytest.raises(ValueError, match=r"method_options has the options of \['hdkd'\]"):
        compare_methods(config, ["ce"], [0], out, method_options={"hdkd": method_class("hdkd").Options()})


def test_compare_equal_time_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real calibration (step_time) and tiny runs: each method trains the epochs its measured step time gives."""
    out = tmp_path / "cmp"
    root = out / EQUAL_TIME_DIR
    assert main(["compare", "--methods", "ce", "hdkd", "--seeds", "1", "--out", str(out), *FAST, "--epochs", "2",
                 "--equal-time"]) == 0
    printed = capsys.readouterr().out
    times = json.loads((root / CALIBRATION_JSON).read_text())["step_time_s"]
    assert set(times) == {"ce", "hdkd"} and all(t > 0 for t in times.values())
    epochs = equal_time_epochs(2, times, ["ce", "hdkd"])
    summary = json.loads((root / COMPARISON_JSON).read_text())
    for method in ("ce", "hdkd"):
        assert f"measuring the training step time of {method}" in printed
        assert read_final(run_dir(root, method, 0))["epochs"] == summary[method]["epochs"] == epochs[method]
        assert summary[method]["step_time_s"] == times[method]
    lines = {line.split("  ")[0]: line for line in printed.splitlines()}
    assert lines["epochs"].split()[1:] == [str(epochs["ce"]), str(epochs["hdkd"])]
    assert "train time / run" in lines and "step time (calibrated)" in lines
    assert "equal training time: every method trains for as long as ce's 2 epoch(s)" in printed
    assert f"comparison files: {root}" in printed
