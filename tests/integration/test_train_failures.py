"""How ``hdkd-fast train`` / ``evaluate`` runs fail (issue 17, hardening; the sections name its items):
checkpoints that cannot run code and whose structure is checked, and the command line's failures as one
line with exit code 2 and nothing half-written.

Every run trains on the embedded digits (scikit-learn), 96 images per split, one epoch on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdkd_fast.cli import main
from hdkd_fast.training import TrainConfig, method_class
from hdkd_fast.training import checkpoint as checkpoint_module
from hdkd_fast.training.checkpoint import CHECKPOINT, load_checkpoint
from hdkd_fast.training.report import read_final, read_metrics
from tests.support.cli_helpers import expect_error

pytest.importorskip("sklearn")  # the embedded digits

FAST = ["--limit", "96", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress"]


def train(out: Path, *args: str) -> int:
    return main(["train", *FAST, "--out", str(out), *args])


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch ``ce`` run. Read-only: tests copy what they change."""
    out = tmp_path_factory.mktemp("runs") / "ce"
    assert train(out, "--method", "ce") == 0
    return out


# --- item 1: opening a checkpoint runs no code, and its structure is checked -------------------------------


class Evil:
    """Unpickling it runs a shell command that creates the file ``pwned.txt`` in the working directory."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, ("touch pwned.txt",)


def write_checkpoint(run: Path, state: dict[str, Any]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    torch.save(state, run / CHECKPOINT)
    return run


def test_a_checkpoint_with_code_is_refused(ce_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    state = load_checkpoint(ce_run)
    evil = write_checkpoint(tmp_path / "evil", {**state, "x": Evil()})
    expect_error(capsys, ["evaluate", str(evil), "--device", "cpu"],
                 str(evil / CHECKPOINT), "cannot be read", "posix.system")
    expect_error(capsys, ["train", "--resume", "--out", str(evil), "--no-progress"], str(evil / CHECKPOINT))
    expect_error(capsys, ["train", *FAST, "--method", "erde", "--teacher", str(evil), "--out", str(tmp_path / "r")],
                 str(evil / CHECKPOINT))
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: s.pop("model"), "'model' is missing"),
    (lambda s: s.pop("num_classes"), "'num_classes' is missing"),
    (lambda s: s.pop("rng"), "'rng' is missing"),
    (lambda s: s.update(epoch="1"), "field 'epoch' must be an int"),
    (lambda s: s.update(num_classes=0), "field 'num_classes' must be >= 1"),
    (lambda s: s.update(input_shape=[1, "8", 8]), "field 'input_shape' must be an int"),
    (lambda s: s.update(model=[1, 2]), "field 'model' must be a state dict"),
    (lambda s: s.update(rng=[{"torch": torch.zeros(3)}]), "field 'rng'[0] must be a dict with the keys"),
    (lambda s: s["config"].update(lr=-1.0), "field 'config': lr must be finite and > 0"),
    (lambda s: s["config"].update(colour="red"), "field 'config': unknown config keys ['colour']"),
], ids=["no-model", "no-num_classes", "no-rng", "epoch-str", "no-classes", "shape-str", "model-list", "rng-keys",
        "config-lr", "config-key"])
def test_a_checkpoint_with_a_bad_field_is_named(change: Any, field: str, ce_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    state = load_checkpoint(ce_run)
    change(state)
    bad = write_checkpoint(tmp_path / "bad", state)
    where = str(bad / CHECKPOINT)
    expect_error(capsys, ["train", "--resume", "--out", str(bad), "--no-progress"], where, field)
    expect_error(capsys, ["train", *FAST, "--method", "erde", "--teacher", str(bad), "--out", str(tmp_path / "r")],
                 where, field)
    expect_error(capsys, ["evaluate", str(bad), "--device", "cpu"], where, field)


def test_a_checkpoint_of_another_model_is_one_line(ce_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Well-formed fields whose contents do not fit the model the config builds: one line, file and field."""
    state = load_checkpoint(ce_run)
    state["model"] = {name: t[..., :1] if t.dim() else t for name, t in state["model"].items()}
    bad = write_checkpoint(tmp_path / "other", state)
    where = str(bad / CHECKPOINT)
    expect_error(capsys, ["train", "--resume", "--out", str(bad), "--epochs", "2", "--no-progress"],
                 where, "field 'model' does not fit")
    expect_error(capsys, ["evaluate", str(bad), "--device", "cpu"], where, "field 'model' does not fit")
    expect_error(capsys, ["train", *FAST, "--method", "erde", "--teacher", str(bad), "--out", str(tmp_path / "r")],
                 where, "field 'model' does not fit")


# --- item 2: non-finite values in a run ---------------------------------------------------------------------


def test_hdkd_records_its_skipped_updates(tmp_path: Path) -> None:
    assert train(tmp_path / "hdkd", "--method", "hdkd") == 0
    assert [r["skipped_updates"] for r in read_metrics(tmp_path / "hdkd")] == [0]


