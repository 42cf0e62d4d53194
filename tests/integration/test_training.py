"""Training runs (issue 7): bit-exact ``--resume``, atomic checkpoints, ``metrics.jsonl`` on resume, 2-process
gloo DDP runs, ``TrainConfig`` validation and ``load_teacher``'s checks.

Every run trains on the embedded digits (scikit-learn), a few hundred images, one or two epochs on the CPU.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hdkd_fast.cli import main
from hdkd_fast.training import TrainConfig, loop, method_class, train
from hdkd_fast.training import checkpoint as checkpoint_module
from hdkd_fast.training.checkpoint import CHECKPOINT, load_checkpoint, load_teacher
from hdkd_fast.training.context import run_data
from hdkd_fast.training.methods import option_owners
from hdkd_fast.training.report import read_final, read_metrics

pytest.importorskip("sklearn")  # the embedded digits

FAST = ["--limit", "96", "--batch-size", "32", "--device", "cpu", "--no-progress"]
WORLD = 2


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Bit-exact comparisons: one intra-op thread (the reduction order of a multi-threaded CPU kernel may vary)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli_train(*args: str | Path) -> None:
    assert main(["train", *map(str, args)]) == 0


def quiet(_: str) -> None:
    pass


# --- comparisons --------------------------------------------------------------------------------------------


def assert_identical(a: Any, b: Any, where: str = "", skip: tuple[str, ...] = ()) -> None:
    """``a`` and ``b`` hold the same values: every tensor ``torch.equal`` (and of the same dtype), every other
    leaf ``==``; keys whose path is in ``skip`` are not compared."""
    if where in skip:
        return
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys() ^ b.keys())
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}", skip)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{n}]", skip)
    else:
        assert a == b, (where, a, b)


def assert_same_runs(a: Path, b: Path) -> None:
    """Two run directories that must hold the same run: checkpoints, metrics and final.json alike except times."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["epoch"] == cb["epoch"] == 2
    assert_identical(ca, cb, skip=("/time_s", "/config/out"))
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["epoch"] for r in ma] == [r["epoch"] for r in mb] == [1, 2]
    for ra, rb in zip(ma, mb, strict=True):
        assert {k: v for k, v in ra.items() if k != "time_s"} == {k: v for k, v in rb.items() if k != "time_s"}
    fa, fb = read_final(a), read_final(b)
    assert fa["test/top1"] == fb["test/top1"]
    assert {k: v for k, v in fa.items() if k != "train_time_s"} == {k: v for k, v in fb.items() if k != "train_time_s"}


# --- resume -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--method", "hdkd"],
    ["--method", "hdkd", "--validation", "balanced"],
    ["--method", "hdkd", "--update-every", "2"],  # validation batches drawn on update steps only, across the resume
    ["--method", "dbt"],
    ["--method", "dkd-uncertainty"],
    ["--method", "hdkd", "--label-noise", "0.4", "--label-noise-validation"],
    # epoch 1 (3 steps) at the starting weights, updates from the resumed epoch 2 on
    ["--method", "hdkd", "--weight-warmup-steps", "3", "--weight-parameterization", "bounded"],
], ids=["hdkd", "hdkd-balanced", "hdkd-every-2", "dbt", "dkd-uncertainty", "hdkd-label-noise", "hdkd-warmup-bounded"])
def test_two_epochs_equal_one_plus_resumed_one(args: list[str], tmp_path: Path, one_thread: None) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    cli_train(*FAST, *args, "--epochs", "2", "--out", a)
    cli_train(*FAST, *args, "--epochs", "1", "--out", b)
    cli_train("--resume", "--out", b, "--epochs", "2", "--no-progress")  # extends the run by one epoch
    assert_same_runs(a, b)
    state = load_checkpoint(b)["method"]
    if args[1] == "hdkd":  # φ moved, and its Adam state is kept
        phi = state["weights"]["phi"]
        assert not torch.equal(phi, torch.zeros_like(phi))
        assert state["weight_optimizer"]["state"]
        assert (state["val_ema"] is not None) == ("balanced" in args)
    elif args[1] == "dbt":
        assert state["schedule"] is not None and state["temperature"] >= 1.0
    else:  # α is trained by the model's optimizer: its momentum is in the optimizer state
        alpha = state["criterion"]["weighting.alpha"]
        assert not torch.equal(alpha, torch.zeros_like(alpha))


