"""Build script: the Python package (its Triton kernels included, ``hdkd_fast/kernels/``), the C++/CUDA
sources ``csrc/`` shipped as ``hdkd_fast/csrc`` (for the build on first use), and, when torch is
importable here, the compiled extension ``hdkd_fast._C`` built ahead of time.

- ``pip install .`` (pip's isolated build environment has no torch): a pure-Python wheel; the first
  use of ``backend="native"`` (or ``"auto"`` resolving to it) compiles ``hdkd_fast._C`` for the running
  torch into a cache (:mod:`hdkd_fast._ext_loader`), or ``hdkd-fast build`` does it up front.
- ``pip install --no-build-isolation .`` with torch installed: the extension is built now, with every
  CPU instruction-set variant (DEFAULT, AVX2, AVX512 on x86-64; the best one the CPU supports is picked
  at run time) and, when torch has CUDA and sees a GPU or ``FORCE_CUDA=1``, the CUDA kernels.

The sources, flags and failure policy live in ``hdkd_fast/_ext_spec.py``, shared with the build on
first use; its docstring lists the environment variables (``FORCE_CUDA``, ``TORCH_CUDA_ARCH_LIST``,
``MAX_JOBS``, ``HDKD_FAST_REQUIRE_EXT``, ``HDKD_FAST_NO_EXT``).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# An editable install (scripts/setup_env.sh: pip install -e) of this flat layout makes setuptools warn that a
# folder of the working directory named like the package may take precedence over it during imports. Here
# that folder is the package itself (the editable install points at it), so the warning can only alarm a
# new user; it is the one warning a fresh clone's set-up printed (issue 24). This filter lives in the build
# backend's process only (setuptools runs this file there) and names that one message.
warnings.filterwarnings("ignore", message="Editable installation", category=Warning)


def _load_spec() -> Any:
    """hdkd_fast/_ext_spec.py, loaded by path (importing the package would import torch)."""
    loader = importlib.util.spec_from_file_location("_hdkd_fast_ext_spec", ROOT / "hdkd_fast" / "_ext_spec.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    sys.modules[loader.name] = module  # dataclasses look their module up
    loader.loader.exec_module(module)
    return module


SPEC = _load_spec()
CSRC_PACKAGES = ["hdkd_fast.csrc", "hdkd_fast.csrc.cpu", "hdkd_fast.csrc.cuda"]  # data-only folders of csrc/
CSRC_GLOBS = [f"*{suffix}" for suffix in SPEC.SOURCE_SUFFIXES]


def _extensions() -> tuple[list[Any], dict[str, Any]]:
    if (conflict := SPEC.env_flag_conflict()) is not None:
        raise RuntimeError(f"hdkd_fast: {conflict}")
    if SPEC.env_flag("HDKD_FAST_NO_EXT"):
        print("hdkd_fast: HDKD_FAST_NO_EXT is set: no compiled extension", file=sys.stderr)
        return [], {}
    try:
        SPEC.import_torch()  # (without torch's warning that numpy is missing: the build does not use it)
    except ImportError as exc:  # pip's isolated build environment
        if SPEC.env_flag("HDKD_FAST_REQUIRE_EXT") or SPEC.env_flag("FORCE_CUDA"):
            raise RuntimeError("hdkd_fast: the extension was requested but torch cannot be imported "
                               "(use pip install --no-build-isolation .)") from exc
        print("hdkd_fast: torch is not importable in this build environment, so hdkd_fast._C is not built "
              "now: it is compiled on first use (or by `hdkd-fast build`). To build it at install time, "
              "use pip install --no-build-isolation .", file=sys.stderr)
        return [], {}
    variants = list(SPEC.ISA_VARIANTS) if SPEC.x86_unix() else []
    ext = SPEC.make_extension("csrc", cuda=SPEC.want_cuda())
    return [ext], {"build_ext": SPEC.build_ext_class(variants)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[*find_packages(include=["hdkd_fast", "hdkd_fast.*"]), *CSRC_PACKAGES],
    package_dir={"hdkd_fast.csrc": "csrc"},
    package_data={"hdkd_fast": ["py.typed"], **{name: CSRC_GLOBS for name in CSRC_PACKAGES}},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
