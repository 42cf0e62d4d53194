"""The training-method registry: a toy method written in this one file plus one registration line is a
``--method`` choice, passes ``TrainConfig.validate``, trains through ``hdkd-fast train`` with its hooks
honoured (validation batches, the exit criterion of the budgeted evaluation, a loss parameter in the
optimizer, state in the checkpoint), has its own option (declared in its ``Options`` here and nowhere else:
a flag in its own argument group of the CLI, checked by the config, recorded in ``config.json`` and the
checkpoint, kept by ``--resume``), and leaves no trace once unregistered.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hdkd_fast._validation import check_positive
from hdkd_fast.cli import main
from hdkd_fast.modules import DenseKD
from hdkd_fast.training import (
    METHODS,
    TrainConfig,
    TrainMethod,
    method_class,
    method_names,
    register_method,
    unregister_method,
)
from hdkd_fast.training.checkpoint import load_checkpoint
from hdkd_fast.training.methods import Batch, MethodOptions, option
from hdkd_fast.training.report import read_final, read_metrics
from tests.support.cli_helpers import expect_error

pytest.importorskip("sklearn")  # the embedded digits

NAME = "toy-scaled-ce"


class ScaledCrossEntropy(TrainMethod):
    """Σ_k CE_k times a learned scale e^s (a loss parameter), drawing one validation batch per step (only
    counted), and thresholding entropy at test time: every hook a method can use, in a few lines."""

    name = NAME
    uses_validation_batches = True
    exit_criterion = "entropy"

    @dataclasses.dataclass
    class Options(MethodOptions):
        toy_scale: float = option(1.0, "the loss scale e^s starts at this value", check=check_positive)

    options: Options

    def make_criterion(self) -> nn.Module:
        start = math.log(self.options.toy_scale)
        self.log_scale = nn.Parameter(torch.full((), start, device=self.device()))
        self.val_batches = 0
        no_pairs = torch.zeros(self.num_exits, self.num_exits, dtype=torch.bool)
        return DenseKD(self.num_exits, pairs=no_pairs, kd_weight=0.0, backend=self.config.backend)

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_scale]

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Any]:
        logits = self.model(x)
        return self.log_scale.exp() * self.criterion(logits, y), logits

    def step(self, x: Tensor, y: Tensor, next_val: Callable[[], Batch]) -> tuple[float, Any]:
        x_val, _ = next_val()
        assert x_val.shape[1:] == x.shape[1:]
        self.val_batches += 1
        return super().step(x, y, next_val)

    def log_values(self) -> dict[str, Any]:
        return {"toy/val_batches": self.val_batches, "toy/log_scale": float(self.log_scale.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"val_batches": self.val_batches, "log_scale": self.log_scale.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.val_batches = int(state["val_batches"])
        with torch.no_grad():
            self.log_scale.copy_(state["log_scale"])


@pytest.fixture
def toy() -> Iterator[str]:
    register_method(ScaledCrossEntropy)  # the one registration line
    yield NAME
    unregister_method(NAME)


def test_toy_method_is_a_choice_everywhere(toy: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert method_names()[-1] == toy and METHODS[toy] is ScaledCrossEntropy
    assert method_class(toy) is ScaledCrossEntropy
    TrainConfig(method=toy).validate()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert toy in capsys.readouterr().out


FAST = ["--limit", "64", "--batch-size", "32", "--device", "cpu", "--no-progress", "--backend", "torch"]


def test_toy_method_trains_and_resumes(toy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", toy, "--toy-scale", "2", "--out", str(run), "--epochs", "1", *FAST]) == 0
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    first, second = read_metrics(run)
    assert first["toy/val_batches"] == 2 and second["toy/val_batches"] == 4  # restored, then 2 more steps
    assert first["toy/log_scale"] != math.log(2.0)  # the loss parameter is in the model's optimizer
    state = load_checkpoint(run)
    assert state["method"]["log_scale"] == pytest.approx(second["toy/log_scale"])
    assert len(state["optimizer"]["param_groups"]) == 2
    assert read_final(run)["budget"]["criterion"] == "entropy"
    stored = json.loads((run / "config.json").read_text())
    assert (stored["method"], stored["method_options"]) == (toy, {"toy_scale": 2.0})
    assert state["config"]["method_options"] == {"toy_scale": 2.0}  # what --resume continued with


def test_toy_method_option_is_declared_once(toy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 24 item 2: the option in the toy's ``Options`` (this file) is a flag of the method's own argument
    group, a keyword of ``TrainConfig``, checked by ``validate`` with an error naming it, and refused with
    another method."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    group = capsys.readouterr().out.split(f"--method {toy}:")[1]
    assert "--toy-scale TOY_SCALE" in group and "the loss scale e^s starts at this value" in group
    assert TrainConfig(method=toy, toy_scale=0.5).validate().options == ScaledCrossEntropy.Options(0.5)
    assert TrainConfig(method=toy).options.toy_scale == 1.0
    with pytest.raises(ValueError, match=r"^toy_scale must be finite and > 0; got -1"):
        TrainConfig(method=toy, toy_scale=-1.0).validate()
    out = ["--out", str(tmp_path / "run"), "--epochs", "1", *FAST]
    expect_error(capsys, ["train", "--method", toy, "--toy-scale", "-1", *out], "toy_scale must be finite and > 0")
    expect_error(capsys, ["train", "--method", "ce", "--toy-scale", "2", *out],
                 f"--toy-scale is only used by method {toy!r}, not 'ce'")
    with pytest.raises(ValueError, match=f"--toy-scale is only used by method {toy!r}, not 'ce'"):
        TrainConfig(method="ce", toy_scale=2.0)
    assert not (tmp_path / "run").exists()


def test_unregistered_method_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    assert NAME not in method_names()
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method=NAME).validate()
    with pytest.raises(SystemExit) as exited:  # argparse's own one-line error
        main(["train", "--method", NAME, "--no-progress"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--toy-scale" not in capsys.readouterr().out


def test_registration_errors(toy: str) -> None:
    with pytest.raises(ValueError, match=f"named {NAME!r} is already registered"):
        register_method(ScaledCrossEntropy)
    with pytest.raises(TypeError, match="cls must be a TrainMethod subclass"):
        register_method(int)  # type: ignore[type-var]

    class Nameless(TrainMethod):
        pass

    with pytest.raises(TypeError, match=r"Nameless\.name must be a non-empty string"):
        register_method(Nameless)
    with pytest.raises(ValueError, match="name must be one of"):
        unregister_method("no-such-method")

    class Clash(TrainMethod):
        name = "clash"

        @dataclasses.dataclass
        class Options(MethodOptions):
            toy_scale: float = option(2.0, "another meaning")

    with pytest.raises(ValueError, match=f"method {NAME!r} has an option of that name already"):
        register_method(Clash)

    class Undocumented(TrainMethod):
        name = "undocumented"

        @dataclasses.dataclass
        class Options(MethodOptions):
            strength: float = 1.0

    with pytest.raises(TypeError, match=r"Undocumented\.Options\.strength needs a help text"):
        register_method(Undocumented)
    assert "clash" not in method_names() and "undocumented" not in method_names()


def test_teacher_rule_follows_the_class_attribute() -> None:
    with pytest.raises(ValueError, match="method 'erde' needs --teacher"):
        TrainConfig(method="erde").validate()
    with pytest.raises(ValueError, match="--teacher is only used by method 'erde', not 'ce'"):
        TrainConfig(method="ce", teacher="somewhere").validate()
    model = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="method 'ce' takes no teacher model"):
        method_class("ce")(model, optimizer, TrainConfig(method="ce"), 1, torch.no_grad, teacher=model)