def test_hdkd_with_fixed_weights_trains(tmp_path: Path, one_thread: None) -> None:
    """``--weight-parameterization fixed`` (no weight parameters, so no weight optimizer) trains and keeps
    its starting weights."""
    cli_train(*FAST, "--method", "hdkd", "--weight-parameterization", "fixed", "--epochs", "1", "--out", tmp_path)
    state = load_checkpoint(tmp_path)["method"]
    assert state["weight_optimizer"] is None and "phi" not in state["weights"]
    weights = read_metrics(tmp_path)[-1]["weights/ce"]
    assert weights == [1.0] * len(weights)


class Stop(Exception):
    """Stands for a crash right after a checkpoint."""


def stop_after_epoch_1(message: str) -> None:
    if message.startswith("epoch 1/"):
        raise Stop


def test_interrupted_cosine_run_resumes_bit_exact(tmp_path: Path, one_thread: None) -> None:
    config = TrainConfig(method="ce", limit=96, epochs=2, batch_size=32, device="cpu", progress=False,
                         schedule="cosine")
    train(dataclasses.replace(config, out=str(tmp_path / "A")), log=quiet)
    with pytest.raises(Stop):
        train(dataclasses.replace(config, out=str(tmp_path / "B")), log=stop_after_epoch_1)
    assert not (tmp_path / "B" / "final.json").exists()
    train(TrainConfig(out=str(tmp_path / "B"), progress=False), resume=True, log=quiet)  # the stored 2 epochs
    assert_same_runs(tmp_path / "A", tmp_path / "B")
    assert read_metrics(tmp_path / "B")[0]["lr"] == pytest.approx(0.05)  # cosine over the 2 epochs


def test_extending_a_run_moves_the_multistep_milestones(tmp_path: Path, one_thread: None) -> None:
    """``--resume --epochs 8`` of a finished 2-epoch run: from there on the lr is the one of an 8-epoch run
    (milestones 4 and 6), not the 2-epoch run's (milestones 1 and 2, both passed)."""
    run = tmp_path / "run"
    cli_train(*FAST, "--method", "ce", "--epochs", "2", "--out", run)
    cli_train("--resume", "--out", run, "--epochs", "8", "--no-progress")
    lrs = [r["lr"] for r in read_metrics(run)]  # the lr after each epoch: that of the next one
    assert lrs[:2] == pytest.approx([0.01, 0.001])  # the 2-epoch run's records are kept
    assert lrs[2:] == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001, 0.001])  # those of an 8-epoch run
    assert load_checkpoint(run)["scheduler"]["milestones"] == {4: 1, 6: 1}


def test_resume_needs_as_many_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    cli_train(*FAST, "--method", "ce", "--epochs", "1", "--out", run)
    state = load_checkpoint(run)
    state["rng"] = state["rng"] * 2  # as if written by 2 processes
    torch.save(state, run / CHECKPOINT)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 2
    assert "written by 2 processes; resume it with as many (this run has 1)" in capsys.readouterr().err


# --- checkpoints and metrics --------------------------------------------------------------------------------


def test_checkpoint_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    run = tmp_path / "run"
    real_save = torch.save
    calls: list[bytes] = []

    def crashing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append((run / CHECKPOINT).read_bytes() if calls else b"")
        if len(calls) < 2:
            real_save(obj, f, *args, **kwargs)
            return
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of the file is written, then:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    config = TrainConfig(method="dkd", limit=96, epochs=2, batch_size=32, device="cpu", progress=False,
                         out=str(run))
    with pytest.raises(OSError, match="No space left on device"):
        train(config, log=quiet)
    monkeypatch.undo()
    assert len(calls) == 2
    assert (run / CHECKPOINT).read_bytes() == calls[1]  # the epoch-1 checkpoint, untouched
    assert load_checkpoint(run)["epoch"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]  # epoch 2 was logged before its checkpoint failed

    cli_train("--resume", "--out", run, "--no-progress")  # reruns epoch 2 from the epoch-1 checkpoint
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert load_checkpoint(run)["epoch"] == 2 and read_final(run)["epochs"] == 2


