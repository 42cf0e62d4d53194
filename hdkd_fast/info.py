"""``python -m hdkd_fast.info``: versions, devices, and what this installation compiled.

Prints the hdkd_fast / Python / torch versions, the CPU and GPUs torch sees, the compiled extension
``hdkd_fast._C`` (path, CPU instruction-set variants, CUDA kernels and their architectures, or why it
is missing) and the backends available for each device type, in ``backend="auto"`` order.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from . import __version__
from .backends import BACKENDS, _unavailable_reason, available_backends
from .backends import native_backend as _native


def collect() -> dict[str, Any]:
    """Everything :func:`main` prints, as a dict."""
    info: dict[str, Any] = {
        "hdkd_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
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
        info["backends"][dev.type] = {
            "available": available_backends(dev),
            "unavailable": {
                name: reason for name in BACKENDS if (reason := _unavailable_reason(name, dev)) is not None
            },
        }
    return info


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"hdkd_fast  {info['hdkd_fast']}",
        f"python     {info['python']}  ({info['platform']})",
        f"torch      {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})",
        f"cpu        {info['cpu']['machine']}, torch capability {info['cpu']['torch_cpu_capability']}, "
        f"{info['cpu']['threads']} threads",
    ]
    if info["gpus"]:
        for gpu in info["gpus"]:
            lines.append(f"gpu {gpu['index']}      {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB)")
    else:
        lines.append("gpu        none visible")
    ext = info["extension"]
    if ext["built"]:
        lines.append(f"hdkd_fast._C  built for torch {ext['torch_version']}: {ext['path']}")
        lines.append(
            f"  CPU kernels   variants {', '.join(ext['compiled_cpu_capabilities'])}; in use: {ext['cpu_capability']}"
        )
        if ext["with_cuda"]:
            lines.append(f"  CUDA kernels  archs {ext['cuda_archs']}; {ext['cuda_info']}")
        else:
            lines.append("  CUDA kernels  not built")
        if "error" in ext:
            lines.append(f"  unusable: {ext['error']}")
    else:
        lines.append(f"hdkd_fast._C  not built: {ext['error']}")
    for dev, backends in info["backends"].items():
        lines.append(f"backends ({dev}): {', '.join(backends['available'])}  [auto -> {backends['available'][0]}]")
        for name, reason in backends["unavailable"].items():
            lines.append(f"  {name}: unavailable: {reason}")
    return "\n".join(lines)


def main() -> None:
    print(format_info(collect()))


if __name__ == "__main__":
    main()