def test_a_diverging_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, ["train", *FAST, "--method", "ce", "--lr", "1e30", "--out", str(tmp_path / "run")],
                 "the training loss became", "lower --lr")


# --- item 7: the budgeted evaluation's q sweep is a choice of the run ---------------------------------------


def test_budget_protocol_of_a_run(ce_run: Path, tmp_path: Path) -> None:
    default = read_final(ce_run)["budget"]
    assert default["protocol"] == "imta" and default["q"] == [p / 20 for p in range(1, 41)]
    assert train(tmp_path / "msdnet", "--method", "ce", "--budget-protocol", "msdnet") == 0
    budget = read_final(tmp_path / "msdnet")["budget"]
    assert budget["protocol"] == "msdnet" and budget["q"] == [p / 20 for p in range(1, 40)]
    assert len(budget["accuracy"]) == len(budget["cost"]) == 39
    with pytest.raises(SystemExit):
        main(["train", *FAST, "--budget-protocol", "official", "--out", str(tmp_path / "bad")])


# --- item 8: dbt's loss scale is the authors' ---------------------------------------------------------------


class Exits(nn.Module):
    """K linear exits on the same input, float64."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.num_exits = k
        self.heads = nn.ModuleList(nn.Linear(6, 5).double() for _ in range(k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(x) for head in self.heads]


@pytest.mark.parametrize("k", [2, 4, 7])
def test_dbt_loss_has_the_authors_global_scale(k: int) -> None:
    """(2·5/K)·[½ Σ_k CE_k + ½ T² Σ_{k<K} KL(p_K ‖ p_k)], the loss of Phuong & Lampert's train_cifar.py
    (global_scale = 2.0 * 5 / n_exits, C = 0.5), against a float64 reference."""
    torch.manual_seed(k)
    model = Exits(k)
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(5, (9,))
    config = TrainConfig(method="dbt", dbt_schedule="constant", temperature=3.0, backend="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, logits = method_class("dbt")(model, optimizer, config, k, contextlib.nullcontext).loss(x, y)
    t = 3.0
    teacher = F.softmax(logits[-1].detach() / t, dim=1)
    kl = [(teacher * (teacher.log() - F.log_softmax(z / t, dim=1))).sum(dim=1).mean() for z in logits[:-1]]
    ce = [F.cross_entropy(z, y) for z in logits]
    expected = 2 * 5 / k * (0.5 * sum(ce) + 0.5 * t**2 * sum(kl))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


# --- items 9 and 11: every check before anything is written; batches of one are refused by name ------------

def test_an_unavailable_backend_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as outside the tests (conftest sets 1): Triton needs CUDA tensors
    expect_error(capsys, ["train", *FAST, "--method", "dkd", "--backend", "triton", "--out", str(tmp_path / "run")],
                 "backend 'triton' is not available for cpu tensors")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "pieces"), [
    (["--method", "erde", "--teacher", "<tmp>/nothing"], ["checkpoint", "nothing", "does not exist"]),
    (["--method", "hdkd", "--val-size", "1"], ["validation split has 1 image", "--val-size"]),
    (["--method", "hdkd", "--batch-size", "1"], ["batch_size must be >= 2", "got 1"]),
    (["--method", "ce", "--batch-size", "1"], ["batch_size must be >= 2", "got 1"]),
    (["--method", "ce", "--limit", "1"], ["training split has 1 image", "--limit"]),
], ids=["teacher", "hdkd-val-size-1", "hdkd-batch-1", "ce-batch-1", "limit-1"])
def test_a_run_that_cannot_start_writes_nothing(args: list[str], pieces: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.replace("<tmp>", str(tmp_path)) for a in args]
    expect_error(capsys, ["train", *FAST, "--out", str(tmp_path / "run"), *args], *pieces)
    assert not (tmp_path / "run").exists()


def test_an_unknown_model_is_refused_by_the_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model`` takes the registered names (hdkd_fast.models.zoo): argparse's one-line error, like ``--method``."""
    with pytest.raises(SystemExit) as exited:
        train(tmp_path / "run", "--model", "msdnet-huge")
    assert exited.value.code == 2
    assert "argument --model: invalid choice: 'msdnet-huge'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_a_bad_field_leaves_no_run(ce_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = load_checkpoint(ce_run)
    del state["num_classes"]
    bad = write_checkpoint(tmp_path / "bad", state)
    expect_error(capsys, ["train", *FAST, "--method", "erde", "--teacher", str(bad), "--out", str(tmp_path / "r")],
                 "'num_classes' is missing")
    assert not (tmp_path / "r").exists()


def test_hdkd_validation_batches_are_never_of_one(tmp_path: Path) -> None:
    """33 validation images and batches of 32: the partial batch (1 image, which BatchNorm cannot train on)
    is dropped like the training split's."""
    assert train(tmp_path / "run", "--method", "hdkd", "--val-size", "33") == 0


# --- item 10: the run directory and its files: one line naming the path and the cause ------------------------


