"""The cache of the build on first use (``hdkd_fast/_ext_loader.py``) trusts only what other users cannot
have written, and falls back instead of crashing (issue 22, items 5-8 and 14).

No test compiles the extension: a cache entry is planted under ``tmp_path`` with the key this process
would use (``cache_key``): a tiny shared library whose constructor writes a marker file (so loading it
shows), or a copy of the ahead-of-time build. The in-process tests hide the ahead-of-time build
(``_ahead_of_time``), reset the loader's cached state, and replace the compiler with a stub; the
subprocess tests hide it with ``sys.modules["hdkd_fast._C"] = None``.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import hdkd_fast as hk
from hdkd_fast import _ext_loader as L
from hdkd_fast.backends import native_backend

REPO = Path(__file__).resolve().parents[2]
LIB_NAME = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
CONSTRUCTOR = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("HDKD_FAST_TEST_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""
HIDE_AOT = ("import sys; sys.modules['hdkd_fast._C'] = None; from hdkd_fast.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
FLAGS = ("HDKD_FAST_REQUIRE_EXT", "HDKD_FAST_NO_EXT", "HDKD_FAST_LOCK_TIMEOUT", "HDKD_FAST_CACHE_DIR")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX ownership and modes")


@pytest.fixture(scope="session")
def planted_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared library whose constructor writes the file named by ``$HDKD_FAST_TEST_MARKER``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler for the planted library")
    folder = tmp_path_factory.mktemp("planted")
    (folder / "planted.c").write_text(CONSTRUCTOR)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / LIB_NAME), str(folder / "planted.c")], check=True)
    return folder / LIB_NAME


class Cache:
    """The loader, reset, looking at ``root`` (``$HDKD_FAST_CACHE_DIR``) with a private fallback under
    ``tmp_path``; ``compiled`` lists the targets of the (stubbed) builds."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = tmp_path / "cache"
        self.private = tmp_path / "xdg" / "hdkd_fast"
        self.marker = tmp_path / "marker"
        csrc = L.sources_dir()
        assert csrc is not None
        self.key = L.cache_key(csrc)
        self.compiled: list[Path] = []
        self.loaded: list[Path] = []
        self.monkeypatch = monkeypatch
        for name in FLAGS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HDKD_FAST_CACHE_DIR", str(self.root))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("HDKD_FAST_TEST_MARKER", str(self.marker))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(L, "_state", None)
        monkeypatch.setattr(L, "_warned", set())
        monkeypatch.setattr(L, "_ahead_of_time", lambda: None)
        monkeypatch.setattr(L, "_compile", self._fake_compile)

    def _fake_compile(self, csrc: Path, target: Path, failure_log: Path) -> L.Extension:
        self.compiled.append(target)
        return L.Extension(None, L.NOT_BUILT, "stub build")

    def stub_loading(self) -> None:
        """Record what would be loaded instead of loading it."""
        def load(path: Path) -> ModuleType:
            self.loaded.append(path)
            return ModuleType("hdkd_fast._C")
        self.monkeypatch.setattr(L, "_load_library", load)

    def plant(self, lib: Path, root: Path | None = None, manifest: bool = True) -> Path:
        """``lib`` as the cache entry's library (with a manifest recording it, unless not ``manifest``)."""
        entry = (root or self.root) / self.key
        (entry / "hdkd_fast").mkdir(parents=True)
        shutil.copy(lib, entry / "hdkd_fast" / LIB_NAME)
        if manifest:
            L.write_manifest(entry)
        for path in [root or self.root, entry, *entry.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        return entry / "hdkd_fast" / LIB_NAME

    def lookup(self, build: bool = False) -> tuple[L.Extension, list[str]]:
        """``extension(build)`` afresh, and the warnings it gave."""
        self.monkeypatch.setattr(L, "_state", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = L.extension(build=build)
        return state, [str(w.message) for w in caught]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cache:
    return Cache(tmp_path, monkeypatch)


def _other_uid() -> int:
    if os.geteuid() != 0:
        pytest.skip("only root can give a planted file another owner")
    return 54321


# ---- item 5: planted code does not run --------------------------------------------------------------------------


@pytest.mark.parametrize("owner", ["other user", "this user"])
def test_planted_library_in_a_world_writable_cache_does_not_run(cache: Cache, planted_lib: Path, owner: str) -> None:
    """A shared, world-writable cache (mode 1777 or 777) with another user's library planted under the
    predictable key, manifest and all: it is not loaded, one warning, and the build goes to a private
    folder (created 0700)."""
    library = cache.plant(planted_lib)
    os.chmod(cache.root, 0o777)
    if owner == "other user":
        for path in [cache.root / cache.key, *(cache.root / cache.key).rglob("*")]:
            os.chown(path, _other_uid(), -1)
    state, warned = cache.lookup()
    assert not cache.marker.exists(), "the planted library ran"
    assert state.module is None and not state.final
    assert [w for w in warned if str(cache.root) in w and "not safe from other users" in w and "777" in w], warned
    assert str(cache.private) in state.detail
    state, warned = cache.lookup(build=True)
    assert not cache.marker.exists()
    assert cache.compiled == [cache.private / cache.key]
    assert (cache.private.stat().st_mode & 0o777) == 0o700
    assert library.exists()  # the shared cache is left alone


@pytest.mark.parametrize("loose", ["library", "entry", "entry/hdkd_fast", "manifest", "root"])
def test_group_writable_entry_is_not_loaded(cache: Cache, planted_lib: Path, loose: str) -> None:
    library = cache.plant(planted_lib)
    entry = cache.root / cache.key
    path = {"library": library, "entry": entry, "entry/hdkd_fast": entry / "hdkd_fast",
            "manifest": entry / L.MANIFEST, "root": cache.root}[loose]
    os.chmod(path, (path.stat().st_mode & 0o777) | 0o020)
    state, warned = cache.lookup()
    assert not cache.marker.exists(), "a group-writable library ran"
    assert state.module is None and not state.final
    assert [w for w in warned if str(path) in w and "can be written by its group" in w], warned
    cache.lookup(build=True)
    assert not cache.marker.exists()
    if loose == "root":  # the whole cache is refused: a private folder instead
        assert cache.compiled == [cache.private / cache.key]
    else:  # the cache is ours: the refused entry is moved aside and rebuilt in place
        assert cache.compiled == [entry] and not entry.exists()


def test_entry_of_another_user_is_not_loaded(cache: Cache, planted_lib: Path) -> None:
    library = cache.plant(planted_lib)
    os.chown(library, _other_uid(), -1)
    state, warned = cache.lookup()
    assert not cache.marker.exists() and state.module is None
    assert [w for w in warned if "owned by uid 54321" in w], warned


def test_trusted_entry_with_its_manifest_is_loaded(cache: Cache, planted_lib: Path) -> None:
    """The counterpart: a private cache whose entry matches its manifest is loaded, silently."""
    library = cache.plant(planted_lib)
    cache.stub_loading()
    state, warned = cache.lookup()
    assert cache.loaded == [library] and state.origin == L.BUILD_ON_FIRST_USE and state.detail == str(library)
    assert not warned


@pytest.mark.parametrize("damage", ["no manifest", "truncated", "same size, other bytes", "not json", "symlink"])
def test_entry_that_does_not_match_its_manifest_is_not_loaded(cache: Cache, planted_lib: Path, damage: str) -> None:
    library = cache.plant(planted_lib, manifest=damage != "no manifest")
    manifest = cache.root / cache.key / L.MANIFEST
    if damage == "truncated":
        library.write_bytes(library.read_bytes()[:1000])
    elif damage == "same size, other bytes":
        data = bytearray(library.read_bytes())
        data[-1] ^= 0xFF
        library.write_bytes(bytes(data))
    elif damage == "not json":
        manifest.write_text("{")
    elif damage == "symlink":
        library.rename(library.with_name("real.so"))
        library.symlink_to("real.so")
    cache.stub_loading()
    state, warned = cache.lookup()
    assert not cache.loaded and not cache.marker.exists()
    assert state.module is None and not state.final and "the cached build" in state.detail
    assert [w for w in warned if "is not loaded" in w and "rebuilt" in w], warned
    cache.lookup(build=True)
    assert cache.compiled == [cache.root / cache.key]


def test_untrusted_failure_record_is_ignored(cache: Cache) -> None:
    """A ``<key>.failed`` only others could have written does not switch the kernels off; ours does."""
    cache.root.mkdir(mode=0o700)
    failed = cache.root / f"{cache.key}.failed"
    failed.write_text("planted")
    os.chmod(failed, 0o666)
    state, warned = cache.lookup(build=True)
    assert [w for w in warned if "is ignored" in w and str(failed) in w], warned
    assert cache.compiled == [cache.root / cache.key] and not failed.exists()
    failed.write_text("a real failure")
    os.chmod(failed, 0o644)
    state, warned = cache.lookup(build=True)
    assert [w for w in warned if "an earlier build of hdkd_fast._C failed" in w], warned
    assert cache.compiled == [cache.root / cache.key] and state.final  # not built again


def test_a_build_records_its_manifest_and_takes_write_permission_off(
        cache: Cache, planted_lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``_compile`` (its compiler subprocess replaced), under umask 002: the new entry has a
    manifest matching the library, no group/other write bit anywhere, and a later process loads it."""
    monkeypatch.setattr(L, "_compile", _real_compile)
    cache.stub_loading()

    def fake_build(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        lib = Path(command[command.index("--build-lib") + 1]) / "hdkd_fast"
        lib.mkdir(parents=True)
        shutil.copy(planted_lib, lib / LIB_NAME)
        os.chmod(lib / LIB_NAME, 0o775)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(L.subprocess, "run", fake_build)
    old = os.umask(0o002)
    try:
        state, _ = cache.lookup(build=True)
    finally:
        os.umask(old)
    entry = cache.root / cache.key
    library = entry / "hdkd_fast" / LIB_NAME
    assert state.origin == L.BUILD_ON_FIRST_USE and cache.loaded == [library]
    record = json.loads((entry / L.MANIFEST).read_text())
    assert record["library"] == f"hdkd_fast/{LIB_NAME}" and record["size"] == planted_lib.stat().st_size
    assert all(p.stat().st_mode & 0o022 == 0 for p in [cache.root, entry, *entry.rglob("*")])
    assert (cache.root / f"{cache.key}.lock").stat().st_mode & 0o077 == 0
    cache.loaded.clear()
    state, warned = cache.lookup()
    assert cache.loaded == [library] and not warned


_real_compile = L._compile


# ---- item 6: a truncated library -> warning, no SIGBUS -----------------------------------------------------------


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``hdkd-fast ARGS`` in a subprocess that does not see the ahead-of-time build."""
    return subprocess.run([sys.executable, "-c", HIDE_AOT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _env(cache: Cache, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FLAGS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               HDKD_FAST_CACHE_DIR=str(cache.root), **extra)
    return env


def test_truncated_cached_library_warns_in_hdkd_fast_info(cache: Cache, tmp_path: Path) -> None:
    module = sys.modules.get("hdkd_fast._C")
    aot = Path(getattr(module, "__file__", None) or "")
    if not aot.is_file():
        pytest.skip("needs an ahead-of-time build to plant")
    library = cache.plant(aot)
    good = _cli(["info"], _env(cache), tmp_path)
    assert good.returncode == 0, good.stderr
    assert f"hdkd_fast._C  built on first use for torch {torch.__version__.split('+')[0]}: {library}" in good.stdout
    assert f"cache         {cache.root} (HDKD_FAST_CACHE_DIR)" in good.stdout
    with open(library, "r+b") as f:  # as a full disk or a killed copy leaves it (loading this one: SIGBUS)
        f.truncate(library.stat().st_size // 50)
    bad = _cli(["info"], _env(cache), tmp_path)
    assert bad.returncode == 0, (bad.returncode, bad.stderr)  # was -7 (SIGBUS), nothing printed
    assert "bytes but" in bad.stderr and "truncated" in bad.stderr and "is not loaded" in bad.stderr, bad.stderr
    assert "hdkd_fast._C  the cached build" in bad.stdout and "[auto -> torch; native once built]" in bad.stdout


# ---- item 7: an unusable cache -> warning and "torch" -----------------------------------------------------------


@pytest.mark.parametrize("unusable", ["a file", "under a file", "lock is a folder", "read-only folder"])
def test_unusable_cache_falls_back_to_torch(cache: Cache, monkeypatch: pytest.MonkeyPatch, unusable: str) -> None:
    if unusable == "a file":
        cache.root.write_text("")
    elif unusable == "under a file":
        (cache.root.parent / "file").write_text("")
        monkeypatch.setenv("HDKD_FAST_CACHE_DIR", str(cache.root.parent / "file" / "cache"))
    elif unusable == "lock is a folder":
        (cache.root / f"{cache.key}.lock").mkdir(parents=True)
        os.chmod(cache.root, 0o700)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder (the 'under a file' case covers it)")
        cache.root.parent.chmod(0o500)
    try:
        monkeypatch.setattr(native_backend, "_EXT", L.Extension(None, L.NOT_BUILT, "not loaded yet", final=False))
        monkeypatch.setattr(L, "_state", None)
        g = torch.Generator().manual_seed(0)
        z, y = torch.randn(3, 8, 11, generator=g), torch.randint(11, (8,), generator=g)
        with pytest.warns(RuntimeWarning, match="HDKD_FAST_CACHE_DIR") as caught:
            auto = hk.dense_kd_losses(z, y, backend="auto")
        ours = [str(w.message) for w in caught if "HDKD_FAST_CACHE_DIR" in str(w.message)]
        assert len(ours) == 1 and "'auto' uses 'torch'" in ours[0], ours
        assert not cache.compiled and hk.available_backends("cpu")[0] == "torch"
        reference = hk.dense_kd_losses(z, y, backend="torch")
        torch.testing.assert_close(auto.ce, reference.ce)
        torch.testing.assert_close(auto.kd, reference.kd)
    finally:
        cache.root.parent.chmod(0o700)


def test_unusable_cache_does_not_stop_training(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    """``hdkd-fast train`` refused to start with "...: File exists"; the loader no longer raises."""
    cache.root.write_text("")
    state, warned = cache.lookup(build=True)
    assert state.final and state.module is None and "cannot be used" in state.detail
    assert len([w for w in warned if "HDKD_FAST_CACHE_DIR" in w]) == 1, warned


# ---- the lock ---------------------------------------------------------------------------------------------------


def test_held_lock_times_out_naming_the_lock_file(cache: Cache, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Another process holds ``<key>.lock`` (flock) and never lets go: the wait ends after
    ``$HDKD_FAST_LOCK_TIMEOUT`` seconds with a message naming the lock file, and "torch"."""
    cache.root.mkdir(mode=0o700)
    lock_file = cache.root / f"{cache.key}.lock"
    monkeypatch.setenv("HDKD_FAST_LOCK_TIMEOUT", "0.3")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(120)", str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        state, warned = cache.lookup(build=True)
        assert not cache.compiled and state.final and state.module is None
        assert [w for w in warned if str(lock_file) in w and "timed out after 0.3 s" in w
                and "HDKD_FAST_LOCK_TIMEOUT" in w], warned
        assert "waiting for it" in capsys.readouterr().err
        monkeypatch.setenv("HDKD_FAST_REQUIRE_EXT", "1")
        monkeypatch.setattr(L, "_state", None)
        with pytest.raises(L.ExtensionBuildError, match=str(lock_file)):
            L.extension(build=True)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.delenv("HDKD_FAST_REQUIRE_EXT")
    cache.lookup(build=True)
    assert cache.compiled == [cache.root / cache.key]  # let go: built


def test_lock_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "_warned", set())
    monkeypatch.delenv("HDKD_FAST_LOCK_TIMEOUT", raising=False)
    assert L.lock_timeout() == L.DEFAULT_LOCK_TIMEOUT
    monkeypatch.setenv("HDKD_FAST_LOCK_TIMEOUT", "12.5")
    assert L.lock_timeout() == 12.5
    monkeypatch.setenv("HDKD_FAST_LOCK_TIMEOUT", "soon")
    with pytest.warns(RuntimeWarning, match="HDKD_FAST_LOCK_TIMEOUT"):
        assert L.lock_timeout() == L.DEFAULT_LOCK_TIMEOUT


# ---- items 8 and 14: a required extension that cannot be had -> one line, exit 2 --------------------------------


@pytest.mark.parametrize("command", [["info"], ["bench", "--exits", "2", "--classes", "10", "--no-compile"]])
def test_required_extension_missing_is_one_line_and_exit_2(cache: Cache, tmp_path: Path, command: list[str]) -> None:
    cache.root.mkdir(mode=0o700)
    (cache.root / f"{cache.key}.failed").write_text("the compiler failed\n")
    os.chmod(cache.root / f"{cache.key}.failed", 0o644)
    proc = _cli(command, _env(cache, HDKD_FAST_REQUIRE_EXT="1"), tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith(f"hdkd-fast {command[0]}: error: hdkd_fast._C is required (HDKD_FAST_REQUIRE_EXT=1)")
    assert "an earlier build of hdkd_fast._C failed" in errors[0]
    if command == ["info"]:
        assert proc.stdout.startswith("hdkd_fast  ")


def test_no_ext_with_require_ext_is_refused(cache: Cache, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HDKD_FAST_NO_EXT", "1")
    monkeypatch.setenv("HDKD_FAST_REQUIRE_EXT", "1")
    assert not L.extension(search_cache=False).final  # import time: left to the first use
    with pytest.raises(L.ExtensionBuildError, match="contradict each other"):
        L.extension(build=False)
    with pytest.raises(L.ExtensionBuildError, match="contradict each other"):
        L.build()
    proc = _cli(["info"], _env(cache, HDKD_FAST_REQUIRE_EXT="1", HDKD_FAST_NO_EXT="1"), tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("hdkd-fast info: error: HDKD_FAST_NO_EXT=1 (no extension) and "
                                   "HDKD_FAST_REQUIRE_EXT=1 (the extension is required) contradict each other: "
                                   "unset one")
