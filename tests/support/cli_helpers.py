"""Helpers shared by the CLI tests (imported directly, like float64_reference)."""

from __future__ import annotations

import pytest

from hdkd_fast.cli import main


def expect_error(capsys: pytest.CaptureFixture[str], argv: list[str], *pieces: str) -> str:
    """``main(argv)`` returns 2 and prints one line on stderr holding every piece; returns it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"hdkd-fast {argv[0]}: error: "), err
    for piece in pieces:
        assert piece in err, (piece, err)
    return err
