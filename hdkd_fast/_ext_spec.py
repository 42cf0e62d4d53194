"""How the compiled extension ``hdkd_fast._C`` is built: the one list of sources, flags and build
policy shared by both ways of building it.

- **Ahead of time**: ``setup.py`` (``pip install --no-build-isolation .``) loads this file by path and
  builds every CPU instruction-set variant, so one wheel serves any x86-64 CPU.
- **On first use**: :mod:`hdkd_fast._ext_loader` runs this file as a script in a subprocess
  (``python _ext_spec.py --build-lib DIR --build-temp DIR [--variants AVX2] [--cuda]``) to build for
  the running torch, CUDA and GPUs, and only the instruction-set variant this CPU runs, into its cache.

This module imports neither torch nor setuptools at import time (``setup.py`` runs in build
environments without torch), and nothing of the ``hdkd_fast`` package.

Environment variables read here (the same for both builds): ``FORCE_CUDA=1`` (build the CUDA kernels
even without a visible GPU; a failed CUDA build is then an error), ``TORCH_CUDA_ARCH_LIST`` (default:
the visible GPUs, or ``9.0`` when none is visible), ``MAX_JOBS`` (parallel compile jobs, read by
torch's ninja build), ``HDKD_FAST_REQUIRE_EXT=1`` (any failed part of the build is an error),
``HDKD_FAST_NO_EXT=1`` (no extension: pure-PyTorch install, no build on first use).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXT_NAME = "hdkd_fast._C"

# Sources, relative to the csrc/ folder (shipped inside the package as hdkd_fast/csrc).
CPU_SOURCES = (
    "dense_kd_ops.cpp",
    "dense_kd_host.cpp",
    "cpu/dense_kd_cpu_ops.cpp",
    "cpu/grad_buffer_pool.cpp",
    "cpu/dense_kd_cpu.cpp",
    "cpu/dense_kd_cpu_default.cpp",
)
CPU_KERNEL = "cpu/dense_kd_cpu_kernel.cpp"
"""Compiled once more per instruction-set variant (with that variant's flags), as PyTorch does."""
CUDA_SOURCES = ("cuda/dense_kd_kernels.cu", "cuda/dense_kd_cuda.cpp")
HEADER_SUFFIXES = (".h", ".cuh")
SOURCE_SUFFIXES = (".cpp", ".cu", *HEADER_SUFFIXES)


@dataclass(frozen=True)
class IsaVariant:
    """One x86-64 instruction-set variant of the CPU kernel."""

    name: str
    cpu_flags: tuple[str, ...]
    """The /proc/cpuinfo flags the CPU needs to run it."""
    compile_flags: tuple[str, ...]

    @property
    def macros(self) -> list[str]:
        return [f"-DCPU_CAPABILITY={self.name}", f"-DCPU_CAPABILITY_{self.name}"]


ISA_VARIANTS = (
    IsaVariant("AVX2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    IsaVariant(
        "AVX512",
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
    ),
)
"""Lowest first; the portable DEFAULT variant is always built (cpu/dense_kd_cpu_default.cpp)."""


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_flag_conflict() -> str | None:
    """Why ``HDKD_FAST_NO_EXT`` and ``HDKD_FAST_REQUIRE_EXT`` cannot both be set, when they are (the loader
    and ``setup.py`` refuse the pair with this message); ``None`` otherwise."""
    if env_flag("HDKD_FAST_NO_EXT") and env_flag("HDKD_FAST_REQUIRE_EXT"):
        return ("HDKD_FAST_NO_EXT=1 (no extension) and HDKD_FAST_REQUIRE_EXT=1 (the extension is required) "
                "contradict each other: unset one")
    return None


def x86_unix() -> bool:
    """x86-64 with a GCC/Clang-style compiler: the instruction-set variants are built there."""
    return sys.platform != "win32" and platform.machine().lower() in ("x86_64", "amd64", "x64")


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; ``None`` where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def variants_for_this_cpu() -> list[IsaVariant]:
    """The best instruction-set variant this CPU runs (empty: DEFAULT only). Every variant where the
    CPU's flags cannot be read (the extension still never runs one the CPU lacks: it checks CPUID)."""
    if not x86_unix():
        return []
    flags = cpu_flags()
    if flags is None:
        return list(ISA_VARIANTS)
    runnable = [v for v in ISA_VARIANTS if set(v.cpu_flags) <= flags]
    return runnable[-1:]


def cxx_flags() -> list[str]:
    """Host compiler flags (no -std: torch.utils.cpp_extension adds the one its headers need)."""
    if sys.platform == "win32":
        return ["/O2"]
    return ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas"]


TORCH_NUMPY_WARNING = "Failed to initialize NumPy"
"""The start of the warning ``import torch`` prints when numpy is not installed."""


def import_torch() -> Any:
    """``import torch`` without its "Failed to initialize NumPy" warning: no build here uses numpy, and
    ``pip install --no-build-isolation -e ".[train]"`` (scripts/setup_env.sh) builds this package before
    it installs the extras that bring numpy, so a new user would see the warning on every first install."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCH_NUMPY_WARNING, category=UserWarning)
        import torch
    return torch


def openmp_flags() -> list[str]:
    """-fopenmp when torch's intra-op parallelism is OpenMP: at::parallel_for is inlined into the
    extension, so without it the kernels would silently run on one thread. (The extension then uses
    the libgomp.so.1 torch already loaded.)"""
    import torch

    if sys.platform in ("win32", "darwin"):
        return []
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, defaulting to the visible GPUs (or 9.0 when none is visible); the
    default is written back to the environment, where torch's build reads it."""
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return archs
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{major}.{minor}" for major, minor in caps)
    else:
        archs = "9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def arch_token(archs: str) -> str:
    """'8.0;9.0+PTX' -> '80_90' (a preprocessor token the extension reports back)."""
    out = []
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        digits = "".join(ch for ch in item.split("+")[0] if ch.isdigit())
        if digits:
            out.append(digits)
    return "_".join(out) or "none"


def want_cuda() -> bool:
    """Build the CUDA kernels: FORCE_CUDA=1, or a CUDA torch that sees a GPU."""
    import torch

    return env_flag("FORCE_CUDA") or (torch.version.cuda is not None and torch.cuda.is_available())


def header_files(csrc: Path) -> list[Path]:
    """Every header under ``csrc`` (the build's dependencies)."""
    return sorted(p for p in csrc.rglob("*") if p.suffix in HEADER_SUFFIXES)


def make_extension(csrc: str, *, cuda: bool) -> Any:
    """The ``CppExtension`` / ``CUDAExtension`` for sources under the folder ``csrc`` (a path
    relative to the working directory, as setuptools wants, or absolute)."""
    from torch.utils import cpp_extension

    cpu = [os.path.join(csrc, s) for s in CPU_SOURCES]
    depends = [str(p) for p in header_files(Path(csrc))]
    if cuda:
        archs = cuda_arch_list()
        print(f"hdkd_fast: building the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            cpu + [os.path.join(csrc, s) for s in CUDA_SOURCES],
            define_macros=[("HDKD_WITH_CUDA", None), ("HDKD_CUDA_ARCHS", arch_token(archs))],
            extra_compile_args={"cxx": cxx_flags() + openmp_flags(), "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=openmp_flags(),
            depends=depends,
        )
    else:
        ext = cpp_extension.CppExtension(
            EXT_NAME,
            cpu,
            extra_compile_args={"cxx": cxx_flags() + openmp_flags()},
            extra_link_args=openmp_flags(),
            depends=depends,
        )
    ext._hdkd_cuda = cuda
    ext._hdkd_csrc = csrc
    return ext


def _warn(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nhdkd_fast: WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def build_ext_class(variants: Sequence[IsaVariant]) -> Any:
    """torch's ``BuildExtension`` (ninja) plus the instruction-set variants of the CPU kernel and
    the fallback policy: an explicitly requested part (``FORCE_CUDA`` for CUDA,
    ``HDKD_FAST_REQUIRE_EXT`` for everything) that fails stops the build with the compiler's error;
    otherwise a failed CUDA build is retried CPU-only, a failed variant is left out, and a failed
    extension is dropped with a loud warning (``setup.py`` then installs pure Python)."""
    from torch.utils.cpp_extension import BuildExtension

    force_cuda, require = env_flag("FORCE_CUDA"), env_flag("HDKD_FAST_REQUIRE_EXT")

    class BuildExt(BuildExtension):
        extensions: list[Any]

        def build_extensions(self) -> None:
            self._hdkd_failed: list[object] = []
            try:
                super().build_extensions()
            except Exception:  # before any extension: no usable compiler, ABI check failed, ...
                if force_cuda or require:
                    raise
                _warn("cannot compile the extension hdkd_fast._C (backend='native' unavailable, the "
                      "pure-PyTorch backends work). Error:\n" + traceback.format_exc()[-3000:])
                self._hdkd_failed = list(self.extensions)
            self.extensions = [e for e in self.extensions if e not in self._hdkd_failed]

        def build_extension(self, ext: Any) -> None:
            is_cuda = getattr(ext, "_hdkd_cuda", False)
            try:
                self._build_with_variants(ext)
                return
            except Exception:
                error = traceback.format_exc()
                if (is_cuda and force_cuda) or require:
                    raise
            if is_cuda:
                _warn("the CUDA build of hdkd_fast._C failed; retrying with the CPU kernels only\n" + error[-3000:])
                ext.sources = [os.path.join(ext._hdkd_csrc, s) for s in CPU_SOURCES]
                ext.define_macros = [m for m in ext.define_macros
                                     if m[0] not in ("HDKD_WITH_CUDA", "HDKD_CUDA_ARCHS")]
                ext._hdkd_cuda = False
                try:
                    self._build_with_variants(ext)
                    return
                except Exception:
                    error = traceback.format_exc()
            _warn("building the compiled extension hdkd_fast._C failed (backend='native' unavailable, the "
                  "pure-PyTorch backends work). Error:\n" + error[-3000:])
            self._hdkd_failed.append(ext)

        def _build_with_variants(self, ext: Any) -> None:
            macros = []
            kernel = os.path.join(ext._hdkd_csrc, CPU_KERNEL)
            for variant in variants:
                out_dir = os.path.abspath(os.path.join(self.build_temp, f"isa_{variant.name.lower()}"))
                try:
                    objects = self.compiler.compile(
                        [kernel],
                        output_dir=out_dir,
                        include_dirs=ext.include_dirs,
                        extra_postargs={"cxx": ext.extra_compile_args["cxx"] + variant.macros
                                        + list(variant.compile_flags)},
                        depends=ext.depends,
                    )
                except Exception:
                    if require:
                        raise
                    _warn(f"the {variant.name} variant of the CPU kernel failed to compile; leaving it out")
                    continue
                ext.extra_objects = [o for o in ext.extra_objects if not o.startswith(out_dir)] + objects
                macros.append((f"HDKD_HAVE_{variant.name}", None))
            ext.define_macros = [m for m in ext.define_macros if not m[0].startswith("HDKD_HAVE_")] + macros
            super().build_extension(ext)

    return BuildExt.with_options(use_ninja=True)


def _main(argv: Sequence[str] | None = None) -> None:
    """The build on first use (see the module docstring): build into ``--build-lib``."""
    parser = argparse.ArgumentParser(description="build hdkd_fast._C for this machine")
    parser.add_argument("--csrc", required=True)
    parser.add_argument("--build-lib", required=True)
    parser.add_argument("--build-temp", required=True)
    parser.add_argument("--variants", nargs="*", default=[], choices=[v.name for v in ISA_VARIANTS])
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args(argv)
    import_torch()  # before anything else imports it
    from setuptools import setup

    variants = [v for v in ISA_VARIANTS if v.name in args.variants]
    setup(
        name="hdkd_fast_ext",
        script_name="_ext_spec.py",
        script_args=["-q", "build_ext", "--build-lib", args.build_lib, "--build-temp", args.build_temp],
        ext_modules=[make_extension(args.csrc, cuda=args.cuda)],
        cmdclass={"build_ext": build_ext_class(variants)},
    )


if __name__ == "__main__":
    _main()
