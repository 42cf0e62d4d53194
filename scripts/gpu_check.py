"""The stages of the GPU check after the build (run by ``scripts/gpu_check.sh``; issue 13).

    python scripts/gpu_check.py --out DIR [--dry-run] [--budget-s S] [--workers N]
                                [--build-status pass|fail|skipped] [--build-seconds S] [--build-note TEXT]

Each stage is timed, gets a share of the remaining budget (printed), and is wrapped so that a failing
stage is reported and the later ones still run:

- ``environment``: versions, the GPU, what ``hdkd_fast._C`` was built with (``hdkd_fast.info``), the
  backends and Liger-Kernel; fails when the fused backends the check needs are missing;
- ``tests``: every backend available on the device against the float64 loop reference
  (``tests/support/gpu_checks.py``: losses, gradients and JVPs, fp32/bf16/fp16, stacked and list inputs, every
  pair mode, ``detach_teacher=False``, ignore_index rows, K and C sweeps), in spawned worker processes
  (parallel Triton compiles; a crashing kernel takes down a worker, not the check); cases not started
  when the stage's budget runs out are reported as "not run";
- ``hdkd_step``: ``HDKD.step`` with hypergrad jvp, fd and exact for every backend (same workers);
- ``train_cli``: ``hdkd-fast train --method hdkd`` for one short epoch with bf16 autocast, in a
  subprocess, into a temporary directory;
- ``bench``: ``pytest bench/test_bench_dense_kd.py --full`` (``--tiny`` in the dry run) with
  ``--budget-s``, writing ``DIR/bench.json``; then the floors, peak memory and targets of
  ``bench/report.py``; then, on the time left, ``pytest bench/test_bench_fused_linear.py`` (the fused LM-head
  op against the materialized path, ``DIR/fused_linear.json``).

Writes ``DIR/gpu_check.json`` (everything) and ``DIR/gpu_check.md`` (the report), prints the report's
summary last, and exits 1 when a stage failed. ``--dry-run`` runs the same stages on the CPU with tiny
shapes (Triton under the interpreter: the caller sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package tests.support (gpu_checks, float64_reference), here and in the workers
    sys.path.insert(0, str(ROOT))

SHARES = {"environment": 0.02, "tests": 0.30, "hdkd_step": 0.06, "train_cli": 0.10, "bench": 1.0}
"""Each stage's share of the budget left when it starts (the last stage takes the rest)."""
RESERVE_S = 10.0
"""Kept back for writing the report."""


@dataclass
class Stage:
    name: str
    status: str = "skipped"  # pass, fail, error, skipped
    seconds: float = 0.0
    budget_s: float | None = None
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# worker processes


def _worker_init(device_type: str) -> None:
    import torch

    torch.set_num_threads(1 if device_type == "cpu" else 2)


def _call_name(call: tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]) -> str:
    first = call[1][0] if call[1] else call[0]
    return str(getattr(first, "name", getattr(first, "__name__", first)))


class Workers:
    """Spawned worker processes, kept across stages (each imports torch and hdkd_fast once)."""

    def __init__(self, count: int, device_type: str) -> None:
        self.count = count
        self.device_type = device_type
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(self.device_type,))
        return self._pool

    def close(self, terminate: bool = False) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() drops them
        pool.shutdown(wait=not terminate, cancel_futures=True)
        if terminate:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()

    def run(self, calls: list[tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]], *, deadline: float,
            label: str) -> list[dict[str, Any]]:
        """``fn(*args)`` for every call, in the workers (in this process when there is one worker), until
        ``deadline`` (time.monotonic): calls not started by then are reported as ``not run``; calls still
        running 30 s later are abandoned and the workers terminated (new ones start for the next stage)."""
        results: list[dict[str, Any] | None] = [None] * len(calls)
        start, last_print = time.monotonic(), 0.0
        counts: Counter[str] = Counter()

        def record(i: int, row: dict[str, Any]) -> None:
            nonlocal last_print
            results[i] = row
            counts[row.get("status", "error")] += 1
            if row.get("status") != "pass":
                log(f"[{label}] {str(row.get('status', 'error')).upper()} {row.get('name', _call_name(calls[i]))}: "
                    f"{str(row.get('message', ''))[-600:]}")
            done = sum(counts.values())
            if time.monotonic() - last_print > 10 or done == len(calls):
                last_print = time.monotonic()
                log(f"[{label}] {done}/{len(calls)} done ({dict(counts)}) after {time.monotonic() - start:.0f} s")

        if self.count <= 1:
            for i, (fn, args) in enumerate(calls):
                if time.monotonic() > deadline:
                    break
                record(i, fn(*args))
        else:
            pool = self.pool()
            futures: dict[Future[dict[str, Any]], int] = {pool.submit(fn, *args): i
                                                           for i, (fn, args) in enumerate(calls)}
            pending = set(futures)
            abandoned = False
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    if deadline == math.inf or abandoned:
                        abandoned = True
                        break
                    for fut in pending:
                        fut.cancel()
                    pending = {f for f in pending if not f.cancelled()}
                    deadline, abandoned = time.monotonic() + 30.0, True  # grace for the calls already running
                    continue
                done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    if fut.cancelled():
                        continue
                    try:
                        record(i, fut.result())
                    except Exception as exc:  # BrokenProcessPool: a worker died (segfault, abort)
                        record(i, {"name": _call_name(calls[i]), "status": "error",
                                   "message": f"worker process failed: {type(exc).__name__}: {exc}"})
                        abandoned = True
            if abandoned:
                self.close(terminate=True)
        return [row if row is not None else {"name": _call_name(calls[i]), "status": "not run",
                                             "message": "stage budget spent"}
                for i, row in enumerate(results)]


