"""The ``hdkd-fast`` command (also ``python -m hdkd_fast``): ``train``, ``evaluate``, ``bench``, ``build``,
``info``.

Run ``hdkd-fast COMMAND --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from ._ext_loader import ExtensionBuildError
from .backends import backend_choices
from .data.load import DATASETS, IDX_DATASETS
from .evaluation import BUDGET_PROTOCOLS
from .models.zoo import model_names, registered_models
from .training.compare import EQUAL_TIME_DIR, MAX_SEEDS, RERUN_FLAG
from .training.config import (
    AMP_MODES,
    DEVICES,
    NEUTRAL_FIELDS,
    RESUME_FIELDS,
    SCHEDULES,
    SHARED_SETTINGS,
    TrainConfig,
    check_method_options,
    options_class,
)
from .training.methods import METHODS, MethodOptions, method_names, option_names, option_owners


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad arguments, data or files, and a required extension that cannot be had
    (``HDKD_FAST_REQUIRE_EXT=1``), end it with one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv[argv.index(args.command) + 1:]  # the command's own arguments
    try:
        return int(args.run(args))
    except (ValueError, TypeError, OSError, FloatingPointError) as exc:  # arguments, data, files, divergence
        print(f"hdkd-fast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ExtensionBuildError as exc:  # its first line names the log of a failed build
        print(f"hdkd-fast {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; an ``OSError`` as its cause and file."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hdkd-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub.add_parser("train", help="train a multi-exit model with one method",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    _compare_parser(sub.add_parser("compare", help="train several methods over several seeds; mean ± std per exit",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    _evaluate_parser(sub.add_parser("evaluate", help="evaluate runs and compare them (table + plots)"))
    _bench_parser(sub.add_parser("bench", help="time the dense-KD backends against the naive loop and torch.compile"))
    build = sub.add_parser("build", help="compile the native kernels now (otherwise done on first use)")
    _build_parser(build)
    info = sub.add_parser("info", help="versions, devices and the compiled backends")
    info.set_defaults(run=_info)
    return parser


# -- train ----------------------------------------------------------------------------------------


def _model_help() -> str:
    """``--model``'s help: every registered model with its description, then the default."""
    models = "; ".join(f"{spec.name}: {spec.description}" for spec in registered_models().values())
    return (models + "; default msdnet-tiny on digits and the MNIST family, msdnet otherwise").replace("%", "%%")


