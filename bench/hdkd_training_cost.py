"""Whole-training cost of ``--method hdkd`` against ``ce`` and ``dkd`` (issue 23 item 2), in one process.

Every run is ``hdkd_fast.training.train`` on the same data with one torch thread and no loader workers;
the runs take turns (round-robin, the order rotated every round) so that the machine's load moves them
together. Time is the training loop's own ``time_s`` (the epochs, not the final evaluation) measured on
``time.thread_time`` instead of the wall clock: the busy time of this thread, which other jobs on a
shared CPU perturb far less. Prints a markdown table: median training time, its ratio to ``ce``, and
the final test top-1 of every exit (the mean over rounds; the runs are deterministic, so rounds agree).

    PYTHONPATH=. python bench/hdkd_training_cost.py --rounds 2 -- --dataset fashion-mnist --image-size 14 \\
        --train-size 5000 --epochs 2 --device cpu

Variants: ``ce``, ``dkd`` and ``hdkd`` at every ``--update-every`` of ``--intervals`` (default 1 4 8 16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from hdkd_fast import cli
from hdkd_fast.training import loop, train
from hdkd_fast.training.config import TrainConfig
from hdkd_fast.training.report import read_final


def _config(train_args: list[str], extra: list[str], out: Path) -> TrainConfig:
    ns = cli._parser().parse_args(["train", *train_args, *extra, "--out", str(out), "--no-progress"])
    return cli._config(ns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["ce", "dkd"])
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: the hdkd-fast train arguments")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    torch.set_num_threads(1)
    loop.time = types.SimpleNamespace(perf_counter=time.thread_time)  # type: ignore[attr-defined]
    variants = {m: ["--method", m] for m in args.methods}
    variants |= {f"hdkd/{n}": ["--method", "hdkd", "--update-every", str(n)] for n in args.intervals}
    times: dict[str, list[float]] = {v: [] for v in variants}
    top1: dict[str, list[float]] = {}
    names = list(variants)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                out = Path(tmp) / f"{name.replace('/', '-')}-{r}"
                config = _config(train_args, variants[name], out)
                train(config, log=lambda _msg: None)
                final = read_final(out)
                times[name].append(float(final["train_time_s"]))
                top1[name] = [100 * a for a in final["test/top1"]]
                print(f"round {r}: {name} {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    ce = statistics.median(times[names[0]])
    print(f"| variant | train thread-time s (median of {args.rounds}) | × {names[0]} | test top-1 per exit |")
    print("|---|---:|---:|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.1f} | {t / ce:.2f} | " + " / ".join(f"{a:.2f}" for a in top1[name]) + " |")


if __name__ == "__main__":
    main()
