"""Finding the compiled extension ``hdkd_fast._C``, and building it on first use.

Where the extension comes from, in this order:

1. **Ahead of time**: ``hdkd_fast/_C*.so`` built by ``pip install --no-build-isolation .``.
2. **Cached**: a build on first use of an earlier process, in ``<cache>/<key>/hdkd_fast/_C*.so``.
3. **Built now** (when the caller allows it): ``hdkd_fast/_ext_spec.py`` runs in a subprocess and
   compiles the shipped sources (``hdkd_fast/csrc``) for the running torch, its CUDA version and the
   visible GPUs, and only the CPU instruction-set variant this machine runs, with ninja. The build
   happens under a file lock, so N processes started together (DDP ranks, test workers) build once:
   the others wait and load the result. It goes to a temporary folder renamed into place when it
   succeeded, so a killed build leaves nothing half-written behind.

``<cache>`` is ``$HDKD_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/hdkd_fast``, else
``~/.cache/hdkd_fast``. ``<key>`` names what the binary depends on (torch and CUDA versions, GPU
architectures, Python ABI, instruction-set variant) and ends with a hash of those and of the sources
and compiler, so an upgrade of any of them builds anew beside the old one.

A failed build warns once per process with the compiler's last lines, records the log in
``<cache>/<key>.failed`` (later processes warn from it instead of rebuilding; ``hdkd-fast build
--force`` retries) and leaves ``backend="auto"`` on ``"torch"``. ``HDKD_FAST_REQUIRE_EXT=1`` turns a
missing extension into an error, ``HDKD_FAST_NO_EXT=1`` never loads nor builds one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import _ext_spec as spec

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_ENV = "HDKD_FAST_CACHE_DIR"
BUILD_ON_FIRST_USE = "built on first use"
AHEAD_OF_TIME = "ahead of time"
NOT_BUILT = "not built"


@dataclass(frozen=True)
class Extension:
    """Where this process's ``hdkd_fast._C`` comes from."""

    module: ModuleType | None
    origin: str
    """:data:`AHEAD_OF_TIME`, :data:`BUILD_ON_FIRST_USE` or :data:`NOT_BUILT`."""
    detail: str
    """The loaded file, or why there is none."""
    final: bool = True
    """False only for "not built yet" (a later call may still build it)."""


class ExtensionBuildError(RuntimeError):
    """The extension is required (``HDKD_FAST_REQUIRE_EXT=1``) but cannot be had."""


_state: Extension | None = None
_warned: set[str] = set()


