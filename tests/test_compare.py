"""``hdkd-fast compare``: several methods × seeds on the embedded digits, the mean ± std table against the
runs' own ``final.json`` files (recomputed here in float64 with numpy), the files it writes, reuse and
resumption of earlier runs, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import expect_error

from hdkd_fast.cli import main
from hdkd_fast.training.compare import BUDGET_PLOT, COMPARISON_JSON, COMPARISON_MD, run_dir
from hdkd_fast.training.report import FINAL_FILE, read_final

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
    (["--seeds", "2"], "--methods is required"),
    (["--methods", "ce", "ce"], "methods lists a method more than once"),
    (["--methods", "ce", "dkd", "--teacher", "somewhere"], "--teacher is only used by method 'erde', not 'ce'"),
])
def test_compare_errors_write_nothing(args: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    expect_error(capsys, ["compare", *args, "--out", str(out), *FAST], message)
    assert not out.exists()


def test_compare_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, ["compare", "--methods", "ce", *FAST], "--out is required")
