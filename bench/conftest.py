"""Benchmark options: the quick CPU grid by default, ``--full`` for the whole grid (GPU)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the full benchmark grid (meant for a GPU)")


@pytest.fixture(scope="session")
def full_grid(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases marked ``full`` run only with ``--full``; the rest form the quick default."""
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full grid only (pytest bench/ --full)")
    for item in items:
        if item.get_closest_marker("full") is not None:
            item.add_marker(skip)
