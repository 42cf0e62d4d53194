"""Benchmark options: the quick grid by default, ``--full`` for the whole grid (GPU), ``--tiny`` for the
dry run of scripts/gpu_check.sh (CPU, tiny shapes), ``--budget-s`` to stop starting benchmarks after that
many seconds (the rest are skipped, so a time-limited GPU run still writes its JSON).

Test modules may define ``priority(item) -> tuple``: their benchmarks then run in that order (stable),
so a budget cuts the least important ones."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the full benchmark grid (meant for a GPU)")
    parser.addoption("--tiny", action="store_true", help="tiny shapes and few rounds (the dry run of gpu_check.sh)")
    parser.addoption("--budget-s", type=float, default=None,
                     help="start no benchmark after this many seconds (the rest are skipped)")


def pytest_configure(config: pytest.Config) -> None:
    budget = config.getoption("--budget-s", default=None)
    config._bench_deadline = time.monotonic() + budget if budget is not None else math.inf  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def full_grid(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full"))


@pytest.fixture(scope="session")
def tiny_grid(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--tiny"))


@pytest.fixture(scope="session")
def time_left(request: pytest.FixtureRequest) -> Callable[[], float]:
    """Seconds left of ``--budget-s`` (``inf`` without a budget)."""
    deadline = request.config._bench_deadline  # type: ignore[attr-defined]
    return lambda: deadline - time.monotonic()


@pytest.fixture(autouse=True)
def _within_budget(time_left: Callable[[], float], request: pytest.FixtureRequest) -> None:
    if time_left() <= 0:
        pytest.skip(f"bench budget of {request.config.getoption('--budget-s'):g} s spent")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases marked ``full`` run only with ``--full`` or ``--tiny``; the rest form the quick default.
    Then each module's ``priority`` orders its items."""
    if not (config.getoption("--full") or config.getoption("--tiny")):
        skip = pytest.mark.skip(reason="full grid only (pytest bench/ --full)")
        for item in items:
            if item.get_closest_marker("full") is not None:
                item.add_marker(skip)
    modules: dict[object, int] = {}
    for item in items:
        modules.setdefault(item.module, len(modules))  # type: ignore[attr-defined]

    def key(pair: tuple[int, pytest.Item]) -> tuple[object, ...]:
        index, item = pair
        module = item.module  # type: ignore[attr-defined]
        priority = getattr(module, "priority", None)
        return (modules[module], *(priority(item) if priority is not None else ()), index)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]