def test_resume_truncates_metrics_of_lost_epochs(tmp_path: Path, one_thread: None) -> None:
    run = tmp_path / "run"
    cli_train(*FAST, "--method", "ce", "--epochs", "2", "--out", run)
    fake = {**read_metrics(run)[-1], "epoch": 3, "fake": True}  # logged by a crash before its checkpoint
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(fake) + "\n")
        fh.write(json.dumps(fake)[:25])  # and a line cut off by the crash
    cli_train("--resume", "--out", run, "--epochs", "3", "--no-progress")
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert "fake" not in records[2]


def test_resume_with_fewer_epochs_than_trained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    cli_train(*FAST, "--method", "ce", "--epochs", "2", "--out", run)
    config = (run / "config.json").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "1", "--no-progress"]) == 2
    assert "--epochs 1 is below the 2 epochs the checkpoint" in capsys.readouterr().err
    assert (run / "config.json").read_text() == config and read_final(run)["epochs"] == 2  # untouched


# --- DDP on gloo --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_gloo_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "hdkd_fast", "train", "--method", "hdkd", "--limit", "128", "--epochs", "1", "--batch-size",
               "32", "--device", "cpu", "--no-progress", "--out", "ddp"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "ddp"
    final = read_final(run)
    assert final["method"] == "hdkd" and final["num_test"] == 128
    records = read_metrics(run)
    assert len(records) == 1 and records[0]["step"] == 128 // (32 * WORLD)  # each rank takes half the batches
    state = load_checkpoint(run)
    assert len(state["rng"]) == WORLD  # every rank's random-number state
    assert not torch.equal(state["rng"][0]["data"], state["rng"][1]["data"])
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 2
    assert "written by 2 processes" in capsys.readouterr().err


