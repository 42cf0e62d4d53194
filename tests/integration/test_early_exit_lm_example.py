"""The early-exit LM example (examples/early_exit_lm.py) runs end to end at its tiny size."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORTUNES = Path("/usr/share/games/fortunes")


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="needs tokenizers (hdkd_fast[lm])")
@pytest.mark.skipif(not FORTUNES.is_dir(), reason="needs the fortunes data: apt-get install -y fortunes")
def test_early_exit_lm_tiny(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "early_exit_lm.py"), "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    for method in ("ce", "dense_kd", "hdkd"):
        assert f"{method}  eval perplexity per exit" in run.stdout
    assert "learned weights" in run.stdout
    assert out.stat().st_size > 1000


def test_early_exit_lm_names_the_missing_data(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "early_exit_lm.py"), "--data", str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2
    assert "apt-get install -y fortunes" in run.stderr or "pip install 'hdkd_fast[lm]'" in run.stderr
