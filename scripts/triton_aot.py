"""Compile the Triton kernels ahead of time for an H100/H200 (sm_90) on a machine without a GPU.

    TRITON_INTERPRET=0 python scripts/triton_aot.py [--arch 90] [--json FILE]

No driver is needed: the real launchers of the ``"triton"`` backend (weight folding, exit table, block
sizes) are called on CPU tensors with the kernel objects swapped for recorders; each recorded launch
is specialized as Triton's JIT would specialize it on a GPU (argument types, 16-byte alignment of
pointers and integers, constexprs, ``num_warps``) and compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``. This catches compiled-mode-only errors the interpreter cannot see
(types, layouts, ``tl.dot`` shapes, register allocation) and reports, per variant, the registers,
the spilled bytes (``LOCAL``), the shared memory and the widths of the global loads in the SASS
(read with the ``cuobjdump`` that Triton's wheel carries), all without device time.

Exits 1 when a variant fails to compile. ``tests/integration/test_triton_aot.py`` runs it in CI (the test suite
itself runs Triton under the interpreter, so the compile needs a process of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot: unset TRITON_INTERPRET (or set it to 0): interpreted kernels cannot be compiled")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a source checkout: import this tree's hdkd_fast
    sys.path.insert(0, str(ROOT))

import hdkd_fast as hk  # noqa: E402
from hdkd_fast.backends import triton_backend as TB  # noqa: E402

TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
            torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


@dataclass(frozen=True)
class Variant:
    """One launch configuration, named like the GPU check's cases."""

    op: str  # "fwd" (losses, optionally the gradient) or "jvp"
    dtype: torch.dtype
    k: int
    c: int
    b: int = 16
    temperature: float = 4.0
    detach_teacher: bool = True
    target: bool = True
    grad: bool = True
    listed: bool = False

    @property
    def name(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        flags = [f"T{self.temperature:g}", "detached" if self.detach_teacher else "teacher-grad",
                 "labels" if self.target else "no-labels", "list" if self.listed else "stacked"]
        if self.op == "fwd":
            flags.insert(0, "grad" if self.grad else "loss-only")
        return f"{self.op} {dt} K={self.k} C={self.c} " + " ".join(flags)


VARIANTS = [
    Variant("fwd", torch.bfloat16, 8, 1000),
    Variant("fwd", torch.bfloat16, 8, 1000, detach_teacher=False),
    Variant("fwd", torch.bfloat16, 8, 1000, grad=False),
    Variant("fwd", torch.float16, 32, 32000, listed=True),
    Variant("fwd", torch.float32, 2, 10, temperature=1.0),
    Variant("fwd", torch.float32, 33, 128, target=False),
    Variant("fwd", torch.float64, 7, 100),
    Variant("jvp", torch.bfloat16, 8, 1000),
    Variant("jvp", torch.float32, 16, 1001, detach_teacher=False, listed=True),
]
"""Every kernel, each input dtype, K padded to 16, 32 and 64, every constexpr branch (T = 1, no labels,
loss-only, teacher gradient), aligned and unaligned rows (C = 1000 vs 10 / 1001), stacked and list
inputs: 9 compiles, about 1.5 s each on one core."""


@dataclass
class Result:
    variant: str
    kernel: str = ""
    ok: bool = False
    seconds: float = 0.0
    num_warps: int = 0
    registers: int | None = None
    local_bytes: int | None = None  # spills (and other local memory) per thread
    shared_bytes: int | None = None
    global_loads: dict[str, int] = field(default_factory=dict)  # SASS LDG forms -> count
    specialization: str = ""
    error: str = ""


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.launches: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append((args, kwargs))
        return launch


def _record(variant: Variant) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Call the backend's launcher for ``variant`` on CPU tensors; return ``(kernel, args, kwargs)``."""
    v = variant
    fwd = v.op == "fwd"
    mod, attr = (TB.dense_kd_fwd, "_dense_kd_fwd_kernel") if fwd else (TB.dense_kd_jvp, "_dense_kd_jvp_kernel")
    real = getattr(mod, attr)
    recorder = _Recorder(real)
    setattr(mod, attr, recorder)
    try:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(v.k, v.b, v.c, generator=g).to(v.dtype)
        x: Any = [t.clone() for t in z.unbind(0)] if v.listed else z
        y = torch.randint(0, v.c, (v.b,), generator=g) if v.target else None
        mask = hk.pair_mask("dense", v.k, detach_teacher=v.detach_teacher)
        opts: dict[str, Any] = dict(temperature=v.temperature, mask=mask, detach_teacher=v.detach_teacher,
                                    ignore_index=-100, reduction="mean")
        if fwd:
            ce_w = torch.ones(v.k, dtype=torch.float64) if v.target else None
            TB.losses_and_grad(x, y, ce_w, torch.ones(v.k, v.k, dtype=torch.float64), compute_grad=v.grad, **opts)
        else:
            dz = [t.clone() for t in z.unbind(0)] if v.listed else z.clone()
            TB.jvp(x, dz, y, **opts)
    finally:
        setattr(mod, attr, real)
    if len(recorder.launches) != 1:
        raise RuntimeError(f"expected one launch of {attr}, recorded {len(recorder.launches)}")
    args, kwargs = recorder.launches[0]
    return real, args, kwargs


def _specialize(fn: Any, target: GPUTarget, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[ASTSource, dict[str, Any], str]:
    """``(source, options, how)``: the launch specialized as the JIT would do it on a GPU of ``target``.

    Uses Triton's own binder (``create_function_from_signature`` and ``JITFunction._pack_args``, as
    ``JITFunction.run`` does) where this Triton has them; otherwise a plain mapping (tensor -> pointer
    of its dtype, int -> i32/i64, 16-divisibility of pointers and ints)."""
    from triton.compiler import make_backend

    backend = make_backend(target)
    try:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        return ASTSource(fn, signature, constexprs, attrs), options.__dict__, "triton binder"
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    option_names = {"num_warps", "num_stages", "num_ctas", "maxnreg"}
    options = {k: v for k, v in kwargs.items() if k in option_names}
    values = dict(zip(fn.arg_names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k not in option_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TL_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    return ASTSource(fn, signature, constexprs, attrs), options, "plain mapping"


def _cuobjdump() -> str | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _resources(cubin: bytes, result: Result) -> None:
    """Registers, local and shared bytes, and the SASS global-load forms of a cubin (cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", fh.name], capture_output=True, text=True).stdout
    for key, attr in (("REG", "registers"), ("LOCAL", "local_bytes"), ("SHARED", "shared_bytes")):
        m = re.search(rf"\b{key}:(\d+)", usage)
        if m:
            setattr(result, attr, int(m.group(1)))
    result.global_loads = dict(Counter(re.findall(r"\bLDG(?:\.[A-Z0-9_]+)*", sass)))


def compile_variant(variant: Variant, arch: int = 90) -> Result:
    result = Result(variant.name)
    start = time.perf_counter()
    try:
        fn, args, kwargs = _record(variant)
        result.kernel = fn.__name__
        target = GPUTarget("cuda", arch, 32)
        src, options, how = _specialize(fn, target, args, kwargs)
        result.specialization = how
        result.num_warps = int(options.get("num_warps", 4))
        compiled = triton.compile(src, target=target, options=options)
        if "ld.global" not in compiled.asm["ptx"]:
            raise RuntimeError("the PTX holds no global load")
        _resources(compiled.asm["cubin"], result)
        result.ok = True
    except Exception as exc:  # a report per variant: one failure must not hide the others
        result.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def format_table(results: list[Result], arch: int) -> str:
    lines = [f"Triton {triton.__version__} kernels compiled offline for sm_{arch} (no driver)",
             "| variant | ok | s | warps | regs | local B | shared B | global loads (SASS) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        loads = ", ".join(f"{k}×{n}" for k, n in sorted(r.global_loads.items()))
        cells = [r.variant, "yes" if r.ok else "FAIL", f"{r.seconds:.1f}", str(r.num_warps),
                 *("" if v is None else str(v) for v in (r.registers, r.local_bytes, r.shared_bytes)), loads]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"FAIL {r.variant}: {r.error}" for r in results if not r.ok]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (default 90)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = [compile_variant(v, args.arch) for v in VARIANTS]
    print(format_table(results, args.arch))
    if args.json is not None:
        args.json.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch,
                                         "results": [asdict(r) for r in results]}, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