def _uncertainty_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        methods: list[Any] = []
        first_labels: list[torch.Tensor] = []
        make_method = loop._method

        def spy(*args: Any, **kwargs: Any) -> Any:  # keep this rank's method, and the labels it trains on
            method = make_method(*args, **kwargs)
            step = method.step

            def spied_step(x: torch.Tensor, y: torch.Tensor, next_val: Any) -> Any:
                first_labels.append(y.clone())
                return step(x, y, next_val)

            method.step = spied_step
            methods.append(method)
            return method

        loop._method = spy  # this process only
        train(TrainConfig(method="dkd-uncertainty", limit=128, epochs=1, batch_size=32, device="cpu",
                          progress=False, out=str(Path(out_dir) / "run")), log=quiet)
        (method,) = methods
        torch.save({"alpha": method.criterion.alpha.detach().clone(), "model": method.module.state_dict(),
                    "labels": first_labels[0]}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_uncertainty_alpha_identical_across_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(_uncertainty_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert not torch.equal(r0["labels"], r1["labels"])  # the ranks train on different shards
    assert not torch.equal(r0["alpha"], torch.zeros_like(r0["alpha"]))  # α moved
    assert torch.equal(r0["alpha"], r1["alpha"])  # its gradient was averaged like the model's
    saved = load_checkpoint(tmp_path / "run")["method"]["criterion"]["weighting.alpha"]
    assert torch.equal(saved, r0["alpha"])
    for name in r0["model"]:
        if "running" not in name and "num_batches" not in name:  # BatchNorm statistics are per rank
            assert torch.equal(r0["model"][name], r1["model"][name]), name


# --- TrainConfig and load_teacher ---------------------------------------------------------------------------

BAD_FIELDS: dict[str, Any] = {
    "method": "nope",
    "schedule": "linear",
    "amp": "fp16",
    "device": "tpu",
    "hypergrad": "implicit",
    "validation": "accuracy",
    "dbt_schedule": "linear",
    "batch_size": 0,
    "update_every": 1.5,
    "epochs": 0,
    "limit": -3,
    "workers": -1,
    "lr": 0.0,
    "temperature": float("nan"),
    "weight_lr": -1e-3,
    "momentum": -0.1,
    "weight_decay": float("inf"),
    "feature_weight": -1.0,
    "entropy_weight": True,
    "uncertainty_lambda": "1",
    "gamma": 1.5,
    "milestones": (0.75, 0.5),
    "val_size": -5,
}


@pytest.mark.parametrize(("name", "value"), list(BAD_FIELDS.items()), ids=list(BAD_FIELDS))
def test_config_rejects_a_bad_field(name: str, value: Any) -> None:
    """A shared setting, or an option of the method that owns it (``TrainConfig(method=owner)``)."""
    owners = option_owners(name)
    with pytest.raises((ValueError, TypeError), match=rf"^{name} must"):
        config = TrainConfig(method=owners[0]) if owners else TrainConfig()
        dataclasses.replace(config, **{name: value}).validate()


def test_config_rejects_bad_combinations() -> None:
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        TrainConfig(nesterov=True, momentum=0.0).validate()
    with pytest.raises(ValueError, match="method 'erde' needs --teacher"):
        TrainConfig(method="erde").validate()
    with pytest.raises(ValueError, match="--teacher is only used by method 'erde', not 'hdkd'"):
        TrainConfig(teacher="run").validate()
    with pytest.raises(ValueError, match="--update-every is only used by method 'hdkd', not 'dbt'"):
        TrainConfig(method="dbt", update_every=2)
    with pytest.raises(TypeError, match="unknown setting 'bogus'"):
        TrainConfig(bogus=1)
    with pytest.raises(ValueError, match=r"milestones must be .* in \(0, 1\)"):
        TrainConfig(milestones=(0.5, 1.0)).validate()
    for p in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"^label_noise \(--label-noise\) must be a probability in \[0, 1\)"):
            TrainConfig(label_noise=p).validate()
    with pytest.raises(ValueError, match=r"--label-noise-validation.* needs label_noise"):
        TrainConfig(label_noise_validation=True).validate()


def test_label_noise_is_recorded_and_trained_on(tmp_path: Path, one_thread: None) -> None:
    """Issue 23 item 3: --label-noise is a setting of the run (config.json, the checkpoint); the run trains on
    noisy training labels, validates on clean ones (unless asked) and tests on clean ones."""
    run = tmp_path / "noisy"
    cli_train(*FAST, "--method", "ce", "--epochs", "1", "--label-noise", "0.5", "--out", run)
    stored = json.loads((run / "config.json").read_text())
    assert (stored["label_noise"], stored["label_noise_validation"]) == (0.5, False)
    assert load_checkpoint(run)["config"]["label_noise"] == 0.5
    config = TrainConfig.from_json(stored)
    noisy, clean = run_data(config), run_data(dataclasses.replace(config, label_noise=0.0))
    assert (noisy.train.labels != clean.train.labels).any()
    assert torch.equal(noisy.val.labels, clean.val.labels) and torch.equal(noisy.test.labels, clean.test.labels)
    both = run_data(dataclasses.replace(config, label_noise_validation=True))
    assert torch.equal(both.train.labels, noisy.train.labels) and (both.val.labels != clean.val.labels).any()


def test_config_json_round_trip() -> None:
    config = TrainConfig(method="erde", teacher="runs/ce", dataset="cifar10", data_dir="/data", epochs=7,
                         milestones=(0.25, 0.5, 0.9), val_size=0.2, limit=100, channels_last=False,
                         gradient_equilibrium=True, extra={"note": [1, 2]}).validate()
    data = json.loads(json.dumps(config.to_json()))
    assert data["method_options"] == {"teacher": "runs/ce", "entropy_weight": 1.0} and "teacher" not in data
    assert TrainConfig.from_json(data) == config
    assert TrainConfig.from_json(TrainConfig().to_json()) == TrainConfig()
    with pytest.raises(ValueError, match=r"unknown config keys \['bogus'\]"):
        TrainConfig.from_json({**data, "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown method_options \['update_every'\] of method 'erde'"):
        TrainConfig.from_json({**data, "method_options": {"update_every": 2}})
    with pytest.raises(ValueError, match="resolved\\(\\) needs the dataset name"):
        TrainConfig().resolved()
    assert TrainConfig(dataset="digits").resolved().epochs == 12
    assert TrainConfig(dataset="cifar10").resolved().model == "msdnet"


def test_config_options_belong_to_the_method() -> None:
    """Issue 24 item 2: the method's options are an instance of its ``Options``; keywords fill them, the
    method is switched by ``for_method``, and the flat ``config.json`` of earlier versions is still read."""
    config = TrainConfig(method="hdkd", update_every=3, epochs=2)
    assert config.options == method_class("hdkd").Options(update_every=3)
    assert dataclasses.replace(config, weight_lr=0.5).options.weight_lr == 0.5
    assert TrainConfig(method="hdkd", options=config.options, hypergrad="fd").options.update_every == 3
    dbt = config.for_method("dbt")
    assert (dbt.method, dbt.epochs, dbt.options) == ("dbt", 2, method_class("dbt").Options())
    assert dbt.for_method("hdkd").options == method_class("hdkd").Options()  # the defaults, not config's
    with pytest.raises(TypeError, match="options must be the Options of method 'dbt'"):
        dataclasses.replace(config, method="dbt")
    assert config.settings()["update_every"] == 3 and config.settings()["epochs"] == 2
    flat = {key: value for key, value in config.to_json().items() if key != "method_options"}
    flat.update(hypergrad="auto", weight_lr=0.01, weight_parameterization="per_exit", step_length="free",
                update_every=3, validation="ce", dbt_schedule="constant", feature_weight=1.0, teacher=None,
                entropy_weight=1.0, uncertainty_lambda=2.0)  # every method's options, as written before
    assert TrainConfig.from_json(flat) == config
    assert TrainConfig.from_json({**flat, "method": "dbt"}).options.dbt_schedule == "constant"


def test_a_checkpoint_of_the_flat_layout_resumes(tmp_path: Path, one_thread: None) -> None:
    """A checkpoint written before method options (every method's options beside the shared settings) is
    resumed with its method's options; the run's files are then of the current layout."""
    run = tmp_path / "run"
    cli_train(*FAST, "--method", "dbt", "--dbt-schedule", "constant", "--epochs", "1", "--out", run)
    state = torch.load(run / CHECKPOINT, weights_only=True)
    options = state["config"].pop("method_options")
    state["config"].update(options, update_every=16, teacher=None, feature_weight=1.0)
    torch.save(state, run / CHECKPOINT)
    assert load_checkpoint(run)["config"]["dbt_schedule"] == "constant"
    cli_train("--resume", "--out", run, "--epochs", "2", "--no-progress")
    assert json.loads((run / "config.json").read_text())["method_options"] == {"dbt_schedule": "constant"}
    assert [r["temperature"] for r in read_metrics(run)] == [4.0, 4.0]  # constant: --temperature


def test_load_teacher(tmp_path: Path, one_thread: None) -> None:
    run = tmp_path / "teacher"
    cli_train(*FAST, "--method", "ce", "--epochs", "1", "--gradient-equilibrium", "--out", run)
    teacher = load_teacher(str(run), 10, (1, 8, 8))  # the GradientEquilibrium wrapper's prefix is removed
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.num_exits == read_final(run)["num_exits"]
    with pytest.raises(ValueError, match="predicts 10 classes but the data has 100"):
        load_teacher(str(run), 100)
    with pytest.raises(ValueError, match=r"takes images of shape \(1, 8, 8\) but the data's are \(3, 32, 32\)"):
        load_teacher(str(run / CHECKPOINT), 10, (3, 32, 32))
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher(str(tmp_path / "nothing"), 10)