def _train_parser(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--method", choices=method_names(), default=d.method, help="training method (docs/methods.md)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: detected from --data-dir; the embedded digits without one")
    p.add_argument("--data-dir", default=None, help="CIFAR python folder / .tar.gz, MNIST-format (IDX) files, "
                   "or an ImageFolder root (docs/datasets.md)")
    p.add_argument("--download", action="store_true",
                   help=f"{' / '.join(IDX_DATASETS)}: first fetch the official files (checked against their "
                   "published MD5s) into --data-dir (default ~/.cache/hdkd_fast/<dataset>)")
    p.add_argument("--model", choices=model_names(), default=None, metavar="MODEL", help=_model_help())
    p.add_argument("--out", default=None, help="run directory (default runs/<dataset>-<model>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--epochs", type=int, default=None,
                   help="default 300 (paper), 12 on digits, 15 on the MNIST family")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--milestones", type=float, nargs="+", default=list(d.milestones),
                   help="multistep: fractions of the run where the lr is multiplied by --gamma")
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature T")
    p.add_argument("--val-size", type=float, default=None,
                   help="validation images held out of the training set (count, or fraction < 1); "
                   "default 5000 on CIFAR and the MNIST family, 10%% otherwise")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images per split (smoke tests)")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on a seeded random subset of this many training images (limited-data regime); "
                   "validation and test splits unchanged")
    p.add_argument("--label-noise", type=float, default=d.label_noise, metavar="P",
                   help="symmetric label noise: each training label is replaced, with probability P in [0, 1), by "
                   "a class drawn uniformly from the other ones (seeded by --seed); validation and test stay clean")
    p.add_argument("--label-noise-validation", action="store_true",
                   help="give the validation labels the same --label-noise too (hdkd learns its weights on them)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the images, at most 1024: image folders (default 32; each image resized to it) "
                   "and the MNIST family (default and at most 28; smaller = area-resampled, e.g. 14 for a 4x "
                   "cheaper model)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=DEVICES, default=d.device)
    p.add_argument("--amp", choices=AMP_MODES, default=d.amp, help="bf16 autocast: auto = on CUDA only")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on CUDA only")
    p.add_argument("--backend", choices=backend_choices(), default=d.backend,
                   help="backend of the fused dense-KD op")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes (image folders)")
    p.add_argument("--gradient-equilibrium", action="store_true", help="IMTA gradient rescaling (any method)")
    p.add_argument("--budget-protocol", choices=tuple(BUDGET_PROTOCOLS), default=d.budget_protocol,
                   help="q sweep of final.json's budgeted evaluation: q = p/20, p = 1..40 (imta) or 1..39 (msdnet)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _method_option_groups(p)
    p.set_defaults(run=_train)


def _method_option_groups(p: argparse.ArgumentParser) -> None:
    """One argument group per registered method with options: a flag per field of its ``Options``
    (``--`` + the name with ``-`` for ``_``; the field's type, choices, default and help). An option that
    several methods share (an inherited ``Options`` field) is listed in the first one's group."""
    listed: set[str] = set()
    for name in METHODS:
        cls = options_class(name)
        fields = [f for f in dataclasses.fields(cls) if f.name not in listed]
        if not fields:
            continue
        group = p.add_argument_group(f"--method {name}", f"options of method {name!r}: an error when it is not "
                                     "the method trained (--method; compare: --methods)")
        hints = typing.get_type_hints(cls)
        for f in fields:
            listed.add(f.name)
            owners = option_owners(f.name)
            text = f.metadata["help"].replace("%", "%%") + (f" (methods {', '.join(owners)})" if len(owners) > 1
                                                            else "")
            flag = _flag(f.name)
            kind = _option_type(hints[f.name], f"{cls.__qualname__}.{f.name}")
            if kind is bool:
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                group.add_argument(flag, action=action, default=f.default, help=text)
            else:
                group.add_argument(flag, type=kind, choices=f.metadata["choices"], default=f.default, help=text)


def _option_type(hint: object, where: str) -> type:
    """The CLI type of an option annotated ``hint``: ``int``, ``float``, ``str`` or ``bool``, or one of them
    ``| None``."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"{where}: a method option must be an int, float, str or bool (or None) for the CLI; "
                        f"got {hint}")
    return typing.cast(type, kinds[0])


RESUME_OPTIONS = frozenset({"resume", "out", "device", *RESUME_FIELDS})
"""The ``train`` options (by destination) that ``--resume`` takes; the run's other settings are stored."""
_FLAGS = {"progress": "--no-progress"}
"""Options whose flag is not ``--`` + their destination."""
_UNSET = object()


def _train(args: argparse.Namespace) -> int:
    from .training import train

    given = _given_options(args.argv)
    if args.resume:
        _check_resume_options(given)
    check_method_options(given & _option_dests(), [args.method])
    if args.download:
        from .data import download_dataset

        args.data_dir = str(download_dataset(args.dataset, args.data_dir, progress=args.progress))
    run_dir = train(_config(args), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports
        _print_runs([run_dir])
    return 0


def _config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of the ``train`` options in ``args`` (each option's destination is a shared setting
    or an option of a method), with the options of ``args.method``."""
    val_size = args.val_size
    if val_size is not None and val_size >= 1:
        if val_size != int(val_size):
            raise ValueError(f"--val-size must be a whole count or a fraction below 1; got {val_size}")
        val_size = int(val_size)
    values = {name: getattr(args, name) for name in SHARED_SETTINGS if name in vars(args)}
    return TrainConfig(**{**values, "milestones": tuple(args.milestones), "val_size": val_size},
                       options=_options(args, args.method))


def _options(args: argparse.Namespace, method: str) -> MethodOptions:
    """The options of ``method`` in ``args`` (the defaults of those not given)."""
    cls = options_class(method)
    return cls(**{name: getattr(args, name) for name in option_names(cls)})


def _option_dests() -> set[str]:
    """The destinations of every method's options."""
    return {name for cls in METHODS.values() for name in option_names(cls.Options)}


def _given_options(argv: Sequence[str], compare: bool = False) -> set[str]:
    """The destinations of the ``train`` (or ``compare``) options given in ``argv`` (the arguments after the
    command), whatever their values: ``argv`` is parsed again into a namespace that already holds every
    destination, so that argparse fills in no defaults."""
    parser = argparse.ArgumentParser(prog="hdkd-fast compare" if compare else "hdkd-fast train")
    (_compare_parser if compare else _train_parser)(parser)
    blank = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), _UNSET))
    return {name for name, value in vars(parser.parse_args(argv, namespace=blank)).items() if value is not _UNSET}


def _check_resume_options(given: set[str]) -> None:
    """``--resume`` continues the stored configuration: any other option would be ignored, so it is an error."""
    ignored = sorted(given - RESUME_OPTIONS)
    if ignored:
        allowed = ", ".join(_flag(name) for name in sorted(RESUME_OPTIONS - {"resume"}))
        raise ValueError(f"--resume continues the run with its stored settings and takes only {allowed}; "
                         f"remove {', '.join(_flag(name) for name in ignored)}")