def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("mine")
    expect_error(capsys, ["train", *FAST, "--out", str(tmp_path / "file")], str(tmp_path / "file"), "is a file")
    expect_error(capsys, ["train", *FAST, "--out", str(tmp_path / "file" / "run")],
                 str(tmp_path / "file" / "run"), f"lies under {str(tmp_path / 'file')!r}", "is a file")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_out_in_a_directory_without_write_permission(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    expect_error(capsys, ["train", *FAST, "--out", str(locked / "run")], str(locked), "permission denied")


def test_run_directory_that_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel answers where permissions or a read-only file system forbid the directory (simulated:
    this runs as root too, which may write anywhere)."""
    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def refused(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    expect_error(capsys, ["train", *FAST, "--method", "ce", "--out", str(out)],
                 f"cannot create the run directory {str(out)!r}: Permission denied")


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (ENOSPC on write)")


def full_disk_for(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The whole-or-nothing writes of the file ``name`` (``tempfile.mkstemp``, then a rename) get a temporary
    file opened on /dev/full, where every write fails with ENOSPC: the disk is full for that file only."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(prefix: str, suffix: str, dir: Path) -> tuple[int, str]:
        if prefix != f".{name}.":
            return real_mkstemp(prefix=prefix, suffix=suffix, dir=dir)
        path = Path(dir) / f"{prefix}full{suffix}"
        path.touch()
        return os.open("/dev/full", os.O_WRONLY), str(path)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@needs_dev_full
@pytest.mark.parametrize("name", ["config.json", CHECKPOINT])
def test_full_disk(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json (before training) and the checkpoint (inside torch.save) meet the kernel's ENOSPC: one
    line naming the file, the file not there, its temporary file removed."""
    out = tmp_path / "run"
    full_disk_for(monkeypatch, name)
    expect_error(capsys, ["train", *FAST, "--method", "ce", "--out", str(out)],
                 f"cannot write {str(out / name)!r}: No space left on device")
    assert not (out / name).exists()
    assert not list(out.glob(f".{name}.*"))


# --- item 12: --resume refuses the options it would ignore ------------------------------------------------


def test_resume_refuses_options_it_would_ignore(ce_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(ce_run, run)
    before = (run / CHECKPOINT).read_bytes()
    expect_error(capsys, ["train", "--resume", "--epochs", "3", "--lr", "0.5", "--method", "ce", "--out", str(run)],
                 "--resume", "takes only", "remove --lr, --method")
    expect_error(capsys, ["train", "--resume", "--out", str(run), "--lr", "0.1"], "remove --lr")  # even the default
    expect_error(capsys, ["train", "--resume", "--out", str(run), "--nesterov"], "remove --nesterov")
    assert (run / CHECKPOINT).read_bytes() == before
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress", "--device", "cpu",
                 "--workers", "0"]) == 0
    assert load_checkpoint(run)["epoch"] == 2


def test_resume_of_a_directory_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, ["train", "--resume", "--out", str(tmp_path), "--no-progress"],
                 str(tmp_path / CHECKPOINT), "does not exist")


# --- item 13: a new run starts clean; the leftovers of a killed checkpoint write are removed -----------------


def killed_during_first_checkpoint(finished: Path, run: Path) -> None:
    """What a kill during the first checkpoint write leaves: epoch 1 in metrics.jsonl, half a temporary file,
    no checkpoint (and here also the finished run's final.json)."""
    shutil.copytree(finished, run)
    data = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).unlink()
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(data[: len(data) // 2])


def test_a_new_run_after_a_killed_first_checkpoint_starts_clean(ce_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    killed_during_first_checkpoint(ce_run, run)
    capsys.readouterr()
    assert main(["train", *FAST, "--method", "ce", "--epochs", "2", "--out", str(run)]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert read_final(run)["epochs"] == 2
    assert not list(run.glob(".checkpoint.pt.*"))
    assert "removed 1 temporary file(s) of an interrupted checkpoint write" in capsys.readouterr().out


def test_resume_removes_leftover_temporary_files(ce_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(ce_run, run)
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (run / ".checkpoint.pt.old.tmp.keep").write_bytes(b"not ours")
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in run.glob(".checkpoint.pt.*")) == [".checkpoint.pt.old.tmp.keep"]
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]


def test_full_disk_inside_torch_save(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On a full tmpfs, torch.save's writer raises ``RuntimeError: [enforce fail at inline_container.cc:672] .
    unexpected pos ...`` while handling the write's ``OSError(28)`` (seen on a 64 KiB tmpfs); the cause is
    named, not the enforce message."""
    def full_disk_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        error.__context__ = OSError(28, "No space left on device")  # as torch raises it
        raise error

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk_save)
    out = tmp_path / "run"
    expect_error(capsys, ["train", *FAST, "--method", "ce", "--out", str(out)],
                 f"cannot write {str(out / CHECKPOINT)!r}: No space left on device")
    assert not list(out.glob(".checkpoint.pt.*"))
