"""Print the ratio tables of a ``pytest bench/ --benchmark-json RUN.json`` run as Markdown.

Usage: ``python bench/report.py RUN.json``. For every benchmark group, the median time of each
implementation and its speed-up over the readable reference loop (``reference``) and over the
``"torch"`` backend; groups with a ``softmax_pass`` also give each time as a multiple of it.

When the run measured the copy bandwidth (``test_copy_bandwidth``), it also prints :func:`floor_table`
(each case against its memory floor, with peak memory) and, for a CUDA run, :func:`format_targets` (the
GPU targets of issue 13 with measured value and pass/fail); ``scripts/gpu_check.py`` uses the same
functions.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

FUSED = ("triton", "native")
"""The fused backends the targets are about."""
PEERS = ("reference", "reference_compiled", "liger", "torch")


def main(path: str) -> None:
    with open(path) as fh:
        run = json.load(fh)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in run["benchmarks"]:
        if bench["extra_info"].get("impl") != "copy":
            groups[bench["group"]][bench["extra_info"]["impl"]] = bench["stats"]["median"]
    print(f"machine: {run['machine_info'].get('cpu', {}).get('brand_raw', '?')}; "
          f"date: {run['datetime']}; torch-bench commit: {run.get('commit_info', {}).get('id', '?')[:10]}\n")
    print("| group | impl | median ms | × vs reference | × vs torch backend | × softmax pass |")
    print("|---|---|---:|---:|---:|---:|")
    for group in sorted(groups):
        times = groups[group]
        ref, torch_b = times.get("reference"), times.get("torch")
        floor = _softmax_floor(groups, group)
        for impl, t in sorted(times.items(), key=lambda kv: kv[1]):
            cols = [f"{t * 1e3:.3f}",
                    f"{ref / t:.2f}" if ref else "",
                    f"{torch_b / t:.2f}" if torch_b else "",
                    f"{t / floor:.2f}" if floor else ""]
            print(f"| {group} | {impl} | " + " | ".join(cols) + " |")
    if copy_bandwidth(run) is not None:
        print("\n" + floor_table(run))
        if any(b["extra_info"].get("device") == "cuda" for b in run["benchmarks"]):
            print("\n" + format_targets(targets(run)))


def _softmax_floor(groups: dict[str, dict[str, float]], group: str) -> float | None:
    """The softmax pass lives in the forward group of the same shape."""
    twin = group.replace("forward_backward", "forward")
    return groups.get(twin, {}).get("softmax_pass")


# ------------------------------------------------------------------------------------------------
# GPU: floors, peak memory, targets


def copy_bandwidth(run: dict[str, Any]) -> float | None:
    """Bytes read + written per second of the run's ``test_copy_bandwidth`` (median), if measured."""
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if info.get("impl") == "copy":
            return float(info["bytes_moved"]) / float(bench["stats"]["median"])
    return None


