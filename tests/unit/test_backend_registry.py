"""The backend registry: a toy backend added in this one file plus one registration line reaches
``"auto"``, ``available_backends``, the fused op, the training CLI and ``hdkd-fast info``.

This module is the toy backend: it implements :class:`hdkd_fast.backends.Backend` with module-level
functions that delegate to the ``"torch"`` backend and count their calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import hdkd_fast as hk
from hdkd_fast import backends
from hdkd_fast.backends import BackendSpec, register_backend, torch_backend, unregister_backend
from hdkd_fast.cli import main
from hdkd_fast.info import collect, format_info

NAME = "toy"
calls: list[str] = []


def unavailable_reason(device: torch.device) -> str | None:
    return None if device.type == "cpu" else "the toy backend runs on CPU tensors only"


def losses_and_grad(*args, **kwargs):  # type: ignore[no-untyped-def]
    calls.append("losses_and_grad")
    return torch_backend.losses_and_grad(*args, **kwargs)


def jvp(*args, **kwargs):  # type: ignore[no-untyped-def]
    calls.append("jvp")
    return torch_backend.jvp(*args, **kwargs)


@pytest.fixture
def toy() -> Iterator[str]:
    """The toy backend registered, first in ``"auto"``'s order on the CPU, for one test."""
    register_backend(BackendSpec(NAME, __name__, {"cpu": 100}))  # the one registration line
    calls.clear()
    yield NAME
    unregister_backend(NAME)


def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(4, 6, 11, generator=g, dtype=torch.float64), torch.randint(0, 11, (6,), generator=g)


def test_toy_backend_is_listed_and_picked_by_auto(toy: str) -> None:
    assert backends.backend_names()[-1] == toy
    assert backends.backend_choices() == ("auto", *backends.backend_names())
    assert hk.available_backends("cpu")[0] == toy
    assert toy in backends.runnable_backends("cpu")
    assert toy not in hk.available_backends("meta")  # no priority there
    z, y = draw(0)
    x = z.clone().requires_grad_()
    loss = hk.dense_kd(x, y, temperature=2.5)  # backend="auto"
    loss.backward()
    assert calls == ["losses_and_grad"]
    x_ref = z.clone().requires_grad_()
    ref = hk.dense_kd(x_ref, y, temperature=2.5, backend="torch")
    ref.backward()
    assert_close(loss, ref, rtol=0, atol=0)
    assert x.grad is not None and x_ref.grad is not None
    assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda v: hk.dense_kd_losses(v, y, backend=toy).kd, (z,), (dz,))
    assert "jvp" in calls
    assert torch.isfinite(tangent).all() and tangent.abs().sum() > 0


def test_toy_backend_in_the_cli_and_info(toy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "--limit", "96", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress",
            "--method", "dkd", "--backend", toy, "--out", str(out)]
    assert main(argv) == 0
    assert "losses_and_grad" in calls  # the run's dense KD went through the toy backend
    assert (out / "checkpoint.pt").exists()
    info = collect()["backends"]["cpu"]
    assert info["available"][0] == toy
    assert f"[auto -> {toy}" in format_info(collect())


def test_toy_backend_unavailable_on_cuda_names_the_reason(toy: str) -> None:
    assert backends.unavailable_reason(toy, "cuda") == "the toy backend runs on CPU tensors only"
    with pytest.raises(RuntimeError, match="backend 'toy' is not available for cuda tensors: the toy backend"):
        backends.resolve_backend(toy, torch.device("cuda"))


def test_registration_errors(toy: str) -> None:
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_backend(BackendSpec(NAME, __name__))
    with pytest.raises(ValueError, match="not 'auto'"):
        register_backend(BackendSpec("auto", __name__))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        backends.unavailable_reason("nope")


def test_a_backend_whose_module_is_missing_is_unavailable() -> None:
    register_backend(BackendSpec("ghost", "hdkd_fast.backends.no_such_backend", {"cpu": 100}))
    try:
        assert backends.unavailable_reason("ghost", "cpu") == "this installation has no ghost backend"
        assert "ghost" not in hk.available_backends("cpu")
        with pytest.raises(RuntimeError, match="backend 'ghost' is not available for cpu tensors"):
            hk.dense_kd(*draw(2), backend="ghost")
    finally:
        unregister_backend("ghost")
    assert "ghost" not in backends.backend_names()


def test_the_built_in_order() -> None:
    """``"auto"``'s order per device type, from the records' priorities."""
    assert backends.auto_order("cuda") == ["triton", "native", "torch"]
    assert backends.auto_order("cpu") == ["native", "torch"]
    assert backends.auto_order("meta") == ["torch"]
