"""The ``hdkd-fast`` command line (issues 7, 8): a short run of every method, ``evaluate`` (one run, a
comparison, a run without ``final.json``), CIFAR end to end, the clear errors of bad arguments and data,
``bench``, ``info`` and ``python -m hdkd_fast --help``.

Every run trains on a few hundred images (``--limit``) for one epoch on the CPU: seconds each.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hdkd_fast.backends import available_backends
from hdkd_fast.cli import main
from hdkd_fast.training.checkpoint import CHECKPOINT, load_checkpoint
from hdkd_fast.training.report import read_final, read_metrics
from tests.support.cifar_files import write_cifar10, write_cifar100
from tests.support.cli_helpers import expect_error

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_digits = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                  reason="the embedded digits need scikit-learn")

FAST = ["--limit", "96", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress"]
"""A run of seconds: 96 images per split, one epoch on the CPU."""
TABLE_TITLE = "test top-1 accuracy (%) per exit"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WEIGHTED = ("hdkd", "dkd-uncertainty")
"""Methods that log loss weights (and so draw weights.png)."""
TEACHER = "<teacher>"
"""Replaced by the directory of the module's ``ce`` run."""


def train(out: Path, *args: str) -> int:
    return main(["train", *FAST, "--out", str(out), *args])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``ce`` run: the teacher of ``erde`` and one of the runs ``evaluate`` compares. Read-only."""
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("runs") / "ce"
    assert train(out, "--method", "ce") == 0
    return out


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory: pytest.TempPathFactory, teacher_run: Path) -> list[Path]:
    """Finished ``ce``, ``dkd`` and ``dbt`` runs. Read-only."""
    root = tmp_path_factory.mktemp("more-runs")
    runs = [teacher_run]
    for method in ("dkd", "dbt"):
        runs.append(root / method)
        assert train(runs[-1], "--method", method) == 0
    return runs


def numpy() -> ModuleType:
    return pytest.importorskip("numpy")


# --- checks of a finished run -------------------------------------------------------------------------------


def check_table(printed: str, finals: dict[str, dict]) -> None:
    """The per-exit table of ``finals`` (column name -> final.json) is in ``printed``, with every value."""
    assert TABLE_TITLE in printed
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("exit "))
    assert header.split() == ["exit", *finals]
    num_exits = max(len(f["test/top1"]) for f in finals.values())
    for k in range(num_exits):
        cells = [f"{100 * f['test/top1'][k]:.1f}" for f in finals.values()]
        assert re.search(rf"^{k + 1}\s+" + r"\s+".join(map(re.escape, cells)) + r"\s*$", printed, re.M), (k, printed)
    means = [f"{100 * sum(f['test/top1']) / len(f['test/top1']):.1f}" for f in finals.values()]
    assert re.search(r"^mean\s+" + r"\s+".join(map(re.escape, means)) + r"\s*$", printed, re.M), printed


def check_run(run: Path, method: str, *, epochs: int = 1, dataset: str = "digits") -> dict:
    """Every file a finished run holds, and their contents; returns final.json."""
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["dataset"], config["epochs"]) == (method, dataset, epochs)

    final = read_final(run)  # checks the keys and the shapes
    k = final["num_exits"]
    assert (final["method"], final["dataset"], final["epochs"]) == (method, dataset, epochs)
    assert k >= 2 and len(final["test/top1"]) == k
    assert all(0.0 <= a <= 1.0 for a in final["test/top1"])
    costs = final["exit_costs"]
    assert all(c > 0 for c in costs) and all(a < b for a, b in itertools.pairwise(costs)), costs
    budget = final["budget"]
    assert len(budget["cost"]) == len(budget["accuracy"]) >= 1
    assert all(0.0 <= a <= 1.0 for a in budget["accuracy"])
    assert all(costs[0] * 0.999 <= c <= costs[-1] * 1.001 for c in budget["cost"]), (budget["cost"], costs)

    records = read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for r in records:
        assert len(r["val/top1"]) == k and all(0.0 <= a <= 1.0 for a in r["val/top1"])
        assert len(r["train/top1"]) == k and math.isfinite(r["train/loss"])

    state = load_checkpoint(run)
    assert state["epoch"] == epochs and state["config"]["method"] == method

    pngs = ["exit_accuracy.png", "budget.png", *(["weights.png"] if method in WEIGHTED else [])]
    for name in pngs:
        if HAVE_MATPLOTLIB:
            assert (run / name).read_bytes()[:8] == PNG_MAGIC, name
        else:
            assert not (run / name).exists()
    if method not in WEIGHTED:
        assert not (run / "weights.png").exists()
    return final


# --- one short run of every method --------------------------------------------------------------------------

CASES = {
    "ce": ["--method", "ce"],
    "dbt": ["--method", "dbt"],
    "dkd": ["--method", "dkd"],
    "hdkd": ["--method", "hdkd"],
    "ekd": ["--method", "ekd"],
    "erde": ["--method", "erde", "--teacher", TEACHER],
    "dkd-uncertainty": ["--method", "dkd-uncertainty"],
    "dkd-gradient-equilibrium": ["--method", "dkd", "--gradient-equilibrium"],
    "hdkd-fd": ["--method", "hdkd", "--hypergrad", "fd"],
    "cosine": ["--method", "dkd-uncertainty", "--schedule", "cosine"],
}


@needs_digits
@pytest.mark.parametrize("args", list(CASES.values()), ids=list(CASES))
def test_every_method_trains_one_epoch(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       request: pytest.FixtureRequest) -> None:
    if TEACHER in args:
        teacher = request.getfixturevalue("teacher_run")
        args = [str(teacher) if a == TEACHER else a for a in args]
        capsys.readouterr()
    method = args[args.index("--method") + 1]
    assert train(tmp_path / "run", *args) == 0
    printed = capsys.readouterr().out
    final = check_run(tmp_path / "run", method)
    check_table(printed, {str(tmp_path / "run"): final})
    assert "epoch 1/1: loss" in printed
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    if "--gradient-equilibrium" in args:
        assert config["gradient_equilibrium"] is True
        assert any(key.startswith("model.") for key in load_checkpoint(tmp_path / "run")["model"])
    if "--schedule" in args:
        assert config["schedule"] == "cosine"
        assert read_metrics(tmp_path / "run")[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # T_max = 1 epoch
    if "--hypergrad" in args:
        assert config["method_options"]["hypergrad"] == "fd"
    if method in WEIGHTED:
        record = read_metrics(tmp_path / "run")[0]
        k = final["num_exits"]
        assert len(record["weights/ce"]) == k and len(record["weights/kd"]) == k
    if method == "erde":
        assert config["method_options"]["teacher"] == str(request.getfixturevalue("teacher_run"))


# --- evaluate -----------------------------------------------------------------------------------------------


@needs_digits
def test_evaluate_one_run_prints_its_table(teacher_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(teacher_run)]) == 0
    printed = capsys.readouterr().out
    check_table(printed, {str(teacher_run): read_final(teacher_run)})
    assert "evaluating its checkpoint" not in printed


@needs_digits
def test_evaluate_compare(three_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    capsys.readouterr()
    first, *others = three_runs
    assert main(["evaluate", str(first), "--compare", *map(str, others), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    finals = {read_final(run)["method"]: read_final(run) for run in three_runs}
    assert list(finals) == ["ce", "dkd", "dbt"]  # the methods differ: they name the columns
    check_table(printed, finals)
    for name in ("compare_budget.png", "compare_exits.png"):
        assert (tmp_path / "cmp" / name).read_bytes()[:8] == PNG_MAGIC
        assert str(tmp_path / "cmp" / name) in printed


@needs_digits
def test_evaluate_rewrites_a_missing_final_json(teacher_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "stopped"
    shutil.copytree(teacher_run, run)
    (run / "final.json").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "no final.json; evaluating its checkpoint" in printed
    before, after = read_final(teacher_run), read_final(run)
    for key in ("test/top1", "test/top5", "exit_costs", "budget", "num_test", "method", "epochs"):
        assert after[key] == before[key], key
    check_table(printed, {str(run): after})


# --- CIFAR end to end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dataset", "write", "folder"), [("cifar10", write_cifar10, "cifar-10-batches-py"),
                                                          ("cifar100", write_cifar100, "cifar-100-python")])
def test_cifar_run(dataset: str, write: object, folder: str, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(write)
    write(numpy(), tmp_path / "data" / folder)  # in the real format; the dataset is detected from the folder
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path / "data"), "--model", "msdnet-tiny", "--val-size", "10",
                 "--epochs", "1", "--method", "dkd", "--batch-size", "32", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    final = check_run(out, "dkd", dataset=dataset)
    assert final["num_test"] == (5 if dataset == "cifar10" else 7)
    assert load_checkpoint(out)["num_classes"] == (10 if dataset == "cifar10" else 100)
    check_table(capsys.readouterr().out, {str(out): final})


# --- bad arguments and bad data: exit code 2 and one clear line ---------------------------------------------


def test_unknown_method_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "nope", *FAST])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hdkd-fast train: error: argument --method: invalid choice: 'nope'"), last


@pytest.mark.parametrize(("args", "pieces"), [
    (["--epochs", "0"], ["epochs must be >= 1", "got 0"]),
    (["--lr", "-1"], ["lr must be finite and > 0", "got -1.0"]),
    (["--batch-size", "0"], ["batch_size must be >= 2"]),
    (["--batch-size", "1"], ["batch_size must be >= 2", "got 1"]),
    (["--val-size", "2.5"], ["--val-size", "2.5"]),
    (["--method", "erde"], ["method 'erde' needs --teacher"]),
    (["--method", "dkd", "--teacher", "somewhere"], ["--teacher is only used by method 'erde', not 'dkd'"]),
    (["--method", "ce", "--update-every", "16"], ["--update-every is only used by method 'hdkd', not 'ce'"]),
    (["--method", "hdkd", "--update-every", "0"], ["update_every must be >= 1", "got 0"]),
    (["--data-dir", "<tmp>/missing"], ["data_dir", "missing does not exist"]),
    (["--label-noise", "1"], ["--label-noise", "must be a probability in [0, 1)", "got 1.0"]),
    (["--label-noise", "nan"], ["--label-noise", "got nan"]),
    (["--label-noise", "-0.2"], ["--label-noise", "got -0.2"]),
    (["--label-noise-validation"], ["--label-noise-validation", "needs label_noise (--label-noise) > 0"]),
    (["--resume", "--out", "<tmp>"], ["--resume", "takes only", "remove --batch-size, --limit"]),  # FAST's
])
def test_bad_train_arguments(args: list[str], pieces: list[str], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.replace("<tmp>", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    expect_error(capsys, ["train", *FAST, *out, *args], *pieces)
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_corrupt_cifar_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar10(numpy(), tmp_path / "c")
    path = tmp_path / "c" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:-500])  # a truncated pickle
    expect_error(capsys, ["train", *FAST, "--data-dir", str(tmp_path / "c"), "--val-size", "4",
                          "--out", str(tmp_path / "run")], str(path), "is not a readable CIFAR pickle")


def test_data_dir_that_is_no_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["train", *FAST, "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "run")],
                 "cannot tell which dataset data_dir", str(tmp_path / "empty"))


@needs_digits
def test_out_that_holds_a_run_needs_resume(teacher_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (teacher_run / CHECKPOINT).read_bytes()
    expect_error(capsys, ["train", *FAST, "--method", "ce", "--out", str(teacher_run)],
                 str(teacher_run), "already holds a run", "--resume")
    assert (teacher_run / CHECKPOINT).read_bytes() == before  # untouched


@needs_digits
def test_teacher_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "teacher.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    expect_error(capsys, ["train", *FAST, "--method", "erde", "--teacher", str(bogus), "--out", str(tmp_path / "r")],
                 f"checkpoint {str(bogus)!r} cannot be read")
    not_ours = tmp_path / "weights.pt"
    torch.save({"model": {}}, not_ours)
    expect_error(capsys, ["train", *FAST, "--method", "erde", "--teacher", str(not_ours), "--out",
                          str(tmp_path / "r")], str(not_ours), "is not an hdkd-fast training checkpoint")


@needs_digits
def test_teacher_of_another_dataset(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar10(numpy(), tmp_path / "c10")  # 10 classes like the digits teacher, but 3×32×32 images
    expect_error(capsys, ["train", "--data-dir", str(tmp_path / "c10"), "--val-size", "4", "--epochs", "1",
                          "--device", "cpu", "--no-progress", "--model", "msdnet-tiny", "--method", "erde",
                          "--teacher", str(teacher_run), "--out", str(tmp_path / "r10")],
                 "takes images of shape (1, 8, 8)", "(3, 32, 32)")
    write_cifar100(numpy(), tmp_path / "c100")
    expect_error(capsys, ["train", "--data-dir", str(tmp_path / "c100"), "--val-size", "4", "--epochs", "1",
                          "--device", "cpu", "--no-progress", "--model", "msdnet-tiny", "--method", "erde",
                          "--teacher", str(teacher_run), "--out", str(tmp_path / "r100")],
                 "predicts 10 classes but the data has 100")


def test_evaluate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, ["evaluate"], "give at least one run directory")
    expect_error(capsys, ["evaluate", str(tmp_path / "nothing")], "checkpoint", "does not exist")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


# --- bench, info, python -m hdkd_fast --help ----------------------------------------------------------------


def test_bench_prints_every_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--exits", "2", "--classes", "10", "--batch", "16", "--no-compile", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "B=16" in printed
    rows = [line.split("|") for line in printed.splitlines() if line.startswith("| 2 | 10 |")]
    impls = {cells[3].strip() for cells in rows}
    assert impls == {*available_backends(torch.device("cpu")), "reference"}
    for cells in rows:
        assert float(cells[4]) >= 0 and float(cells[5]) >= 0  # numbers (their values are timings)


def test_info_prints_the_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("backends (cpu): "))
    for name in available_backends(torch.device("cpu")):
        assert name in line
    assert f"torch      {torch.__version__}" in printed


def test_python_m_help() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["--help"], ["train", "--help"]):
        done = subprocess.run([sys.executable, "-m", "hdkd_fast", *argv], capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert "usage: hdkd-fast" in done.stdout
    assert "--gradient-equilibrium" in done.stdout and "--teacher" in done.stdout