def cases(run: dict[str, Any]) -> dict[tuple[str, int, int, str], dict[str, dict[str, Any]]]:
    """``(mode, K, C, dtype) -> impl -> {"s": median seconds, "peak": bytes | None, ...extra_info}``."""
    out: dict[tuple[str, int, int, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if info.get("impl") in (None, "copy"):
            continue
        key = (info["mode"], int(info["K"]), int(info["C"]), info["dtype"].removeprefix("torch."))
        out[key][info["impl"]] = {**info, "s": float(bench["stats"]["median"]),
                                  "peak": info.get("peak_extra_bytes")}
    return out


def floor_seconds(case: dict[str, Any], bandwidth: float) -> float:
    """HBM floor of one call: the logits read twice (+ the gradient written once for forward+backward)
    over the measured copy bandwidth."""
    passes = 3 if case["mode"] == "forward_backward" else 2
    return passes * float(case["logits_bytes"]) / bandwidth


def floor_table(run: dict[str, Any]) -> str:
    """Per case: each implementation's median, × over the loop / compiled loop / Liger, ÷ the floor, and
    its peak extra memory ÷ the gradient's bytes; the fastest backend of each case is marked."""
    bw = copy_bandwidth(run)
    if bw is None:
        return "(no copy bandwidth in this run: no floors)"
    lines = [f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s; floor = (2 reads [+ 1 gradient write]) "
             "× K·B·C·itemsize ÷ that bandwidth",
             "",
             "| mode | K | C | dtype | impl | median ms | × loop | × compiled | × liger | ÷ floor "
             "| peak extra ÷ grad |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    table = cases(run)
    for key in sorted(table):
        impls = table[key]
        mode, k, c, dtype = key
        backends = [i for i in impls if i in (*FUSED, "torch")]
        fastest = min(backends, key=lambda i: impls[i]["s"]) if backends else None
        for impl, case in sorted(impls.items(), key=lambda kv: kv[1]["s"]):
            t = case["s"]
            ratios = [f"{impls[p]['s'] / t:.2f}" if p in impls else "" for p in ("reference", "reference_compiled",
                                                                                   "liger")]
            floor = f"{t / floor_seconds(case, bw):.2f}" if "logits_bytes" in case else ""
            peak = case.get("peak")
            mem = f"{peak / case['grad_bytes']:.2f}" if peak is not None and case.get("grad_bytes") else ""
            name = f"**{impl}**" if impl == fastest else impl
            lines.append(f"| {mode} | {k} | {c} | {dtype} | {name} | {t * 1e3:.3f} | " + " | ".join(ratios)
                         + f" | {floor} | {mem} |")
    return "\n".join(lines)


def targets(run: dict[str, Any], *, main: tuple[int, int] = (8, 1000), big_k: int = 32, big_c: int = 128256,
            dtype: str = "bfloat16") -> list[dict[str, Any]]:
    """The targets of issue 13 for each fused backend in the run: one row each with ``target``,
    ``backend``, ``measured`` (a number or None), ``required``, ``passed`` (True, False, or None when
    not measured) and ``note``. All at B of the run, ``dtype``, forward+backward; ``main`` = (K, C)."""
    bw = copy_bandwidth(run)
    table = cases(run)
    fb = "forward_backward"
    k0, c0 = main
    group = table.get((fb, k0, c0, dtype), {})
    present = sorted({impl for impls in table.values() for impl in impls if impl in FUSED})
    rows: list[dict[str, Any]] = []

    def add(target: str, backend: str, measured: float | None, required: str, ok: bool | None, note: str) -> None:
        rows.append(dict(target=target, backend=backend, measured=measured, required=required, passed=ok,
                         note=note))

    def vs_floor(case: dict[str, Any] | None, limit: float, target: str, backend: str) -> None:
        if case is None or bw is None:
            add(target, backend, None, f"<= {limit}", None, "not measured" + ("" if bw else " (no bandwidth)"))
            return
        ratio = case["s"] / floor_seconds(case, bw)
        add(target, backend, ratio, f"<= {limit}", ratio <= limit,
            f"{case['s'] * 1e3:.3f} ms vs floor {floor_seconds(case, bw) * 1e3:.3f} ms")

    for backend in present or list(FUSED):
        mine = group.get(backend)
        name = f"K={k0} C={c0} {dtype} fwd+bwd"
        for peer, factor, label in (("reference", 10.0, "eager loop"), ("reference_compiled", 3.0, "torch.compile")):
            other = group.get(peer)
            if mine is None or other is None:
                add(f"{name}: >= {factor:g}x the {label}", backend, None, f">= {factor:g}", None,
                    f"not measured ({backend if mine is None else peer} missing)")
            else:
                speedup = other["s"] / mine["s"]
                add(f"{name}: >= {factor:g}x the {label}", backend, speedup, f">= {factor:g}", speedup >= factor,
                    f"{mine['s'] * 1e3:.3f} ms vs {other['s'] * 1e3:.3f} ms")
        vs_floor(mine, 1.5, f"{name}: within 1.5x the HBM floor", backend)
        if mine is None or mine.get("peak") is None:
            add(f"{name}: extra peak memory <= 1.2x the gradient", backend, None, "<= 1.2", None, "not measured")
        else:
            ratio = mine["peak"] / mine["grad_bytes"]
            add(f"{name}: extra peak memory <= 1.2x the gradient", backend, ratio, "<= 1.2", ratio <= 1.2,
                f"{mine['peak'] / 2**20:.1f} MiB vs gradient {mine['grad_bytes'] / 2**20:.1f} MiB")
        for k, c in dict.fromkeys(((big_k, c0), (k0, big_c), (big_k, big_c))):  # in order, without repeats
            vs_floor(table.get((fb, k, c, dtype), {}).get(backend), 2.0,
                     f"K={k} C={c} {dtype} fwd+bwd: within 2x the HBM floor", backend)
        liger = [(key[1], impls[backend]["s"], impls["liger"]["s"]) for key, impls in sorted(table.items())
                 if key[0] == fb and key[2] == c0 and key[3] == dtype and key[1] >= 2
                 and backend in impls and "liger" in impls]
        if not liger:
            add(f"C={c0} {dtype} fwd+bwd: faster than Liger's KL pair by pair at every K >= 2", backend, None,
                "> 1", None, "not measured (no liger rows)")
        else:
            worst = min(liger, key=lambda r: r[2] / r[1])
            add(f"C={c0} {dtype} fwd+bwd: faster than Liger's KL pair by pair at every K >= 2", backend,
                worst[2] / worst[1], "> 1", all(lg > t for _, t, lg in liger),
                "x over liger per K: " + ", ".join(f"K={k}: {lg / t:.2f}" for k, t, lg in liger))
    return rows


def format_targets(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | backend | measured | required | result | note |", "|---|---|---:|---|---|---|"]
    for r in rows:
        result = {True: "PASS", False: "FAIL", None: "not measured"}[r["passed"]]
        measured = "" if r["measured"] is None else f"{r['measured']:.2f}"
        lines.append(f"| {r['target']} | {r['backend']} | {measured} | {r['required']} | {result} | {r['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1])