# ------------------------------------------------------------------------------------------------
# stages


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = bool(args.dry_run)
        self.out = Path(args.out)
        self.started = time.monotonic()
        self.deadline = self.started + float(args.budget_s)
        self.stages: list[Stage] = []
        self.data: dict[str, Any] = {}
        import torch

        self.device_type = "cpu" if self.dry or not torch.cuda.is_available() else "cuda"
        self.workers = args.workers or (2 if self.dry else min(6, os.cpu_count() or 1))
        self.pool = Workers(self.workers, self.device_type)

    def backends(self) -> list[str]:
        import torch

        from hdkd_fast.backends import available_backends, runnable_backends

        # the dry run adds what runs only when named (Triton under the interpreter, never "auto" on the CPU)
        return (runnable_backends if self.dry else available_backends)(torch.device(self.device_type))

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        log(f"gpu_check: {'DRY RUN (CPU, tiny shapes, Triton interpreter)' if self.dry else 'GPU run'}; "
            f"device {self.device_type}; budget {self.args.budget_s:.0f} s; {self.workers} worker processes")
        self.stages.append(Stage("build", self.args.build_status, float(self.args.build_seconds), None,
                                 self.args.build_note))
        order = [("environment", self.environment), ("tests", self.tests), ("hdkd_step", self.hdkd_step),
                 ("train_cli", self.train_cli), ("bench", self.bench)]
        for n, (name, fn) in enumerate(order):
            left = self.deadline - time.monotonic() - RESERVE_S
            share = SHARES[name] if n < len(order) - 1 else 1.0
            budget = max(0.0, left * share)
            stage = Stage(name, budget_s=round(budget, 1))
            if name in ("train_cli", "bench"):
                self.pool.close()  # idle workers would hold device memory (a CUDA context each) during the bench
            log(f"\n== stage {name}: budget {budget:.0f} s (of {max(left, 0):.0f} s left)")
            start = time.monotonic()
            try:
                ok, stage.summary = fn(stage, start + budget)
                stage.status = "pass" if ok else "fail"
            except Exception as exc:
                stage.status = "error"
                stage.summary = f"{type(exc).__name__}: {exc}"
                stage.details["traceback"] = traceback.format_exc()
                log(stage.details["traceback"])
            stage.seconds = round(time.monotonic() - start, 1)
            log(f"== stage {name}: {stage.status.upper()} in {stage.seconds:.1f} s: {stage.summary}")
            self.stages.append(stage)
        self.pool.close()
        self.write()
        return 0 if all(s.status in ("pass", "skipped") for s in self.stages if s.name != "build") \
            and self.args.build_status != "fail" else 1

    # -- environment --------------------------------------------------------------------------
    def environment(self, stage: Stage, deadline: float) -> tuple[bool, str]:
        import torch

        import hdkd_fast
        from hdkd_fast import info
        from hdkd_fast.bench import liger_unavailable_reason

        data = info.collect()
        try:
            import triton

            data["triton"] = triton.__version__
        except Exception as exc:
            data["triton"] = f"unavailable ({exc})"
        data["hdkd_fast_path"] = str(Path(hdkd_fast.__file__).parent)
        data["liger"] = liger_unavailable_reason(torch.device(self.device_type)) or "available"
        if self.device_type == "cuda":
            props = torch.cuda.get_device_properties(0)
            data["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                           "memory_gib": round(props.total_memory / 2**30, 1),
                           "multiprocessors": props.multi_processor_count}
        data["backends_checked"] = self.backends()
        stage.details = data
        self.data["environment"] = data
        log(info.format_info(data))
        log(f"hdkd_fast from {data['hdkd_fast_path']}; triton {data['triton']}; liger: {data['liger']}; "
            f"backends checked on {self.device_type}: {data['backends_checked']}")
        needed = {"native", "torch"} | ({"triton"} if self.device_type == "cuda" or self.dry else set())
        missing = sorted(needed - set(data["backends_checked"]))
        if missing:
            return False, f"backends missing on {self.device_type}: {missing} (see the build stage / hdkd_fast.info)"
        return True, f"{data.get('gpu', {}).get('name', 'CPU')}; backends {data['backends_checked']}"

    # -- tests ----------------------------------------------------------------------------------
    def tests(self, stage: Stage, deadline: float) -> tuple[bool, str]:
        from tests.support import gpu_checks

        cases = gpu_checks.cases(self.backends(), self.device_type, tiny=self.dry)
        log(f"{len(cases)} cases; tolerances {gpu_checks.TOLERANCES}")
        rows = self.pool.run([(gpu_checks.run_case, (case, self.device_type)) for case in cases],
                             deadline=deadline, label="tests")
        self.data["tests"] = rows
        counts = Counter(r["status"] for r in rows)
        stage.details = {"counts": dict(counts),
                         "worst": {f"{b} {d}": w for (b, d), w in _worst_errors(rows).items()}}
        bad = counts["fail"] + counts["error"]
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return bad == 0 and counts["pass"] > 0, f"{len(rows)} cases: {summary}"

    # -- HDKD.step ------------------------------------------------------------------------------
    def hdkd_step(self, stage: Stage, deadline: float) -> tuple[bool, str]:
        from tests.support import gpu_checks

        calls = [(gpu_checks.check_hdkd_step, (backend, self.device_type), {"tiny": self.dry})
                 for backend in self.backends()]
        rows = self.pool.run([(_call_kw, call) for call in calls], deadline=deadline, label="hdkd_step")
        self.data["hdkd_step"] = rows
        for row in rows:
            log(f"{row.get('name')}: {row['status']} {row.get('errors', {})} {row.get('seconds', '')} s")
        ok = all(r["status"] == "pass" for r in rows)
        return ok, "; ".join(f"{r.get('backend', '?')}: {r['status']}" for r in rows)

    # -- training CLI ---------------------------------------------------------------------------
    def train_cli(self, stage: Stage, deadline: float) -> tuple[bool, str]:
        limit, batch = ("96", "32") if self.dry else ("2000", "64")
        with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
            run_dir = Path(tmp) / "hdkd"
            cmd = [sys.executable, "-P", "-m", "hdkd_fast", "train", "--method", "hdkd", "--epochs", "1",
                   "--limit", limit, "--batch-size", batch, "--device", self.device_type, "--amp", "bf16",
                   "--no-progress", "--out", str(run_dir)]
            log("$ " + " ".join(cmd))
            timeout = max(30.0, deadline - time.monotonic() + 60)
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
            except subprocess.TimeoutExpired as exc:
                stage.details = {"output": str(exc.stdout or "")[-3000:]}
                return False, f"timed out after {timeout:.0f} s"
            output = (done.stdout + done.stderr)[-4000:]
            log(output[-2500:])
            stage.details = {"returncode": done.returncode, "output": output}
            if done.returncode != 0:
                return False, f"exit code {done.returncode}"
            from hdkd_fast.training.report import read_final, read_metrics

            metrics = read_metrics(run_dir)
            final = read_final(run_dir)
        last = metrics[-1] if metrics else {}
        loss = last.get("train/loss")
        top1 = final.get("test/top1")
        stage.details.update(train_loss=loss, test_top1=top1, epochs=len(metrics))
        finite = isinstance(loss, int | float) and math.isfinite(loss)
        return finite, (f"1 epoch, {limit} images, bf16 autocast on {self.device_type}: train loss {loss}, "
                        f"test top-1 per exit {top1}")

    # -- bench ----------------------------------------------------------------------------------
    def bench(self, stage: Stage, deadline: float) -> tuple[bool, str]:
        report = _load_report()
        json_path = self.out / "bench.json"
        # 85 % of the stage for the dense-KD grid, the rest for the fused LM-head op; 25 s for pytest start-up,
        # the JSON and the last case
        budget = max(5.0, 0.85 * (deadline - time.monotonic()) - 25)
        cmd = [sys.executable, "-P", "-m", "pytest", str(ROOT / "bench" / "test_bench_dense_kd.py"), "-q",
               "-p", "no:cacheprovider", "--tiny" if self.dry else "--full", "--budget-s", f"{budget:.0f}",
               "--benchmark-json", str(json_path), "--benchmark-columns", "median,rounds,iterations", "-rs"]
        log("$ " + " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=budget + 150)
            output, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            output, rc = str(exc.stdout or ""), -1
        lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith(("test_", "-----", "Name "))]
        log("\n".join(lines[-40:]))
        stage.details = {"returncode": rc, "pytest_tail": "\n".join(lines[-60:])}
        if not json_path.exists():
            return False, f"pytest exit code {rc}, no {json_path.name}"
        run = json.loads(json_path.read_text())
        shape = dict(main=(8, 10), big_k=8, big_c=10, dtype="float32") if self.dry else {}
        rows = report.targets(run, **shape)
        bw = report.copy_bandwidth(run)
        self.data["bench"] = {"bandwidth_bytes_per_s": bw, "targets": rows, "floor_table": report.floor_table(run),
                              "targets_table": report.format_targets(rows), "benchmarks": len(run["benchmarks"]),
                              "target_shapes": shape or "issue 13 (K=8/32, C=1000/128256, bf16, B=4096)"}
        passed = Counter({True: "pass", False: "fail", None: "not measured"}[r["passed"]] for r in rows)
        summary = (f"{len(run['benchmarks'])} benchmarks, copy {bw / 1e9 if bw else 0:.0f} GB/s; targets: "
                   + ", ".join(f"{n} {s}" for s, n in sorted(passed.items())) + f"; pytest exit code {rc}")
        fused_ok, fused_summary = self._bench_fused_linear(deadline)
        return rc == 0 and fused_ok, summary + "; " + fused_summary

    def _bench_fused_linear(self, deadline: float) -> tuple[bool, str]:
        """``pytest bench/test_bench_fused_linear.py`` (``--full`` on the GPU, ``--tiny`` in the dry run) on the
        time left, writing ``DIR/fused_linear.json``: time and peak extra memory of the fused LM-head op against
        the materialized path and the per-pair loop (issue 14's GPU rows)."""
        json_path = self.out / "fused_linear.json"
        budget = deadline - time.monotonic() - 10
        if budget < 5:
            self.data["fused_linear"] = []
            return True, "fused linear: no time left"
        cmd = [sys.executable, "-P", "-m", "pytest", str(ROOT / "bench" / "test_bench_fused_linear.py"), "-q",
               "-p", "no:cacheprovider", "--tiny" if self.dry else "--full", "--budget-s", f"{budget:.0f}",
               "--benchmark-json", str(json_path), "-rs"]
        log("$ " + " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=budget + 60)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, output = -1, str(exc.stdout or "")
        log("\n".join(output.splitlines()[-20:]))
        runs = json.loads(json_path.read_text())["benchmarks"] if json_path.exists() else []
        self.data["fused_linear"] = [
            {**{k: b["extra_info"].get(k) for k in ("impl", "K", "N", "V", "H", "dtype", "peak_extra_bytes")},
             "median_s": b["stats"]["median"]} for b in runs]
        return rc in (0, 5), f"fused linear: {len(runs)} benchmarks, pytest exit code {rc}"

    # -- report ---------------------------------------------------------------------------------
    def write(self) -> None:
        total = time.monotonic() - self.started + sum(s.seconds for s in self.stages if s.name == "build")
        meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": self.dry,
                "device": self.device_type, "host": platform.node(), "python": sys.version.split()[0],
                "budget_s": self.args.budget_s, "elapsed_s": round(total, 1), "workers": self.workers,
                "command": " ".join(sys.argv)}
        doc = {"meta": meta, "stages": [asdict(s) for s in self.stages], **self.data}
        try:
            (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
        except Exception:  # the markdown report must still be written
            log(traceback.format_exc())
        md = self.markdown(meta)
        (self.out / "gpu_check.md").write_text(md)
        log("\n" + md.split("\n## Bench: floors")[0])  # the floor table is long: in the file only
        log(f"\nreports: {self.out / 'gpu_check.md'}, {self.out / 'gpu_check.json'}")

    def markdown(self, meta: dict[str, Any]) -> str:
        env = self.data.get("environment", {})
        gpu = env.get("gpu", {}).get("name", "no GPU (CPU)")
        title = "hdkd_fast GPU check" + (" — DRY RUN (CPU, tiny shapes; numbers not meaningful)" if self.dry else "")
        out = [f"# {title}", "",
               f"{meta['date']}; device {meta['device']} ({gpu}); torch {env.get('torch', '?')}, "
               f"triton {env.get('triton', '?')}, python {meta['python']}; elapsed {meta['elapsed_s']} s of a "
               f"{meta['budget_s']:.0f} s budget (build included); `{meta['command']}`", "",
               "## Stages", "", "| stage | result | seconds | budget s | summary |", "|---|---|---:|---:|---|"]
        for s in self.stages:
            budget = "" if s.budget_s is None else f"{s.budget_s:.0f}"
            out.append(f"| {s.name} | {s.status.upper()} | {s.seconds:.1f} | {budget} | {s.summary} |")
        bench = self.data.get("bench")
        out += ["", "## Targets", ""]
        out.append(bench["targets_table"] if bench else "(the bench stage wrote no results)")
        hd = self.data.get("hdkd_step", [])
        if hd:
            out += ["", "## HDKD.step (hypergradients against exact)", "", "| case | result | errors | s |",
                    "|---|---|---|---:|"]
            out += [f"| {r.get('name')} | {r['status']} | {_fmt_errors(r.get('errors', {}))} | {r.get('seconds', '')} |"
                    for r in hd]
        tests = self.data.get("tests", [])
        out += ["", "## Test cases", ""]
        if tests:
            out += ["Worst normwise error per backend and dtype (tolerances: "
                    + ", ".join(f"{k} {v:g}" for k, v in _tolerances().items()) + "):", "",
                    "| backend | dtype | cases | pass | losses | reduced | loss | grad | jvp |",
                    "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for (backend, dtype), worst in sorted(_worst_errors(tests).items()):
                n = [r for r in tests if r.get("backend") == backend and r.get("dtype") == dtype]
                cells = [f"{worst[key]:.2e}" if key in worst else "" for key in ("losses", "reduced", "loss", "grad",
                                                                                 "jvp")]
                out.append(f"| {backend} | {dtype} | {len(n)} | {sum(r['status'] == 'pass' for r in n)} | "
                           + " | ".join(cells) + " |")
            bad = [r for r in tests if r["status"] != "pass"]
            out += ["", f"Cases not passing: {len(bad)}", ""]
            out += [f"- {r['status'].upper()} {r.get('name')}: {_fmt_errors(r.get('errors', {}))} "
                    f"{str(r.get('message', '')).splitlines()[-1] if r.get('message') else ''}" for r in bad[:60]]
        if bench:
            out += ["", "## Bench: floors and peak memory", "", bench["floor_table"]]
        fused = self.data.get("fused_linear")
        if fused:
            out += ["", "## Fused linear dense KD (LM head): time and peak extra memory", "",
                    "| impl | K | N | V | H | dtype | median ms | peak extra GB |", "|---|---|---|---|---|---|---|---|"]
            out += [f"| {r['impl']} | {r['K']} | {r['N']} | {r['V']} | {r['H']} | {r['dtype']} | "
                    f"{1e3 * r['median_s']:.2f} | "
                    + ("" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 1e9:.2f}") + " |"
                    for r in fused]
        return "\n".join(out) + "\n"


def _call_kw(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return fn(*args, **kwargs)


def _tolerances() -> dict[str, float]:
    from tests.support import gpu_checks

    return dict(gpu_checks.TOLERANCES)


def _fmt_errors(errors: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2e}" for k, v in errors.items())


def _worst_errors(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    worst: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        for key, err in r.get("errors", {}).items():
            slot = worst[(r.get("backend", "?"), r.get("dtype", "?"))]
            slot[key] = max(slot.get(key, 0.0), err)
    return dict(worst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--budget-s", type=float, default=400.0, help="for every stage here together")
    parser.add_argument("--workers", type=int, default=0, help="worker processes of the tests (0: auto)")
    parser.add_argument("--build-status", default="skipped")
    parser.add_argument("--build-seconds", type=float, default=0.0)
    parser.add_argument("--build-note", default="")
    return Check(parser.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
