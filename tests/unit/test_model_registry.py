"""The model registry (hdkd_fast.models.zoo): a toy model written in this one file plus one registration line
is a ``--model`` choice listed with its description in ``hdkd-fast train --help``, builds through
``build_model``, trains through ``hdkd-fast train``, and leaves no trace once unregistered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from hdkd_fast.cli import main
from hdkd_fast.models import (
    ModelSpec,
    PoolLinearHead,
    StagedMultiExit,
    build_model,
    model_names,
    register_model,
    registered_models,
    unregister_model,
)
from hdkd_fast.training.report import read_final

pytest.importorskip("sklearn")  # the embedded digits

NAME = "toycnn"
DESCRIPTION = "two convolutions with an exit after each (a test's toy)"


class TwoExitCNN(StagedMultiExit):
    """Two stages, a 3×3 convolution and a strided one, each followed by an exit head."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        ])
        self.heads = nn.ModuleList([PoolLinearHead(num_classes, 8), PoolLinearHead(num_classes, 16)])

    def stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return list(zip(self.blocks, self.heads, strict=True))


@pytest.fixture
def toy() -> Iterator[str]:
    register_model(ModelSpec(NAME, DESCRIPTION, lambda classes, shape: TwoExitCNN(classes, shape[0])))  # the one line
    yield NAME
    unregister_model(NAME)


def test_toy_model_is_a_choice_with_its_description(toy: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert model_names()[-1] == toy and registered_models()[toy].description == DESCRIPTION
    model = build_model(toy, 7, (3, 12, 12))
    assert isinstance(model, TwoExitCNN) and model.num_exits == 2
    capsys.readouterr()
    for command in ("train", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
        assert f"{toy}: {DESCRIPTION};" in help_text
        for spec in registered_models().values():  # every model, from the registry
            assert spec.name in help_text


def test_toy_model_trains(toy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    fast = ["--limit", "64", "--batch-size", "32", "--device", "cpu", "--no-progress", "--backend", "torch"]
    assert main(["train", "--model", toy, "--method", "dkd", "--epochs", "1", "--out", str(run), *fast]) == 0
    capsys.readouterr()
    assert json.loads((run / "config.json").read_text())["model"] == toy
    assert read_final(run)["num_exits"] == 2


def test_unregistered_model_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    assert NAME not in model_names()
    with pytest.raises(ValueError, match="model must be one of"):
        build_model(NAME, 10, (1, 8, 8))
    with pytest.raises(SystemExit) as exited:  # argparse's own one-line error
        main(["train", "--model", NAME, "--no-progress"])
    assert exited.value.code == 2
    assert f"argument --model: invalid choice: {NAME!r}" in capsys.readouterr().err


def test_registration_errors(toy: str) -> None:
    def build(classes: int, shape: tuple[int, int, int]) -> TwoExitCNN:
        return TwoExitCNN(classes, shape[0])

    with pytest.raises(ValueError, match=f"a model named {NAME!r} is already registered"):
        register_model(ModelSpec(NAME, DESCRIPTION, build))
    for bad_name in ("", "two words"):
        with pytest.raises(ValueError, match="non-empty string without whitespace"):
            register_model(ModelSpec(bad_name, DESCRIPTION, build))
    for bad_description in ("", "two\nlines"):
        with pytest.raises(ValueError, match="needs a one-line description"):
            register_model(ModelSpec("other", bad_description, build))
    with pytest.raises(TypeError, match="must be callable"):
        register_model(ModelSpec("other", DESCRIPTION, "TwoExitCNN"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="spec must be a ModelSpec"):
        register_model(NAME)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name must be one of"):
        unregister_model("no-such-model")
    assert model_names()[-1] == NAME  # nothing half-registered


def test_a_builder_must_return_a_multi_exit_model() -> None:
    register_model(ModelSpec("plain", "a plain linear layer", lambda classes, shape: nn.Linear(4, classes)))  # type: ignore[arg-type, return-value]
    try:
        with pytest.raises(TypeError, match="the builder of model 'plain' must return a MultiExitModule; got Linear"):
            build_model("plain", 10, (1, 8, 8))
    finally:
        unregister_model("plain")
