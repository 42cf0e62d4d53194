"""Correctness checks of every backend on one device against the float64 loop reference, for
``scripts/gpu_check.py`` (the GPU check of ``scripts/gpu_check.sh``; ``--dry-run``: the CPU, tiny shapes).

Not a pytest module (no ``test_`` prefix): the driver runs the cases in worker processes, each case
returning one result row with its measured errors, so that a run on a lent GPU reports numbers, not
only pass/fail. ``tests/integration/test_gpu_check.py`` runs the whole script's dry run in the test suite.

**Cases** (:func:`cases`), for every backend available on the device:

- a *mode sweep* at one moderate shape: every dtype (fp32, bf16, fp16) × input layout (one stacked
  ``Tensor[K, B, C]`` or a list of K separately allocated ``Tensor[B, C]``) × pair selection ("dense",
  "last", "adjacent", a random mask) × ``detach_teacher`` (the dry run keeps a covering subset);
- a *shape sweep*: every K in :data:`K_GPU` × every C in :data:`C_GPU` with as many rows as
  :data:`ELEMENT_BUDGET` allows (at most :data:`MAX_ROWS`), the other factors cycling;
- a batch whose every row is ``ignore_index``.

Every case has ignored rows (``ignore_index`` is -100 or, in every third case, a class index), a
temperature out of (4, 1, 2.5) and a reduction out of (mean, sum, none), and checks, in one process:

1. per-row losses (``reduction="none"``) against the reference on sampled rows;
2. the reduced losses (mean or sum) against the reference (all rows sampled) or against the library's
   own per-row losses reduced in float64 (large batches);
3. the reverse-mode gradient on the sampled rows: ``dense_kd`` with random weights (mean: the gradient
   computed in the forward), or the backward of ``dense_kd_losses`` (sum, none: per-objective and
   per-row cotangents). The reference gradient is rounded to the input dtype before the comparison,
   so fp16's subnormal gradients (C = 262144) compare what the format can hold;
4. the JVP of every objective (``torch.func.jvp``) on the sampled rows.

Rows are independent, so the reference (tests/support/float64_reference.py, plain loops) runs on at most
:data:`SAMPLE_ROWS` sampled rows (the first, the last, ignored ones, random ones) in float64 on the
device. Errors are normwise, ‖got − want‖ / ‖want‖, against :data:`TOLERANCES`; a NaN or Inf anywhere
in an output fails the case. Before each library call the device's caching allocator is handed a
NaN-filled block of the output's size, so an output element that is never written shows as NaN.
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

import hdkd_fast as hk
from tests.support import float64_reference as R

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("stacked", "list")
PAIRS = ("dense", "last", "adjacent", "random")
TEMPERATURES = (4.0, 1.0, 2.5)
REDUCTIONS = ("mean", "sum", "none")
K_GPU = (1, 2, 7, 8, 16, 32)
C_GPU = (10, 1000, 32000, 128256, 262144)
K_TINY = (1, 2, 7)
C_TINY = (10, 37)
MAX_ROWS = 8192
ELEMENT_BUDGET = 2**27
"""K·B·C of one shape-sweep case on a GPU (0.5 GiB of fp32 logits): several worker processes share
the card, and the torch backend keeps a few fp32 copies of the logits."""
SAMPLE_ROWS = 16
TOLERANCES = {
    "losses": 2e-4,  # fp32 accumulation against float64 on the same (rounded) inputs
    "reduced": 2e-4,
    "loss": 2e-4,
    "jvp": 5e-4,
    "grad_float32": 1e-4,
    "grad_float16": 2e-3,  # output rounded to fp16 (unit roundoff 4.9e-4), compared with the rounded reference
    "grad_bfloat16": 1e-2,  # unit roundoff 3.9e-3
    "hypergrad_jvp": 1e-6,  # float64 models: jvp and exact agree to round-off
    "hypergrad_fd": 3e-3,  # one-sided difference of the logits: O(eps) truncation (~8e-4 at these sizes)
}


@dataclass(frozen=True)
class Case:
    backend: str
    dtype: str
    k: int
    c: int
    b: int
    pairs: str
    detach_teacher: bool
    layout: str
    temperature: float
    ignore_index: int
    reduction: str
    all_ignored: bool = False
    sweep: str = "mode"

    @property
    def name(self) -> str:
        flags = [self.pairs, "detached" if self.detach_teacher else "teacher-grad", self.layout,
                 f"T={self.temperature:g}", f"ii={self.ignore_index}", self.reduction]
        if self.all_ignored:
            flags.append("all-ignored")
        return f"{self.backend} {self.dtype} K={self.k} B={self.b} C={self.c} " + " ".join(flags)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


def cases(backends: Sequence[str], device_type: str, *, tiny: bool) -> list[Case]:
    """Every case, in the order to run them: cheap and broad first, then growing shapes."""
    mode_shape = (3, 4, 21) if tiny else (7, 256, 1000)  # (K, B, C)
    ks, cs = (K_TINY, C_TINY) if tiny else (K_GPU, C_GPU)
    modes = list(itertools.product(DTYPES, LAYOUTS, PAIRS, (True, False)))
    if tiny:  # a covering subset: every pair selection, dtype, layout and teacher mode
        modes = [(DTYPES[n % 3], LAYOUTS[n % 2], PAIRS[n % 4], n not in (1, 3, 4)) for n in range(6)]
    out: list[Case] = []
    for backend in backends:
        k, b, c = mode_shape
        out.append(Case(backend, "float32", k=k, c=c, b=b, pairs="dense", detach_teacher=True, layout="stacked",
                        temperature=2.0, ignore_index=-100, reduction="mean", all_ignored=True, sweep="ignored"))
        for n, (dtype, layout, pairs, detach) in enumerate(modes):
            out.append(Case(backend, dtype, k=k, c=c, b=b, pairs=pairs, detach_teacher=detach, layout=layout,
                            temperature=TEMPERATURES[n % 3], ignore_index=_ignore_index(n, c),
                            reduction=REDUCTIONS[n % 3]))
    shapes = sorted(itertools.product(ks, cs), key=lambda kc: kc[0] * kc[1])
    for n, (k, c) in enumerate(shapes):
        b = 4 if tiny else max(2, min(MAX_ROWS, ELEMENT_BUDGET // (k * c)))
        for m, backend in enumerate(backends):
            i = n + m
            out.append(Case(backend, DTYPES[i % 3], k=k, c=c, b=b, pairs=PAIRS[i % 4],
                            detach_teacher=(i // 2) % 2 == 0, layout=LAYOUTS[i % 2],
                            temperature=TEMPERATURES[i % 3], ignore_index=_ignore_index(i, c),
                            reduction=REDUCTIONS[(i + 1) % 3], sweep="shape"))
    return out


def _ignore_index(n: int, c: int) -> int:
    return min(3, c - 1) if n % 3 == 2 else -100


# --------------------------------------------------------------------------------------------------
# one case


def rel(got: Tensor, want: Tensor) -> float:
    """Normwise relative error in float64 (``inf`` when ``got`` holds a NaN or Inf)."""
    got, want = got.double().flatten(), want.double().flatten().to(got.device)
    if not bool(torch.isfinite(got).all()):
        return math.inf
    denom = float(want.detach().norm())
    diff = float((got - want).detach().norm())
    return diff / denom if denom > 0 else diff


def _poison(device: torch.device, numel: int, dtype: torch.dtype) -> None:
    """Leave a NaN-filled block of ``numel`` elements in the caching allocator (CUDA), so that the next
    allocation of that size likely reuses it: unwritten outputs then read as NaN."""
    if device.type == "cuda" and dtype.is_floating_point:
        torch.full((numel,), float("nan"), dtype=dtype, device=device)


def _all_finite(*tensors: Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def run_case(case: Case, device_type: str) -> dict[str, Any]:
    """Run one case; returns its result row (``status``: pass, fail or error)."""
    device = torch.device(device_type)
    start = time.perf_counter()
    row: dict[str, Any] = {"name": case.name, **asdict(case), "status": "error", "errors": {}, "message": ""}
    try:
        errors, notes = _check(case, device)
        row["errors"] = errors
        bad = [key for key, err in errors.items() if not err <= _tolerance(key, case.dtype)]
        row["status"] = "fail" if bad else "pass"
        row["message"] = "; ".join([f"{key} error {errors[key]:.3g} > {_tolerance(key, case.dtype):.3g}"
                                    for key in bad] + notes)
    except Exception as exc:
        row["message"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the memory back to the other worker processes
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _tolerance(key: str, dtype: str) -> float:
    return TOLERANCES[f"grad_{dtype}"] if key == "grad" else TOLERANCES[key]


def _check(case: Case, device: torch.device) -> tuple[dict[str, float], list[str]]:
    k, b, c, t = case.k, case.b, case.c, case.temperature
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(case.seed)
    gd = torch.Generator(device=device).manual_seed(case.seed)
    z = torch.randn(k, b, c, generator=gd, device=device, dtype=dtype).mul_(3)
    y = torch.randint(0, c, (b,), generator=gd, device=device)
    n_ignored = b if case.all_ignored else max(1, b // 8)
    ignored = torch.randperm(b, generator=g)[:n_ignored]
    y[ignored.to(device)] = case.ignore_index
    if b <= 2 * SAMPLE_ROWS:
        rows = torch.arange(b)
    else:
        pick = torch.cat([torch.tensor([0, b - 1]), ignored[:2], torch.randperm(b, generator=g)[:SAMPLE_ROWS - 4]])
        rows = torch.unique(pick)
    rows_d = rows.to(device)
    if case.pairs == "random":
        m = (torch.rand(k, k, generator=g) < 0.5) & ~torch.eye(k, dtype=torch.bool)
        pairs: Any = torch.triu(m, diagonal=1) if case.detach_teacher else m
        mask = pairs.tolist()
    else:
        pairs = case.pairs
        mask = R.masks(k)[case.pairs]
    common = dict(temperature=t, pairs=pairs, detach_teacher=case.detach_teacher, ignore_index=case.ignore_index,
                  backend=case.backend)
    ref_opts = dict(temperature=t, mask=mask, detach_teacher=case.detach_teacher, ignore_index=case.ignore_index)
    z_s = z[:, rows_d].double()
    y_s = y[rows_d]
    dz = torch.randn(k, b, c, generator=gd, device=device, dtype=dtype)
    dz_s = dz[:, rows_d].double()
    if case.layout == "list":  # K separate allocations, read in place by the fused backends
        exits = [z[e].clone() for e in range(k)]
        tangents = [dz[e].clone() for e in range(k)]
        del z, dz
        inp: Any = exits
        tan: Any = tangents
    else:
        inp, tan = z, dz

    def sample(x: Tensor) -> Tensor:  # [.., B] -> [.., S]
        return x.index_select(-1, rows_d)

    errors: dict[str, float] = {}
    notes: list[str] = []
    ref_device = device

    def reference(fn: Callable[[torch.device], Any]) -> Any:
        """The float64 reference on the device, or on the CPU if it cannot run there."""
        nonlocal ref_device
        try:
            return fn(ref_device)
        except RuntimeError as exc:
            if ref_device.type == "cpu":
                raise
            notes.append(f"reference on the CPU ({str(exc).splitlines()[0][:120]})")
            ref_device = torch.device("cpu")
            return fn(ref_device)

    # 1. per-row losses
    _poison(device, k * k * b, torch.float32)
    with torch.no_grad():
        rows_out = hk.dense_kd_losses(inp, y, reduction="none", **common)
    assert rows_out.ce is not None
    ce_ref, kd_ref = reference(lambda d: R.losses(z_s.to(d), y_s.to(d), reduction="none", **ref_opts))
    if not _all_finite(rows_out.ce, rows_out.kd):
        errors["losses"] = math.inf
    else:
        errors["losses"] = rel(torch.cat([sample(rows_out.ce).flatten(), sample(rows_out.kd).flatten()]),
                               torch.cat([ce_ref.flatten(), kd_ref.flatten()]))

    # 2. reduced losses
    red = "sum" if case.reduction == "sum" else "mean"
    with torch.no_grad():
        reduced = hk.dense_kd_losses(inp, y, reduction=red, **common)
    assert reduced.ce is not None
    n_valid = max(int((y != case.ignore_index).sum()), 1)
    scale_ce, scale_kd = (1.0, 1.0) if red == "sum" else (1.0 / n_valid, 1.0 / b)
    if len(rows) == b:  # every row went through the reference
        want_ce, want_kd = ce_ref.sum(-1) * scale_ce, kd_ref.sum(-1) * scale_kd
    else:  # the library's own rows, reduced in float64 (checks the reduction of a large batch)
        want_ce, want_kd = rows_out.ce.double().sum(-1) * scale_ce, rows_out.kd.double().sum(-1) * scale_kd
    errors["reduced"] = rel(torch.cat([reduced.ce.flatten(), reduced.kd.flatten()]),
                            torch.cat([want_ce.flatten(), want_kd.flatten()]))

    # 3. reverse mode
    alpha = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    gamma = torch.rand(k, k, generator=g, dtype=torch.float64) + 0.5
    leaves = [x.detach().requires_grad_() for x in (inp if case.layout == "list" else [inp])]
    x_in: Any = leaves if case.layout == "list" else leaves[0]
    _poison(device, k * b * c, dtype)
    if case.reduction == "mean":  # the fused path: gradient computed in the forward
        loss = hk.dense_kd(x_in, y, ce_weight=alpha.float().to(device), kd_weight=gamma.float().to(device),
                           **common)
        w_ce = (alpha * scale_ce)[:, None].expand(k, len(rows))
        w_kd = (gamma * scale_kd)[:, :, None].expand(k, k, len(rows))
        want_loss = (alpha.to(device) * reduced.ce.double()).sum() + (gamma.to(device) * reduced.kd.double()).sum()
        errors["loss"] = rel(loss.detach().reshape(1), want_loss.reshape(1))
    else:  # the backward of the per-objective losses
        out = hk.dense_kd_losses(x_in, y, reduction=case.reduction, **common)
        assert out.ce is not None
        if case.reduction == "sum":
            cot_ce, cot_kd = alpha, gamma
            w_ce, w_kd = alpha[:, None].expand(k, len(rows)), gamma[:, :, None].expand(k, k, len(rows))
        else:
            cot_ce = torch.rand(k, b, generator=g, dtype=torch.float64)
            cot_kd = torch.rand(k, k, b, generator=g, dtype=torch.float64)
            w_ce, w_kd = cot_ce[:, rows], cot_kd[:, :, rows]
        loss = (out.ce * cot_ce.to(device, out.ce.dtype)).sum() + (out.kd * cot_kd.to(device, out.kd.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    grad = torch.stack(grads) if case.layout == "list" else grads[0]
    if grad.dtype != dtype:
        notes.append(f"gradient dtype {grad.dtype}, expected {dtype}")
        errors["grad_dtype"] = math.inf
    if not _all_finite(grad):
        errors["grad"] = math.inf
    else:
        def ref_grad(d: torch.device) -> Tensor:
            zz = z_s.to(d).requires_grad_()
            ce_r, kd_r = R.losses(zz, y_s.to(d), reduction="none", **ref_opts)
            total = (w_ce.to(d) * ce_r).sum() + (w_kd.to(d) * kd_r).sum()
            return torch.autograd.grad(total, zz)[0]

        want = reference(ref_grad).to(dtype)  # rounded to the input dtype, as the library's output is
        errors["grad"] = rel(grad.index_select(1, rows_d), want)
    del grads, grad, leaves, x_in, loss

    # 4. forward mode
    def lib(*xs: Tensor) -> tuple[Tensor, Tensor]:
        o = hk.dense_kd_losses(list(xs) if case.layout == "list" else xs[0], y, reduction="none", **common)
        assert o.ce is not None
        return o.ce, o.kd

    primals = tuple(inp) if case.layout == "list" else (inp,)
    tangent_in = tuple(tan) if case.layout == "list" else (tan,)
    _, (dce, dkd) = torch.func.jvp(lib, primals, tangent_in)

    def ref_jvp(d: torch.device) -> tuple[Tensor, Tensor]:
        y_d = y_s.to(d)
        _, out = torch.func.jvp(lambda zz: R.losses(zz, y_d, reduction="none", **ref_opts),
                                (z_s.to(d),), (dz_s.to(d),))
        return out

    dce_ref, dkd_ref = reference(ref_jvp)
    if not _all_finite(dce, dkd):
        errors["jvp"] = math.inf
    else:
        errors["jvp"] = rel(torch.cat([sample(dce).flatten(), sample(dkd).flatten()]),
                            torch.cat([dce_ref.flatten(), dkd_ref.flatten()]))
    return errors, notes


# --------------------------------------------------------------------------------------------------
# HDKD.step


class MultiExitMLP(torch.nn.Module):
    """K blocks ``Linear → tanh``, each followed by a ``Linear`` exit (as in bench/test_bench_hdkd.py)."""

    def __init__(self, k: int, d: int, h: int, c: int) -> None:
        super().__init__()
        self.num_exits = k
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d if i == 0 else h, h), torch.nn.Tanh())
                                          for i in range(k))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(h, c) for _ in range(k))

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            out.append(head(x))
        return out


def check_hdkd_step(backend: str, device_type: str, *, tiny: bool) -> dict[str, Any]:
    """``HDKD.step`` with ``hypergrad`` jvp, fd and exact on float64 models: the three hypergradients
    agree (the jvp and fd ones against exact), and two steps of each mode change the model and φ and
    stay finite."""
    device = torch.device(device_type)
    start = time.perf_counter()
    k, d, h, c, b = (3, 5, 8, 6, 7) if tiny else (6, 64, 128, 100, 256)
    row: dict[str, Any] = {"name": f"HDKD.step {backend} K={k} B={b} C={c} float64", "backend": backend,
                           "status": "error", "errors": {}, "message": ""}
    try:
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(b, d, generator=g, dtype=torch.float64).to(device),
                 torch.randint(0, c, (b,), generator=g).to(device)) for _ in range(3)]
        hypergrads: dict[str, Tensor] = {}
        problems: list[str] = []
        shift: Tensor | None = None
        for mode in ("exact", "jvp", "fd"):
            torch.manual_seed(1)
            model = MultiExitMLP(k, d, h, c).double().to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            hdkd = hk.HDKD(model, opt, criterion=hk.DenseKD(temperature=2.0, backend=backend), hypergrad=mode)
            if shift is None:  # the same non-uniform weights for every mode
                shift = 0.3 * torch.randn(hdkd.weights.phi.shape, generator=g, dtype=torch.float64).to(device)
            with torch.no_grad():
                hdkd.weights.phi.add_(shift)
            (hypergrads[mode],) = hdkd.hypergradient(*data[0], *data[1])
            before = [p.detach().clone() for p in model.parameters()]
            phi_before = hdkd.weights.phi.detach().clone()
            for _ in range(1 if tiny else 2):
                stats = hdkd.step(*data[1], *data[2])
                if not all(math.isfinite(v) for v in stats.values()):
                    problems.append(f"{mode}: non-finite step statistics")
            moved = any(not torch.equal(p0, p.detach()) for p0, p in zip(before, model.parameters(), strict=True))
            if not moved or torch.equal(phi_before, hdkd.weights.phi.detach()):
                problems.append(f"{mode}: the step left the model or φ unchanged")
        exact = hypergrads["exact"]
        row["errors"] = {"hypergrad_jvp": rel(hypergrads["jvp"], exact), "hypergrad_fd": rel(hypergrads["fd"], exact)}
        problems += [f"{key} error {err:.3g} > {TOLERANCES[key]:.3g}" for key, err in row["errors"].items()
                     if not err <= TOLERANCES[key]]
        row["status"] = "fail" if problems else "pass"
        row["message"] = "; ".join(problems)
    except Exception as exc:
        row["message"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row
