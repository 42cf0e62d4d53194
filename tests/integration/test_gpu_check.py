"""The GPU check of issue 13 (scripts/gpu_check.sh) cannot rot: its ``--dry-run`` runs every stage on the
CPU with tiny shapes (Triton under the interpreter) and must write both reports with every stage; the
target evaluation of bench/report.py is checked on a synthetic GPU run with the real target shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("build", "environment", "tests", "hdkd_step", "train_cli", "bench")


def _module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path: Path) -> None:
    for name in ("triton", "sklearn", "pytest_benchmark"):
        pytest.importorskip(name)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    start = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - start
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    files = sorted(p.name for p in out.iterdir())
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log", "bench.json"} <= set(files), files
    assert len(files) <= 8, files  # what comes back from a device run
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["meta"]["dry_run"] is True
    stages = {s["name"]: s for s in report["stages"]}
    assert tuple(stages) == STAGES
    assert stages["build"]["status"] == "skipped"
    for name in STAGES[1:]:
        assert stages[name]["status"] == "pass", stages[name]
        assert stages[name]["budget_s"] is not None and stages[name]["seconds"] >= 0
    # the tests stage: every backend, dtype, layout, pair mode and teacher mode, all passing
    rows = report["tests"]
    assert rows and all(r["status"] == "pass" for r in rows)
    for key, values in (("backend", {"native", "torch", "triton"}), ("dtype", {"float32", "bfloat16", "float16"}),
                        ("layout", {"stacked", "list"}), ("pairs", {"dense", "last", "adjacent", "random"}),
                        ("detach_teacher", {True, False}), ("reduction", {"mean", "sum", "none"})):
        assert {r[key] for r in rows} == values, key
    assert any(r["all_ignored"] for r in rows)
    assert all({"losses", "reduced", "grad", "jvp"} <= set(r["errors"]) for r in rows)
    assert {r["backend"] for r in report["hdkd_step"]} == {"native", "torch", "triton"}
    bench = report["bench"]
    assert bench["bandwidth_bytes_per_s"] > 0 and bench["benchmarks"] > 0 and bench["targets"]
    md = (out / "gpu_check.md").read_text()
    for name in STAGES:
        assert f"| {name} | " in md, name
    assert "## Targets" in md and "DRY RUN" in md
    fused = report["fused_linear"]  # the fused LM-head op's rows, after the dense-KD grid
    assert (out / "fused_linear.json").exists() and {r["impl"] for r in fused} >= {"fused", "materialized"}, fused
    assert all(r["median_s"] > 0 for r in fused) and "## Fused linear dense KD (LM head)" in md
    log = (out / "gpu_check.log").read_text()
    for name in STAGES[1:]:
        assert f"== stage {name}: PASS in" in log, name
    assert seconds < 300, f"the dry run took {seconds:.0f} s"


def _bench(impl: str, k: int, c: int, seconds: float, *, dtype: str = "torch.bfloat16", b: int = 4096,
           mode: str = "forward_backward", peak: float | None = None) -> dict[str, Any]:
    n = k * b * c * 2
    info = dict(impl=impl, mode=mode, K=k, B=b, C=c, dtype=dtype, device="cuda", inner=1, logits_bytes=n,
                grad_bytes=n)
    if peak is not None:
        info["peak_extra_bytes"] = peak * n
    return {"group": f"g {mode} {k} {c} {dtype}", "extra_info": info, "stats": {"median": seconds}}


def test_targets_of_a_synthetic_gpu_run() -> None:
    report = _module(ROOT / "bench" / "report.py", "bench_report_for_test")
    bw = 3e12
    floor_main = 3 * 8 * 4096 * 1000 * 2 / bw  # 2 reads + 1 write of bf16 logits
    benchmarks = [{"group": "copy", "extra_info": {"impl": "copy", "bytes_moved": 3e9}, "stats": {"median": 1e-3}},
                  _bench("triton", 8, 1000, 1.4 * floor_main, peak=1.1),
                  _bench("native", 8, 1000, 1.6 * floor_main, peak=2.0),
                  _bench("reference", 8, 1000, 20 * floor_main),
                  _bench("reference_compiled", 8, 1000, 5 * floor_main),
                  _bench("liger", 8, 1000, 3 * floor_main),
                  _bench("triton", 32, 1000, 1.9 * 4 * floor_main),
                  _bench("triton", 2, 1000, 1.0), _bench("liger", 2, 1000, 0.5),  # slower than liger at K = 2
                  _bench("native", 2, 1000, 0.1)]
    run = {"benchmarks": benchmarks}
    assert report.copy_bandwidth(run) == pytest.approx(bw)
    rows = {(r["backend"], r["target"]): r for r in report.targets(run)}
    main = "K=8 C=1000 bfloat16 fwd+bwd"
    t = {name: rows[("triton", f"{main}: {name}")] for name in (
        ">= 10x the eager loop", ">= 3x the torch.compile", "within 1.5x the HBM floor",
        "extra peak memory <= 1.2x the gradient")}
    assert t[">= 10x the eager loop"]["measured"] == pytest.approx(20 / 1.4)
    assert t[">= 10x the eager loop"]["passed"] is True
    assert t[">= 3x the torch.compile"]["passed"] is True  # 5 / 1.4 = 3.6
    assert t["within 1.5x the HBM floor"]["measured"] == pytest.approx(1.4)
    assert t["within 1.5x the HBM floor"]["passed"] is True
    assert t["extra peak memory <= 1.2x the gradient"]["passed"] is True
    assert rows[("native", f"{main}: >= 3x the torch.compile")]["passed"] is True  # 5 / 1.6 = 3.1
    assert rows[("native", f"{main}: within 1.5x the HBM floor")]["passed"] is False
    assert rows[("native", f"{main}: extra peak memory <= 1.2x the gradient")]["passed"] is False
    k32 = rows[("triton", "K=32 C=1000 bfloat16 fwd+bwd: within 2x the HBM floor")]
    assert k32["measured"] == pytest.approx(1.9) and k32["passed"] is True
    assert rows[("triton", "K=8 C=128256 bfloat16 fwd+bwd: within 2x the HBM floor")]["passed"] is None
    liger = "C=1000 bfloat16 fwd+bwd: faster than Liger's KL pair by pair at every K >= 2"
    assert rows[("triton", liger)]["passed"] is False and rows[("triton", liger)]["measured"] == pytest.approx(0.5)
    assert rows[("native", liger)]["passed"] is True
    table = report.format_targets(report.targets(run))
    assert "| FAIL |" in table and "| PASS |" in table and "| not measured |" in table
    assert "÷ floor" in report.floor_table(run)


def test_workers_report_calls_past_the_deadline_as_not_run() -> None:
    driver = _module(ROOT / "scripts" / "gpu_check.py", "gpu_check_driver_for_test")
    workers = driver.Workers(1, "cpu")
    calls = [(dict, ()), (dict, ())]
    rows = workers.run(calls, deadline=time.monotonic() - 1, label="t")
    assert [r["status"] for r in rows] == ["not run", "not run"]
