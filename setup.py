"""Build script: the Python package, ``hdkd_fast.kernels`` mapped from ``kernels/``, and the compiled
extension ``hdkd_fast._C`` (``csrc/``).

Install with ``pip install --no-build-isolation .`` so the build uses the torch already installed
(build isolation would download a multi-GB CUDA torch; the GPU machines have no network).

The extension (torch.utils.cpp_extension + ninja):

- CPU kernels on every machine with a C++ compiler; on x86-64 the kernel is compiled once per
  instruction set (DEFAULT, AVX2, AVX512) and the best one the CPU supports is picked at run time;
- CUDA kernels when torch has CUDA and sees a GPU, or when ``FORCE_CUDA=1``; for the architectures in
  ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs, or ``9.0`` (H100/H200) when none is visible);
- ``MAX_JOBS`` caps the parallel compile jobs (ninja);
- ``HDKD_FAST_NO_EXT=1`` skips the extension (pure-PyTorch install).

A build that was asked for explicitly (``FORCE_CUDA=1`` for CUDA, ``HDKD_FAST_REQUIRE_EXT=1`` for the
extension as a whole) and fails stops the install with the compiler's error. An auto-detected build
that fails prints a loud warning and the install goes on without it (CUDA falls back to a CPU-only
extension, then to pure PyTorch); ``python -m hdkd_fast.info`` tells what was built.
"""

from __future__ import annotations

import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Any

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
EXT_NAME = "hdkd_fast._C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


NO_EXT = _flag("HDKD_FAST_NO_EXT")
FORCE_CUDA = _flag("FORCE_CUDA")
REQUIRE_EXT = _flag("HDKD_FAST_REQUIRE_EXT")

PACKAGES = [*find_packages(include=["hdkd_fast", "hdkd_fast.*"]), "hdkd_fast.kernels"]
PACKAGE_DIR = {"hdkd_fast.kernels": "kernels"}

CPU_SOURCES = ["csrc/dense_kd_ops.cpp", "csrc/cpu/dense_kd_cpu.cpp", "csrc/cpu/dense_kd_cpu_default.cpp"]
CPU_KERNEL = "csrc/cpu/dense_kd_cpu_kernel.cpp"
CUDA_SOURCES = ["csrc/cuda/dense_kd_kernels.cu", "csrc/cuda/dense_kd_cuda.cpp"]
DEPENDS = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*")) if p.suffix in (".h", ".cuh")]

# Instruction-set variants of the CPU kernel (x86-64 with a GCC/Clang-style compiler), as PyTorch
# compiles its own kernels: (name, macros, flags).
ISA_VARIANTS = [
    ("AVX2", ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], ["-mavx2", "-mfma", "-mf16c"]),
    (
        "AVX512",
        ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    ),
]


def _warn(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nhdkd_fast: WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _x86_unix() -> bool:
    return sys.platform != "win32" and platform.machine().lower() in ("x86_64", "amd64", "x64")


def _cxx_flags() -> list[str]:
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20).
    if sys.platform == "win32":
        return ["/O2"]
    return ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas"]


