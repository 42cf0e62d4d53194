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

**Trust.** Loading a library runs its code, and ``<key>`` is predictable, so nothing in the cache is
loaded, and no ``.failed`` record believed, unless it is safe from other users:

- ``<cache>`` itself must be a folder owned by the current user (or root) that neither its group nor
  others can write. Otherwise it is refused with one warning, and the build on first use goes to a
  private folder instead: ``$XDG_CACHE_HOME/hdkd_fast`` or ``~/.cache/hdkd_fast`` when that is
  another folder, else ``<tmp>/hdkd_fast-<uid>`` (created 0700 and checked the same way). The
  folders above ``<cache>`` are not checked.
- In a trusted ``<cache>``, an entry is loaded only when ``<key>``, ``<key>/hdkd_fast``, the library
  and ``<key>/manifest.json`` are all owned by the user (or root), writable by neither group nor
  others, and not symbolic links, and when the library has the size and SHA-256 that the manifest
  recorded at build time (the manifest is written before the build is renamed into place). An entry
  that fails any of these (an older hdkd_fast's build without a manifest, a truncated or modified
  library, a loose mode) is not loaded: it warns, and the next build moves it aside and rebuilds. An
  untrusted ``<key>.failed`` is ignored with a warning. New builds and records are written without
  group or other write permission, whatever the umask, and ``<cache>`` is created 0700.
- Waiting for another process's build lock (``<key>.lock``, created 0600) gives up after
  ``$HDKD_FAST_LOCK_TIMEOUT`` seconds (default 3600) with a message naming the lock file.

A failed build warns once per process with the compiler's last lines, records the log in
``<cache>/<key>.failed`` (later processes warn from it instead of rebuilding; ``hdkd-fast build
--force`` retries) and leaves ``backend="auto"`` on ``"torch"``. So does a cache that cannot be used
(a file, a read-only folder, a lock that cannot be created or a timed-out wait): one warning naming
``HDKD_FAST_CACHE_DIR``, and ``"torch"``. ``HDKD_FAST_REQUIRE_EXT=1`` turns a missing extension into
an error (:class:`ExtensionBuildError`), ``HDKD_FAST_NO_EXT=1`` never loads nor builds one; both set
at once contradict each other and are refused with an :class:`ExtensionBuildError` at the first use
of the extension (import itself still works).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from . import _ext_spec as spec
from ._atomic import write_text_atomic

if TYPE_CHECKING:
    from filelock import FileLock

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_ENV = "HDKD_FAST_CACHE_DIR"
LOCK_TIMEOUT_ENV = "HDKD_FAST_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 3600.0
"""Seconds a process waits for another one's build lock before giving up (a CUDA build can take long)."""
MANIFEST = "manifest.json"
"""In each cache entry: the library's path in the entry, size and SHA-256, written at build time."""
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


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hdkd_fast"


def cache_root() -> Path:
    """The folder of the builds on first use as configured (see the module docstring); a build goes to
    a private folder instead when this one is not trusted."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return _default_cache_root()


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


# ---- trust -------------------------------------------------------------------------------------


def _uid() -> int | None:
    """This process's user id (``None`` without POSIX ownership: Windows)."""
    geteuid = getattr(os, "geteuid", None)
    return None if geteuid is None else int(geteuid())


def _distrust(path: Path, folder: bool) -> str | None:
    """Why ``path`` (a folder or a regular file) is not safe from other users, or ``None`` when it is.
    Raises ``OSError`` when it cannot be examined."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not (stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)):
        return f"{path} is not a {'folder' if folder else 'regular file'}"
    uid = _uid()
    if uid is None:
        return None
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid}) or root"
    if st.st_mode & 0o022:
        return f"{path} can be written by its group or by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _root_distrust(root: Path) -> str | None:
    """Why the cache folder ``root`` is not trusted (``None`` when it is, or does not exist yet). Raises
    ``OSError`` when it cannot be a folder (a file, a path under a file, no access)."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(root))
    return _distrust(root.resolve(), folder=True)


def _private_root(refused: Path) -> Path | None:
    """A cache folder of this user's own, for when ``refused`` is not trusted."""
    refused = refused.resolve()
    for candidate in (_default_cache_root(), Path(tempfile.gettempdir()) / f"hdkd_fast-{_uid() or 0}"):
        try:
            if candidate.resolve() != refused and _root_distrust(candidate) is None:
                return candidate
        except OSError:
            continue
    return None