def _flag(dest: str) -> str:
    return _FLAGS.get(dest, "--" + dest.replace("_", "-"))


# -- compare --------------------------------------------------------------------------------------

COMPARE_REFUSED = ("method", "seed", "resume", "download")
"""``train`` options that ``compare`` sets itself (per run) or does not take."""


def _compare_parser(p: argparse.ArgumentParser) -> None:
    _train_parser(p)
    p.add_argument("--methods", nargs="+", choices=method_names(), default=None, metavar="METHOD",
                   help=f"methods to compare: {', '.join(method_names())}")
    p.add_argument("--seeds", type=int, default=3,
                   help=f"runs per method, with seeds 0 .. SEEDS-1 (at most {MAX_SEEDS})")
    p.add_argument(RERUN_FLAG, dest="rerun_changed", action="store_true",
                   help="train again, from scratch, the runs in --out whose stored settings differ from these "
                   f"(all but {', '.join(_flag(name) for name in NEUTRAL_FIELDS)}) or whose records are unusable; "
                   "without it such runs are an error")
    p.add_argument("--equal-time", action="store_true",
                   help="give every method the training time of the first of --methods (which trains --epochs "
                   "epochs): each method's seconds per step are measured on a short timed run first and its "
                   f"epochs scaled to match; runs in --out/{EQUAL_TIME_DIR}")
    p.set_defaults(run=_compare)


def _compare(args: argparse.Namespace) -> int:
    from .training.compare import compare_methods, comparison_dir, comparison_title, format_comparison

    given = _given_options(args.argv, compare=True)
    refused = sorted(given & set(COMPARE_REFUSED))
    if refused:
        raise ValueError(f"compare sets the method and seed of each run and continues stopped runs itself; "
                         f"remove {', '.join(_flag(name) for name in refused)}")
    if not 1 <= args.seeds <= MAX_SEEDS:  # before range(args.seeds) becomes a list
        raise ValueError(f"--seeds must be a positive count of at most {MAX_SEEDS} (each seed is one run per "
                         f"method); got {args.seeds}")
    if not args.methods:
        raise ValueError("--methods is required: the methods to compare")
    if not args.out:
        raise ValueError("--out is required: the comparison's directory (one run per method and seed inside)")
    check_method_options(given & _option_dests(), args.methods)
    summaries = compare_methods(_config(args), args.methods, list(range(args.seeds)), args.out,
                                rerun_changed=args.rerun_changed, equal_time=args.equal_time,
                                method_options={m: _options(args, m) for m in args.methods})
    print(comparison_title(summaries))
    print(format_comparison(summaries))
    print(f"comparison files: {comparison_dir(args.out, args.equal_time)}")
    return 0


# -- evaluate -------------------------------------------------------------------------------------


def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", help="run directories (final.json, or a checkpoint to evaluate)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="more runs to compare side by side")
    p.add_argument("--out", default=None, help="where the comparison plots go (default: <first run>/../compare)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.set_defaults(run=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .training.final import finish_from_checkpoint
    from .training.report import FINAL_FILE, compare_runs

    runs = [Path(r) for r in [*args.runs, *args.compare]]
    if not runs:
        raise ValueError("give at least one run directory")
    for run in runs:
        if not (run / FINAL_FILE).exists():
            print(f"{run}: no {FINAL_FILE}; evaluating its checkpoint")
            finish_from_checkpoint(run, device=args.device)
    if len(runs) == 1:
        _print_runs(runs)
        return 0
    out = Path(args.out) if args.out else runs[0].resolve().parent / "compare"
    result = compare_runs(runs, out)
    print("test top-1 accuracy (%) per exit")
    print(result["table"])
    print("\nplots: " + ", ".join(str(p) for p in result["plots"]))
    return 0


def _print_runs(runs: Sequence[Path]) -> None:
    from .training.report import format_exit_table, read_final

    finals = {str(run): read_final(run) for run in runs}
    print("test top-1 accuracy (%) per exit")
    print(format_exit_table(finals))
    print("run files: " + ", ".join(str(r) for r in runs))


# -- bench / build / info -------------------------------------------------------------------------


def _bench_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exits", type=int, nargs="+", default=[2, 4, 8, 16], help="K values")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000], help="C values")
    p.add_argument("--batch", type=int, default=None, help="B (default 256 on CPU, 4096 on CUDA)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the loop")
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_table

    print(run_table(exits=args.exits, classes=args.classes, batch=args.batch, device=args.device,
                    dtype=args.dtype, compile_reference=args.compile))
    return 0


def _build_parser(p: argparse.ArgumentParser) -> None:
    from .build import add_arguments, run

    add_arguments(p)
    p.set_defaults(run=run)


def _info(args: argparse.Namespace) -> int:
    from .info import main as info_main

    return info_main()