def _openmp_flags() -> list[str]:
    """-fopenmp when torch's intra-op parallelism is OpenMP: at::parallel_for is inlined into the
    extension, so without it the kernels would silently run on one thread. (The extension then uses
    the libgomp.so.1 torch already loaded.)"""
    import torch

    if sys.platform in ("win32", "darwin"):
        return []
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, defaulting to the visible GPUs (or 9.0 when none is visible)."""
    import torch as _torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return archs
    if _torch.cuda.is_available() and _torch.cuda.device_count() > 0:
        caps = sorted({_torch.cuda.get_device_capability(i) for i in range(_torch.cuda.device_count())})
        archs = ";".join(f"{major}.{minor}" for major, minor in caps)
    else:
        archs = "9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _arch_token(archs: str) -> str:
    """'8.0;9.0+PTX' -> '80_90' (a preprocessor token the extension reports back)."""
    out = []
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        digits = "".join(ch for ch in item.split("+")[0] if ch.isdigit())
        if digits:
            out.append(digits)
    return "_".join(out) or "none"


def _extensions() -> tuple[list[Any], dict[str, Any]]:
    if NO_EXT:
        print("hdkd_fast: HDKD_FAST_NO_EXT is set: skipping the compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch at build time: pure-Python install
        if REQUIRE_EXT or FORCE_CUDA:
            raise RuntimeError("hdkd_fast: the extension was requested but torch cannot be imported") from exc
        _warn(f"torch cannot be imported ({exc}); installing without the compiled extension hdkd_fast._C")
        return [], {}

    want_cuda = FORCE_CUDA or (torch.version.cuda is not None and torch.cuda.is_available())
    ext = None
    if want_cuda:
        try:
            archs = _cuda_arch_list()
            print(f"hdkd_fast: building the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}", file=sys.stderr)
            ext = cpp_extension.CUDAExtension(
                EXT_NAME,
                CPU_SOURCES + CUDA_SOURCES,
                define_macros=[("HDKD_WITH_CUDA", None), ("HDKD_CUDA_ARCHS", _arch_token(archs))],
                extra_compile_args={"cxx": _cxx_flags() + _openmp_flags(), "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=_openmp_flags(),
                depends=DEPENDS,
            )
            ext._hdkd_cuda = True  # type: ignore[attr-defined]
        except Exception as exc:
            if FORCE_CUDA:
                raise
            _warn(f"cannot set up the CUDA build ({exc}); building the CPU extension only")
            ext = None
    if ext is None:
        ext = cpp_extension.CppExtension(
            EXT_NAME,
            CPU_SOURCES,
            extra_compile_args={"cxx": _cxx_flags() + _openmp_flags()},
            extra_link_args=_openmp_flags(),
            depends=DEPENDS,
        )
    build_ext = _build_ext_class(cpp_extension.BuildExtension)
    return [ext], {"build_ext": build_ext.with_options(use_ninja=True)}


def _to_cpu_only(ext: Any) -> None:
    """Turn the CUDA extension into the CPU-only one (same compile flags, no .cu sources)."""
    ext.sources = list(CPU_SOURCES)
    ext.define_macros = [m for m in ext.define_macros if m[0] not in ("HDKD_WITH_CUDA", "HDKD_CUDA_ARCHS")]
    ext._hdkd_cuda = False


def _build_ext_class(base: Any) -> Any:
    class BuildExt(base):  # type: ignore[misc, valid-type]
        """BuildExtension plus per-instruction-set CPU objects and the fallback policy."""

        def build_extensions(self) -> None:
            self._hdkd_failed: list[object] = []
            try:
                super().build_extensions()
            except Exception:  # before any extension: no usable compiler, ABI check failed, ...
                if FORCE_CUDA or REQUIRE_EXT:
                    raise
                _warn("cannot compile the extension hdkd_fast._C; hdkd_fast is installed without it "
                      "(backend='native' unavailable, the pure-PyTorch backends work). Error:\n"
                      + traceback.format_exc()[-3000:])
                self._hdkd_failed = list(self.extensions)
            self.extensions = [e for e in self.extensions if e not in self._hdkd_failed]

        def build_extension(self, ext: Any) -> None:
            is_cuda = getattr(ext, "_hdkd_cuda", False)
            try:
                self._build_with_variants(ext)
                return
            except Exception:
                error = traceback.format_exc()
                if (is_cuda and FORCE_CUDA) or REQUIRE_EXT:
                    raise
            if is_cuda:
                _warn("the CUDA build of hdkd_fast._C failed (error above); retrying with the CPU kernels only\n"
                      + error[-3000:])
                _to_cpu_only(ext)
                try:
                    self._build_with_variants(ext)
                    return
                except Exception:
                    error = traceback.format_exc()
            _warn("building the compiled extension hdkd_fast._C failed; hdkd_fast is installed without it "
                  "(backend='native' unavailable, the pure-PyTorch backends work). Error:\n" + error[-3000:])
            self._hdkd_failed.append(ext)

        def _build_with_variants(self, ext: Any) -> None:
            macros = []
            if _x86_unix():
                for name, defs, flags in ISA_VARIANTS:
                    out_dir = os.path.abspath(os.path.join(self.build_temp, f"isa_{name.lower()}"))
                    try:
                        objects = self.compiler.compile(
                            [CPU_KERNEL],
                            output_dir=out_dir,
                            include_dirs=ext.include_dirs,
                            extra_postargs={"cxx": ext.extra_compile_args["cxx"] + defs + flags},
                            depends=DEPENDS,
                        )
                    except Exception:
                        if REQUIRE_EXT:
                            raise
                        _warn(f"the {name} variant of the CPU kernel failed to compile; leaving it out")
                        continue
                    ext.extra_objects = [o for o in ext.extra_objects if not o.startswith(out_dir)] + objects
                    macros.append((f"HDKD_HAVE_{name}", None))
            ext.define_macros = [m for m in ext.define_macros if not m[0].startswith("HDKD_HAVE_")] + macros
            super().build_extension(ext)

    return BuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