def _make_root(root: Path) -> None:
    """Create ``root`` (0700) when it does not exist; check it again when it does (another process, or
    another user, may have created it meanwhile)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = _root_distrust(root)
    if problem is not None:
        raise PermissionError(errno.EACCES, f"not trusted: {problem}", str(root))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(entry: Path) -> Path:
    """Record the size and SHA-256 of the library in the cache entry ``entry`` (at build time)."""
    library = _find_library(entry)
    if library is None:
        raise FileNotFoundError(errno.ENOENT, "no hdkd_fast/_C library", str(entry))
    record = {"library": library.relative_to(entry).as_posix(), "size": library.stat().st_size,
              "sha256": _sha256(library)}
    path = entry / MANIFEST
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def _seal(folder: Path) -> None:
    """Take group and other write permission off a new build (whatever the umask was)."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o022)


def _entry(target: Path) -> tuple[Path | None, str | None]:
    """The library of the cache entry ``target`` when it may be loaded, else why not: ``(library,
    None)``, ``(None, reason)``, or ``(None, None)`` when there is no entry."""
    if not os.path.lexists(target):
        return None, None
    for folder in (target, target / "hdkd_fast"):
        if not os.path.lexists(folder):
            return None, f"{folder} is missing"
        if (problem := _distrust(folder, folder=True)) is not None:
            return None, problem
    library = _find_library(target)
    if library is None:
        return None, f"{target} holds no library"
    if (problem := _distrust(library, folder=False)) is not None:
        return None, problem
    manifest = target / MANIFEST
    if not os.path.lexists(manifest):
        return None, (f"{target} has no {MANIFEST} (the library's size and SHA-256, recorded when hdkd_fast "
                      "builds it)")
    if (problem := _distrust(manifest, folder=False)) is not None:
        return None, problem
    try:
        record = json.loads(manifest.read_text())
        name, size, digest = str(record["library"]), int(record["size"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError):
        return None, f"{manifest} is not a valid manifest"
    if name != library.relative_to(target).as_posix():
        return None, f"{manifest} records {name}, not {library.relative_to(target).as_posix()}"
    actual = library.stat().st_size
    if actual != size:
        return None, f"{library} has {actual} bytes but {size} were built (truncated or changed)"
    if _sha256(library) != digest:
        return None, f"{library} does not have the SHA-256 recorded when it was built (changed)"
    return library, None


def _discard(path: Path) -> None:
    """Remove a refused cache entry or record (first renamed aside: in a trusted cache folder this
    works even when its contents cannot be deleted)."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        aside = path.with_name(f".discarded-{path.name}-{secrets.token_hex(4)}")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink()


def lock_timeout() -> float:
    """Seconds to wait for another process's build lock: ``$HDKD_FAST_LOCK_TIMEOUT``, else
    :data:`DEFAULT_LOCK_TIMEOUT`."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
            if value >= 0:
                return value
        except ValueError:
            pass
        _warn_once(f"hdkd_fast: {LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds >= 0; "
                   f"waiting up to {DEFAULT_LOCK_TIMEOUT:g} s")
    return DEFAULT_LOCK_TIMEOUT


# ---- building ------------------------------------------------------------------------------------


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
            write_text_atomic(failure_log, output)
            return _failed(f"compiling hdkd_fast._C failed (log: {failure_log}); the compiler's last lines:\n{tail}")
        (work / "lib" / "build.log").write_text(output)
        _seal(work / "lib")
        write_manifest(work / "lib")
        os.replace(work / "lib", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    library, problem = _entry(target)
    if library is None:
        return _failed(f"the new build in {target} cannot be trusted ({problem})")
    try:
        module = _load_library(library)
    except ImportError as exc:
        return _failed(f"the new build {library} cannot be loaded ({exc})")
    print(f"hdkd_fast: built hdkd_fast's native kernels in {time.perf_counter() - start:.0f} s: {library}",
          file=sys.stderr, flush=True)
    return Extension(module, BUILD_ON_FIRST_USE, str(library))


def _acquire(lock: FileLock) -> str | None:
    """Take the build lock, waiting up to :func:`lock_timeout` seconds; why not, when it times out."""
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
        return None
    except Timeout:
        pass
    timeout = lock_timeout()
    print(f"hdkd_fast: another process is compiling hdkd_fast's native kernels; waiting for it ({lock.lock_file}, "
          f"up to {timeout:g} s: {LOCK_TIMEOUT_ENV})", file=sys.stderr, flush=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        return (f"waiting for the build lock {lock.lock_file} timed out after {timeout:g} s (another process "
                f"holds it; {LOCK_TIMEOUT_ENV} sets the wait)")
    return None


def _from_cache(build: bool, force: bool = False) -> Extension:
    csrc = sources_dir()
    if csrc is None:
        return _failed(f"hdkd_fast._C cannot be built: its C++ sources are not in this installation "
                       f"(looked in {PACKAGE_DIR})")
    key = cache_key(csrc)
    root = cache_root()
    try:
        problem = _root_distrust(root)
        if problem is not None:
            private = _private_root(root)
            if private is None:
                return _failed(f"the cache {root} is not trusted ({problem}; {CACHE_ENV} sets another) and "
                               "no private folder could be had")
            _warn_once(f"hdkd_fast: not loading nor building hdkd_fast._C in the cache {root}: it is not safe from "
                       f"other users ({problem}); using {private} instead ({CACHE_ENV} sets the cache)")
            root = private
        return _from_root(root, key, csrc, build, force)
    except OSError as exc:
        return _failed(f"the cache of hdkd_fast._C, {root}, cannot be used ({exc}); set {CACHE_ENV} to a folder "
                       "of your own that you can write")


def _from_root(root: Path, key: str, csrc: Path, build: bool, force: bool) -> Extension:
    """The extension from the trusted cache folder ``root``: cached, else built (``build``)."""
    target = root / key
    failure_log = root / f"{key}.failed"
    refused: list[str] = []

    def cached() -> Extension | None:
        library, problem = _entry(target)
        if library is not None:
            try:
                return Extension(_load_library(library), BUILD_ON_FIRST_USE, str(library))
            except ImportError as exc:
                return _failed(f"the cached build {library} cannot be loaded ({exc}); run hdkd-fast build --force")
        if problem is not None:
            refused.append(f"the cached build in {target} is not loaded: {problem}")
            _warn_once(f"hdkd_fast: {refused[-1]}; it is rebuilt")
            return None
        if os.path.lexists(failure_log):
            problem = _distrust(failure_log, folder=False)
            if problem is None:
                return _failed(f"an earlier build of hdkd_fast._C failed (log: {failure_log}; "
                               "hdkd-fast build --force retries)")
            refused.append(f"the record of a failed build {failure_log} is ignored: {problem}")
            _warn_once(f"hdkd_fast: {refused[-1]}")
        return None

    if not force and (found := cached()) is not None:
        return found
    if not build:
        why = f"{refused[0]}; the" if refused else "hdkd_fast._C is not built yet: the"
        return Extension(None, NOT_BUILT, f"{why} first use of backend 'native' compiles it into {root} (or run "
                         "hdkd-fast build)", final=False)
    from filelock import FileLock

    _make_root(root)
    lock_path = root / f"{key}.lock"
    os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600))  # 0600: no other user can hold it
    lock = FileLock(str(lock_path))
    timed_out = _acquire(lock)
    if timed_out is not None:
        return _failed(timed_out)
    try:
        found = None if force else cached()  # built (or failed) by the process that held the lock before us
        if found is not None:
            return found
        _discard(target)  # forced, refused, or half there
        _discard(failure_log)
        return _compile(csrc, target, failure_log)
    finally:
        lock.release()


def extension(build: bool = True, search_cache: bool = True) -> Extension:
    """This process's extension (see the module docstring). ``build=False`` never compiles;
    ``search_cache=False`` only imports an ahead-of-time build (no CUDA query, no file hashing: cheap
    enough for import time). Raises :class:`ExtensionBuildError` when ``HDKD_FAST_REQUIRE_EXT=1`` and
    there is none, and when ``HDKD_FAST_NO_EXT=1`` is set too (except with ``search_cache=False``,
    which leaves that to the next call)."""
    global _state
    if _state is not None:
        return _state
    conflict = spec.env_flag_conflict()
    if conflict is not None:
        if not search_cache:
            return Extension(None, NOT_BUILT, conflict, final=False)
        raise ExtensionBuildError(conflict)
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
