"""What a new user's install prints (scripts/setup_env.sh, pip install): no warning from the package's own
build configuration; and a source checkout hides no installed package. (tests/integration/test_install.py does
the whole install, slowly.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# setup.py as pip runs it in scripts/setup_env.sh: torch installed, numpy not yet (it comes with the extras,
# installed after the build), so importing torch there would warn "Failed to initialize NumPy".
SETUP_WITHOUT_NUMPY = (
    "import runpy, sys\n"
    "sys.modules['numpy'] = None\n"
    "sys.argv = ['setup.py', '--name']\n"
    "runpy.run_path('setup.py', run_name='__main__')\n"
)


def test_pyproject_license_is_an_spdx_string_and_setuptools_can_read_it() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # a TOML table ({ text = ... }) is deprecated by setuptools (builds fail after 2027-02-18)
    assert pyproject["project"]["license"] == "Apache-2.0"
    # the string form (PEP 639) needs setuptools >= 77 to build
    requirement = next(r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement)
    assert match is not None and int(match.group(1)) >= 77, requirement


def test_setup_py_prints_no_warning_when_numpy_is_missing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDKD_FAST_", "PYTHONWARNINGS", "FORCE_CUDA"))}
    proc = subprocess.run([sys.executable, "-c", SETUP_WITHOUT_NUMPY], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "hdkd_fast"
    assert "Failed to initialize NumPy" not in proc.stderr, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # e.g. setuptools' `project.license` deprecation


def shadowed_modules(root: Path, installed: Mapping[str, Sequence[str]], own: str = "hdkd_fast") -> list[str]:
    """The top-level modules of installed distributions that ``root`` hides when it is on ``sys.path`` (pytest's
    rootdir, ``python`` started in the checkout, ``PYTHONPATH=.``): a regular package (a folder with
    ``__init__.py``) or a ``.py`` file at the root wins over the installed module of the same name.
    ``installed`` maps top-level names to their distributions (``importlib.metadata.packages_distributions()``);
    ``own`` is the one name the checkout is meant to provide."""
    names = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in root.glob("*.py")}
    return sorted(f"{name} (installed by {', '.join(installed[name])})" for name in names - {own} if name in installed)


def test_the_repository_root_shadows_no_installed_package() -> None:
    """The Triton kernels were a top-level ``kernels/`` once, and hid Hugging Face's ``kernels`` (which
    transformers 5 imports) from every process started in the checkout."""
    shadowed = shadowed_modules(REPO, packages_distributions())
    assert not shadowed, f"the repository root hides installed modules: {shadowed}; rename the folder or file"


def test_the_shadow_check_can_fail(tmp_path: Path) -> None:
    for folder in ("kernels", "hdkd_fast", "docs"):
        (tmp_path / folder).mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "hdkd_fast" / "__init__.py").write_text("")
    (tmp_path / "setup.py").write_text("")
    installed = {"kernels": ["kernels"], "hdkd_fast": ["hdkd_fast"], "docs": ["docs"], "setup": ["setup-x"],
                 "torch": ["torch"]}
    # a folder without __init__.py (docs/) is a namespace portion: an installed package of that name wins
    assert shadowed_modules(tmp_path, installed) == ["kernels (installed by kernels)",
                                                     "setup (installed by setup-x)"]
