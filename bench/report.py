"""Print the ratio tables of a ``pytest bench/ --benchmark-json RUN.json`` run as Markdown.

Usage: ``python bench/report.py RUN.json``. For every benchmark group, the median time of each
implementation and its speed-up over the readable reference loop (``reference``) and over the
``"torch"`` backend; groups with a ``softmax_pass`` also give each time as a multiple of it.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as fh:
        run = json.load(fh)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in run["benchmarks"]:
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


def _softmax_floor(groups: dict[str, dict[str, float]], group: str) -> float | None:
    """The softmax pass lives in the forward group of the same shape."""
    twin = group.replace("forward_backward", "forward")
    return groups.get(twin, {}).get("softmax_pass")


if __name__ == "__main__":
    main(sys.argv[1])
