"""``hdkd-fast info`` (also ``python -m hdkd_fast.info``): versions, devices, and what this
installation compiled.

Prints the hdkd_fast / Python / torch versions, the CPU and GPUs torch sees, the compiled extension
``hdkd_fast._C`` (how it was built: ahead of time, on first use and where, or not yet and why; its CPU
instruction-set variants and the one in use, clamped to what the CPU supports; its CUDA kernels) and,
per device type, the available backends in ``backend="auto"`` order. It never compiles anything: where
the extension is not built yet, it says so and what ``auto`` will pick once it is. Where it is required
(``HDKD_FAST_REQUIRE_EXT=1``) but cannot be had, it prints the versions, then one line on stderr, and
exits with status 2.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from ._ext_loader import CACHE_ENV, ExtensionBuildError, cache_root
from ._version import __version__
from .backends import auto_order, backend_names, unavailable_reason
from .backends import native_backend as _native


def collect() -> dict[str, Any]:
    """Everything :func:`main` prints, as a dict."""
    info: dict[str, Any] = {
        **_versions(),
        "cpu": {
            "machine": platform.machine(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
        "gpus": [],
        "extension": _native.build_info(),
        "backends": {},
    }
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({
                "index": i,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            })
        devices.append(torch.device("cuda"))
    for dev in devices:
        unavailable = {name: reason for name in backend_names() if (reason := _reason(name, dev, info["extension"]))}
        order = auto_order(dev)
        info["backends"][dev.type] = {
            "available": [name for name in order if name not in unavailable],
            "after_build": [name for name in order if name not in unavailable or name == _native.NAME],
            "unavailable": unavailable,
        }
    return info


def _reason(name: str, device: torch.device, extension: dict[str, Any]) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (without building the extension)."""
    if name == _native.NAME and extension["pending"]:
        return str(extension["detail"])
    return unavailable_reason(name, device)


def format_info(info: dict[str, Any]) -> str:
    lines = [
        *_version_lines(info),
        f"cpu        {info['cpu']['machine']}, torch capability {info['cpu']['torch_cpu_capability']}, "
        f"{info['cpu']['threads']} threads",
    ]
    if info["gpus"]:
        for gpu in info["gpus"]:
            lines.append(f"gpu {gpu['index']}      {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB)")
    else:
        lines.append("gpu        none visible")
    lines += extension_lines(info["extension"])
    for dev, backends in info["backends"].items():
        auto = backends["available"][0]
        pending = backends["after_build"][0] != auto
        lines.append(f"backends ({dev}): {', '.join(backends['available'])}  [auto -> {auto}"
                     + (f"; {backends['after_build'][0]} once built]" if pending else "]"))
        for name, reason in backends["unavailable"].items():
            lines.append(f"  {name}: unavailable: {reason}")
    return "\n".join(lines)


def extension_lines(ext: dict[str, Any]) -> list[str]:
    if not ext["built"]:
        return [f"hdkd_fast._C  {ext['detail']}"]
    lines = [f"hdkd_fast._C  {ext['origin']} for torch {ext['torch_version']}: {ext['path']}"]
    if ext["origin"] != "ahead of time":
        source = "HDKD_FAST_CACHE_DIR" if os.environ.get(CACHE_ENV) else "default; HDKD_FAST_CACHE_DIR overrides"
        used = Path(ext["path"]).parents[2]  # <cache>/<key>/hdkd_fast/_C*.so
        if used != cache_root():
            source = f"a private folder: {cache_root()} ({source}) is not trusted"
        lines.append(f"  cache         {used} ({source})")
    use, asked, cpu = ext["cpu_capability"], ext["requested_cpu_capability"], ext["supported_cpu_capability"]
    note = f"torch asks for {asked}, this CPU supports {cpu}"
    if _rank(asked) > _rank(cpu):
        note += f": clamped to {use} (ATEN_CPU_CAPABILITY asks for more than the CPU has)"
    lines.append(f"  CPU kernels   variants {', '.join(ext['compiled_cpu_capabilities'])}; in use: {use} ({note})")
    if ext["with_cuda"]:
        lines.append(f"  CUDA kernels  archs {ext['cuda_archs']}; {ext['cuda_info']}")
    else:
        lines.append("  CUDA kernels  not built")
    return lines


_CPU_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def _rank(capability: str) -> int:
    return _CPU_CAPABILITIES.index(capability) if capability in _CPU_CAPABILITIES else 0


def main() -> int:
    try:
        info = collect()
    except ExtensionBuildError as exc:
        print("\n".join(_version_lines(_versions())))
        print(f"hdkd-fast info: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_info(info))
    return 0


def _versions() -> dict[str, Any]:
    return {"hdkd_fast": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda}


def _version_lines(info: dict[str, Any]) -> list[str]:
    return [
        f"hdkd_fast  {info['hdkd_fast']}",
        f"python     {info['python']}  ({info['platform']})",
        f"torch      {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
