"""``pip install .`` as a new user runs it: a fresh virtual environment, pip's isolated build (no torch
there, so no compiled extension in the wheel), then the build of ``hdkd_fast._C`` on first use.

One slow test (a few minutes: it installs torch into a new venv and compiles the kernels once):

- two processes started at the same moment with an empty cache build once (one "compiling" line, the
  other waits) and both end up on the ``native`` backend;
- a third process reuses the cache (no build message) and ``hdkd-fast info`` says where the build is;
- a compiler that fails: a warning with the compiler's last lines, ``auto`` falls back to ``torch``
  (same losses), a later process warns from the recorded failure without compiling again, and
  ``HDKD_FAST_REQUIRE_EXT=1`` turns it into an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
USE = (
    "import torch, hdkd_fast as hk\n"
    "g = torch.Generator().manual_seed(0)\n"
    "x = torch.randn(4, 64, 100, generator=g, requires_grad=True)\n"
    "loss = hk.dense_kd(x, torch.randint(100, (64,), generator=g))\n"
    "loss.backward()\n"
    "print(hk.available_backends('cpu'), repr(loss.item()))\n"
)
COMPILING = "hdkd_fast: compiling hdkd_fast's native kernels for "

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32" or shutil.which("git") is None or not (REPO / ".git").exists(),
                       reason="needs a POSIX git checkout"),
]


def _copy_checkout(dest: Path) -> None:
    """The files a clone would have (tracked, plus new files not ignored): no build outputs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_pip_install_builds_the_kernels_on_first_use_once(tmp_path: Path) -> None:
    src, venv, cache = tmp_path / "src", tmp_path / "venv", tmp_path / "cache"
    _copy_checkout(src)
    _run([sys.executable, "-m", "venv", str(venv)]).check_returncode()
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDKD_FAST_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(HDKD_FAST_CACHE_DIR=str(cache), PIP_DISABLE_PIP_VERSION_CHECK="1")
    torch_req = f"torch=={torch.__version__.split('+')[0]}"
    for args in ([torch_req], [str(src)]):  # pip's default: an isolated build environment without torch
        proc = _run([python, "-m", "pip", "install", "-q", *args], env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    use = [python, "-W", "ignore::UserWarning", "-c", USE]  # (torch warns that numpy is missing)

    # Two processes at the same moment: one builds, the other waits for it.
    first = [subprocess.Popen(use, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in first]
    assert all(p.returncode == 0 for p in first), [err[-3000:] for _, err in outs]
    stderr = "".join(err for _, err in outs)
    assert stderr.count(COMPILING) == 1, stderr
    assert stderr.count("built hdkd_fast's native kernels in") == 1, stderr
    assert stderr.count("another process is compiling") == 1, stderr
    assert all(out.startswith("['native', 'torch']") for out, _ in outs), outs
    value = outs[0][0].split()[-1]

    # A third process reuses the cache; info says where the build came from.
    again = _run(use, env=env, cwd=tmp_path)
    assert again.returncode == 0 and COMPILING not in again.stderr, again.stderr
    assert again.stdout.split()[-1] == value
    info = _run([python, "-m", "hdkd_fast.info"], env=env, cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert f"hdkd_fast._C  built on first use for torch {torch.__version__.split('+')[0]}: {cache}" in info.stdout
    assert "backends (cpu): native, torch  [auto -> native]" in info.stdout

    # A compiler that fails: warn with its last lines, fall back to "torch", remember the failure.
    broken = dict(env, CXX="/bin/false")
    fallback = _run(use, env=broken, cwd=tmp_path)
    assert fallback.returncode == 0, fallback.stderr
    assert "compiling hdkd_fast._C failed" in fallback.stderr and "compiler's last lines" in fallback.stderr
    assert fallback.stdout.startswith("['torch']")
    assert abs(float(fallback.stdout.split()[-1]) - float(value)) < 1e-4
    remembered = _run(use, env=broken, cwd=tmp_path)
    assert COMPILING not in remembered.stderr and "an earlier build of hdkd_fast._C failed" in remembered.stderr
    required = _run(use, env=dict(broken, HDKD_FAST_REQUIRE_EXT="1"), cwd=tmp_path)
    assert required.returncode != 0 and "HDKD_FAST_REQUIRE_EXT=1" in required.stderr
    disabled = _run([python, "-m", "hdkd_fast.build"], env=dict(env, HDKD_FAST_NO_EXT="1"), cwd=tmp_path)
    assert disabled.returncode == 1 and "disabled (HDKD_FAST_NO_EXT=1)" in disabled.stdout