def sources_dir() -> Path | None:
    """The C++/CUDA sources: ``hdkd_fast/csrc`` in an installed wheel, ``csrc/`` beside the package in
    a source checkout (editable install)."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / spec.CPU_SOURCES[0]).is_file():
            return candidate
    return None


def cache_root() -> Path:
    """The folder of the builds on first use (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hdkd_fast"


def _wants_cuda() -> bool:
    return spec.want_cuda() and torch.version.cuda is not None


def build_description() -> str:
    """What a build on first use is for, e.g. ``torch 2.13.0, CPU AVX512, Python 3.11``."""
    parts = [f"torch {torch.__version__}"]
    if _wants_cuda():
        parts.append(f"CUDA {torch.version.cuda} sm {spec.cuda_arch_list()}")
    variants = spec.variants_for_this_cpu()
    parts.append(f"CPU {variants[-1].name if variants else 'DEFAULT'}")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def _sources_hash(csrc: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in spec.SOURCE_SUFFIXES):
        digest.update(path.relative_to(csrc).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(csrc: Path) -> str:
    """The cache entry's name for the running torch, CUDA, GPUs, Python, CPU and these sources."""
    cuda = _wants_cuda()
    variants = [v.name for v in spec.variants_for_this_cpu()]
    archs = spec.arch_token(spec.cuda_arch_list()) if cuda else ""
    readable = "-".join([
        f"torch{torch.__version__.split('+')[0]}",
        f"cu{torch.version.cuda.replace('.', '')}-sm{archs}" if cuda and torch.version.cuda else "cpu",
        sys.implementation.cache_tag,
        (variants[-1] if variants else "default").lower(),
    ])
    identity = "\n".join([
        readable, torch.__version__, str(torch.version.cuda), archs, platform.machine(), sys.platform,
        ",".join(variants), os.environ.get("CXX", "c++"), os.environ.get("CC", "cc"), _sources_hash(csrc),
    ])
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _find_library(folder: Path) -> Path | None:
    found = sorted((folder / "hdkd_fast").glob("_C*.so")) + sorted((folder / "hdkd_fast").glob("_C*.pyd"))
    return found[0] if found else None


def _load_library(path: Path) -> ModuleType:
    module_spec = importlib.util.spec_from_file_location(spec.EXT_NAME, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[spec.EXT_NAME] = module
    return module


def _version_mismatch(module: ModuleType) -> str | None:
    built = str(getattr(module, "torch_version", ""))
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        return (f"{getattr(module, '__file__', spec.EXT_NAME)} was built for torch {built} but torch {running} "
                "is running; reinstall hdkd_fast")
    return None


def _ahead_of_time() -> Extension | None:
    """The extension installed with the package, or ``None`` when there is none that imports."""
    try:
        module = importlib.import_module(spec.EXT_NAME)
    except ModuleNotFoundError as exc:
        if exc.name != spec.EXT_NAME:
            raise
        return None
    except ImportError:  # built for another torch or Python (undefined symbols): use a build of our own
        return None
    mismatch = _version_mismatch(module)
    if mismatch is not None:  # it registered its ops already: a second build cannot be loaded beside it
        return Extension(None, NOT_BUILT, mismatch)
    return Extension(module, AHEAD_OF_TIME, str(getattr(module, "__file__", spec.EXT_NAME)))


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _failed(detail: str) -> Extension:
    """A build failure: an error under HDKD_FAST_REQUIRE_EXT, else a warning and no extension."""
    if spec.env_flag("HDKD_FAST_REQUIRE_EXT"):
        raise ExtensionBuildError(f"hdkd_fast._C is required (HDKD_FAST_REQUIRE_EXT=1) but {detail}")
    _warn_once(f"hdkd_fast: {detail}; backend='native' is unavailable and 'auto' uses 'torch'")
    return Extension(None, NOT_BUILT, detail)


def _compile(csrc: Path, target: Path, failure_log: Path) -> Extension:
    """Build into ``target`` (see the module docstring); the caller holds the lock."""
    root = target.parent
    print(f"hdkd_fast: compiling hdkd_fast's native kernels for {build_description()} once; cached in {target}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        command = [
            sys.executable, "-c",
            "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
            str(PACKAGE_DIR / "_ext_spec.py"), "--csrc", str(csrc), "--build-lib", str(work / "lib"),
            "--build-temp", str(work / "temp"), "--variants", *[v.name for v in spec.variants_for_this_cpu()],
        ]
        if _wants_cuda():
            command.append("--cuda")
        with open(work / "build.log", "w") as log:
            proc = subprocess.run(command, cwd=work, stdout=log, stderr=subprocess.STDOUT, check=False)
        output = (work / "build.log").read_text(errors="replace")
        library = _find_library(work / "lib")
        if proc.returncode != 0 or library is None:
            tail = "\n".join(output.strip().splitlines()[-25:])
            failure_log.write_text(output)
            return _failed(f"compiling hdkd_fast._C failed (log: {failure_log}); the compiler's last lines:\n{tail}")
        (work / "lib" / "build.log").write_text(output)
        os.replace(work / "lib", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    library = _find_library(target)
    assert library is not None
    module = _load_library(library)
    print(f"hdkd_fast: built hdkd_fast's native kernels in {time.perf_counter() - start:.0f} s: {library}",
          file=sys.stderr, flush=True)
    return Extension(module, BUILD_ON_FIRST_USE, str(library))


def _from_cache(build: bool, force: bool = False) -> Extension:
    csrc = sources_dir()
    if csrc is None:
        return _failed(f"hdkd_fast._C cannot be built: its C++ sources are not in this installation "
                       f"(looked in {PACKAGE_DIR})")
    root = cache_root()
    target = root / cache_key(csrc)
    failure_log = target.with_name(target.name + ".failed")

    def cached() -> Extension | None:
        library = _find_library(target)
        if library is not None:
            try:
                return Extension(_load_library(library), BUILD_ON_FIRST_USE, str(library))
            except ImportError as exc:
                return _failed(f"the cached build {library} cannot be loaded ({exc}); run hdkd-fast build --force")
        if failure_log.is_file():
            return _failed(f"an earlier build of hdkd_fast._C failed (log: {failure_log}; "
                           "hdkd-fast build --force retries)")
        return None

    if not force and (found := cached()) is not None:
        return found
    if not build:
        return Extension(None, NOT_BUILT, f"hdkd_fast._C is not built yet: the first use of backend 'native' "
                         f"compiles it into {root} (or run hdkd-fast build)", final=False)
    from filelock import FileLock, Timeout

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"hdkd_fast: another process is compiling hdkd_fast's native kernels; waiting for it ({lock.lock_file})",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if force:
            shutil.rmtree(target, ignore_errors=True)
            failure_log.unlink(missing_ok=True)
        found = cached()  # built (or failed) by the process that held the lock before us
        return found if found is not None else _compile(csrc, target, failure_log)
    finally:
        lock.release()


def extension(build: bool = True, search_cache: bool = True) -> Extension:
    """This process's extension (see the module docstring). ``build=False`` never compiles;
    ``search_cache=False`` only imports an ahead-of-time build (no CUDA query, no file hashing: cheap
    enough for import time)."""
    global _state
    if _state is not None:
        return _state
    if spec.env_flag("HDKD_FAST_NO_EXT"):
        _state = Extension(None, NOT_BUILT, "hdkd_fast._C is disabled (HDKD_FAST_NO_EXT=1)")
        return _state
    state = _ahead_of_time()
    if state is None and not search_cache:
        state = Extension(None, NOT_BUILT, "hdkd_fast._C is not loaded yet (found or built on the first use of "
                          "backend 'native')", final=False)
    elif state is None:
        state = _from_cache(build)
    if state.final:
        _state = state
    return state


def build(force: bool = False) -> Extension:
    """Build (or find) the extension now: ``hdkd-fast build``. ``force`` rebuilds the cached build on
    first use (an ahead-of-time build is kept: reinstall the package to replace it)."""
    global _state
    if _state is None and force and not spec.env_flag("HDKD_FAST_NO_EXT") and _ahead_of_time() is None:
        _state = _from_cache(True, force=True)
    return extension(build=True)
