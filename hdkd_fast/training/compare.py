r"""``hdkd-fast compare``: train several methods over several seeds with otherwise equal settings and report
per-exit test top-1 as mean ± standard deviation, training time per method, and every method's
accuracy-versus-FLOPs curve in one plot.

Layout of the comparison directory ``out``: one run directory per method and seed, ``out/<method>/seed<s>``
(an ordinary ``hdkd-fast train`` run: logs, checkpoint, ``final.json``, plots), and the comparison's own
files ``comparison.json``, ``comparison.md`` and ``compare_budget.png``.

Reuse: a run that already finished is reused and a stopped one resumed from its checkpoint, so an
interrupted comparison continues with the same command, but only when its stored settings (a finished
run's ``config.json`` and the identity in its ``final.json``, a stopped run's checkpoint) equal the
request in every field of :class:`~hdkd_fast.training.config.TrainConfig` except
:data:`~hdkd_fast.training.config.NEUTRAL_FIELDS` (``out``, ``device``, ``progress``, ``workers``), with
``None`` (dataset, epochs, model) resolved to the dataset's default first. A run with other settings, or
whose ``final.json``, ``config.json`` or checkpoint is unusable (every field of ``final.json`` is checked
by :func:`~hdkd_fast.training.report.read_final`), is an error naming the run and the differing settings
(or the file and the field) before anything trains; ``rerun_changed=True`` (``--rerun-changed``) trains
such runs again from scratch instead.

Concurrency: each run directory is locked (``.compare.lock`` inside it, a ``filelock`` lock, released when
its process ends, even killed) while it is checked and trained, so comparisons started at once into one
``out`` never train the same run twice: a run another process holds is skipped until the others are done,
then waited for and reused (or resumed, if that process stopped). ``comparison.*`` are written under
``out/.comparison.lock``.

At most :data:`MAX_SEEDS` seeds; every method's settings are validated once (a seed changes only the seed).

Equal training time (``equal_time=True``, ``--equal-time``): the first method is the reference and trains
``config.epochs`` epochs (the dataset's default when unset); every other method trains as many epochs as
fit the same training time, :func:`equal_time_epochs` of their seconds per training step. Those are
measured before anything trains, in this process (:func:`~hdkd_fast.training.loop.step_time`: a short timed
run of each method on the same data, model, device and threads, seed ``seeds[0]``), and kept in
``calibration.json`` with the settings they were measured under (every setting but the neutral ones, the
method, the seed and the epochs), so that an interrupted comparison continues with the same epochs:
a later call reuses them (with other settings it is an error unless ``rerun_changed``, which measures them
again), and a method added later is measured together with one already calibrated, whose stored time
rescales the new measurement. The lr schedule follows each run's epochs: ``milestones`` are fractions of
the run and the cosine schedule spans it. Such a comparison lives in ``out/equal-time`` (its runs,
``calibration.json`` and its ``comparison.*``), apart from a plain comparison into the same ``out``, and its
table adds every method's calibrated step time to the epochs and training time.

Statistics over the n seeds: the mean :math:`\bar a = \frac1n\sum_s a_s` and the sample standard deviation
:math:`\sqrt{\frac{1}{n-1}\sum_s (a_s-\bar a)^2}` (0 for one seed). A method's budget curve is the mean over
seeds of the (cost, accuracy) points at each threshold quantile q (every run of a comparison sweeps the
same q, see ``--budget-protocol``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

from filelock import FileLock, Timeout

from .._atomic import write_text_atomic
from .._validation import check_count, is_real
from ..data.load import dataset_name
from .checkpoint import CHECKPOINT, load_checkpoint, writing
from .config import NEUTRAL_FIELDS, OPTIONS_KEY, TrainConfig, options_class, split_flat_options
from .loop import step_time, train
from .methods import MethodOptions, method_class, option_owners
from .records import CONFIG
from .report import FINAL_FILE, flop_unit, format_markdown_rows, format_text_rows, read_final, read_json

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
BUDGET_PLOT = "compare_budget.png"
RUN_LOCK = ".compare.lock"
"""The lock file in each run directory, held while the run is checked and trained."""
COMPARISON_LOCK = ".comparison.lock"
"""The lock file in the comparison directory, held while ``comparison.*`` are written."""
MAX_SEEDS = 1000
"""The most seeds one comparison takes: each seed is a full training run per method and the standard error
of the mean shrinks only as 1/√n, so a larger count is a mistake (``--seeds 1000000000000``) stopped
before it plans runs that never end."""
RERUN_FLAG = "--rerun-changed"
EQUAL_TIME_DIR = "equal-time"
"""The subfolder of the comparison directory that an equal-time comparison lives in."""
CALIBRATION_JSON = "calibration.json"
"""The seconds per training step of an equal-time comparison's methods and the settings they were measured
under, in its directory."""
CALIBRATION_EXCLUDED = (*NEUTRAL_FIELDS, "method", "seed", "epochs")
"""The settings a calibration does not depend on (not compared when ``calibration.json`` is reused); each
method's options are compared with its own stored ones."""

Action = Literal["reuse", "resume", "train"]


class MethodSummary(TypedDict):
    """One method's results over its seeds."""

    seeds: list[int]
    top1_mean: list[float]  # per exit, in [0, 1]
    top1_std: list[float]
    exit_costs: list[float]  # mean over seeds (FLOPs per sample to reach each exit)
    budget_cost: list[float]  # mean curve over seeds
    budget_accuracy: list[float]
    epochs: int  # of every seed's run
    train_time_s: float  # mean over seeds, seconds per run
    step_time_s: float | None  # the calibrated seconds per training step (equal-time comparisons), else None
    runs: list[str]


def run_dir(out: Path, method: str, seed: int) -> Path:
    """Where the run of ``method`` with ``seed`` lives in the comparison directory ``out``."""
    return out / method / f"seed{seed}"


def comparison_dir(out: str | Path, equal_time: bool = False) -> Path:
    """The directory of the comparison into ``out``: ``out`` itself, or ``out/equal-time`` for an equal-time one."""
    return Path(out) / EQUAL_TIME_DIR if equal_time else Path(out)


def compare_methods(config: TrainConfig, methods: Sequence[str], seeds: Sequence[int], out: str | Path, *,
                    method_options: Mapping[str, MethodOptions] | None = None, rerun_changed: bool = False,
                    equal_time: bool = False, step_cost: Callable[[TrainConfig], float] = step_time,
                    log: Callable[[str], None] = print) -> dict[str, MethodSummary]:
    """Train (or reuse) ``config`` with every method of ``methods`` and every seed of ``seeds`` in
    :func:`comparison_dir`, then write and return the per-method summaries (see the module docstring).

    ``config.method`` (and its options: ``method_options[method]``, else ``config.options`` for
    ``config.method`` and the defaults for the others), ``config.seed`` and ``config.out`` are replaced per
    run (and ``config.epochs`` per method with ``equal_time``, from the seconds per training step
    ``step_cost(config)`` of each method's ``config``).
    The settings of every method and the stored settings of every existing run are checked before the first
    run trains: a stored run (or calibration) with other settings than ``config`` (or an unusable record) is
    a ``ValueError`` naming it, unless ``rerun_changed``, which trains it (measures it) again from scratch.
    """
    if isinstance(methods, str) or not methods:
        raise ValueError("methods must be a non-empty list of method names")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods lists a method more than once: {list(methods)}")
    if isinstance(seeds, (str, bytes)) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of distinct seeds; got {seeds!r}")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} seeds (each is one run per method); got {len(seeds)}")
    for seed in seeds:
        check_count(seed, "seed", minimum=0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct seeds; got {list(seeds)}")
    options = dict(method_options or {})
    stray = sorted(set(options) - set(methods))
    if stray:
        raise ValueError(f"method_options has the options of {stray}, which methods does not list")
    root = comparison_dir(out, equal_time)
    epochs: dict[str, int | None] = dict.fromkeys(methods, config.epochs)
    step_times: dict[str, float | None] = dict.fromkeys(methods)

    def request(method: str, seed: int) -> TrainConfig:
        return dataclasses.replace(config.for_method(method, options.get(method)), seed=seed,
                                   out=str(run_dir(root, method, seed)), epochs=epochs[method])

    for method in methods:
        method_class(method)  # names the bad one
        request(method, seeds[0]).validate()  # the seed alone differs between a method's runs: checked above
    if equal_time:
        config = dataclasses.replace(config, dataset=dataset_name(config.dataset, config.data_dir)).resolved()
        assert config.epochs is not None  # resolved
        with writing(root, "create the comparison directory"):
            root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / COMPARISON_LOCK)):  # one compare measures, one at a time reads or extends
            calibrated = _calibration(root, {m: request(m, seeds[0]) for m in methods}, step_cost, rerun_changed, log)
        step_times.update(calibrated)
        epochs.update(equal_time_epochs(config.epochs, calibrated, methods))
        log("equal training time: " + ", ".join(
            f"{m} {1000 * calibrated[m]:.3g} ms/step, {epochs[m]} epochs" for m in methods)
            + f" (the time of {methods[0]}'s {config.epochs} epoch(s))")
    runs = [(method, seed) for method in methods for seed in seeds]
    problems = []
    for method, seed in runs:  # before anything trains
        where = run_dir(root, method, seed)
        if where.is_dir():
            with _run_lock(where, wait=False) as held:  # a run another process holds is checked on its turn
                problem = _inspect(where, request(method, seed))[1] if held else None
            if problem is not None:
                problems.append(problem)
    if problems and not rerun_changed:
        more = f" (and {len(problems) - 1} more run(s) in {root})" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}; pass {RERUN_FLAG} to train such runs again with these "
                         "settings, or choose another --out")
    finals: dict[tuple[str, int], dict[str, Any]] = {}  # each read under its run's lock, as checked
    waiting = []
    for n, (method, seed) in enumerate(runs, start=1):
        where = run_dir(root, method, seed)
        prefix = f"[{n}/{len(runs)}] {method}, seed {seed}"
        with writing(where, "create the run directory"):
            where.mkdir(parents=True, exist_ok=True)
        with _run_lock(where, wait=False) as held:
            if held:
                finals[method, seed] = _run(where, request(method, seed), prefix, rerun_changed, log)
                continue
        log(f"{prefix}: another compare is training {where}; back to it after the other runs")
        waiting.append((method, seed, prefix))
    for method, seed, prefix in waiting:
        where = run_dir(root, method, seed)
        log(f"{prefix}: waiting for the other compare to release {where / RUN_LOCK}")
        with _run_lock(where, wait=True):
            finals[method, seed] = _run(where, request(method, seed), prefix, rerun_changed, log)
    summaries = {m: _summary([finals[m, s] for s in seeds], [run_dir(root, m, s) for s in seeds], list(seeds),
                             step_times[m]) for m in methods}
    with FileLock(str(root / COMPARISON_LOCK)):
        write_comparison(summaries, root)
    return summaries


def equal_time_epochs(epochs: int, step_times: Mapping[str, float], methods: Sequence[str]) -> dict[str, int]:
    """The epochs of every method of an equal-time comparison whose reference, ``methods[0]``, trains
    ``epochs`` epochs: method m trains ``max(1, floor(epochs · t_ref / t_m + 1/2))`` epochs (the
    nearest count, halves rounded up, at least one), where ``t`` are the seconds per training step
    ``step_times``: every epoch has the same steps (the same data and batch size), so that many epochs take
    the reference's training time."""
    check_count(epochs, "epochs")
    reference = step_times[methods[0]]
    return {m: max(1, math.floor(epochs * reference / step_times[m] + 0.5)) for m in methods}


def _calibration(root: Path, requests: Mapping[str, TrainConfig], step_cost: Callable[[TrainConfig], float],
                 rerun_changed: bool, log: Callable[[str], None]) -> dict[str, float]:
    """The seconds per training step of every method of ``requests`` (its config for the calibration's seed),
    from ``root/calibration.json`` where it has them for these settings, else measured by ``step_cost`` and
    stored (see the module docstring); under the comparison's lock."""
    path = root / CALIBRATION_JSON
    settings = _calibration_settings(next(iter(requests.values())))
    options = {m: config.options.to_json() for m, config in requests.items()}
    stored: dict[str, float] = {}
    stored_options: dict[str, dict[str, Any]] = {}
    if path.exists():
        try:
            old_settings, stored_options, stored = _read_calibration(path)
            differences = {name: (old_settings.get(name), settings.get(name)) for name in {*old_settings, *settings}
                           if old_settings.get(name) != settings.get(name)}
            for method in (m for m in requests if m in stored):  # the options a stored time was measured with
                old = stored_options.get(method, {})
                differences.update({name: (old.get(name), value) for name, value in options[method].items()
                                    if old.get(name) != value})
            problem = _differ(f"{path} was measured", differences)
            if problem is not None:
                raise ValueError(problem)
        except (ValueError, OSError) as exc:
            if not rerun_changed:
                raise ValueError(f"{exc}; pass {RERUN_FLAG} to measure the step times again (runs whose epochs "
                                 "change are trained again), or choose another --out") from exc
            log(f"{exc}; measuring the step times again")
            stored, stored_options = {}, {}
    missing = [m for m in requests if m not in stored]
    if not missing:
        log(f"step times measured earlier, reusing {path}")
        return {m: stored[m] for m in requests}
    anchor = next((m for m in requests if m in stored), next(iter(stored), None))
    measured = {}
    for method in ([anchor] if anchor is not None else []) + missing:
        log(f"measuring the training step time of {method} on a short timed run")
        measured[method] = step_cost(requests.get(method) or requests[missing[0]].for_method(
            method, options_class(method)(**stored_options.get(method, {}))))
        if not (math.isfinite(measured[method]) and measured[method] > 0):
            raise ValueError(f"the step time of {method} must be a finite number of seconds > 0; got "
                             f"{measured[method]!r}")
    scale = stored[anchor] / measured[anchor] if anchor is not None else 1.0  # into the stored times' units
    stored.update({m: measured[m] * scale for m in missing})
    stored_options = {**{m: o for m, o in stored_options.items() if m in stored}, **options}
    with writing(path):
        write_text_atomic(path, json.dumps({"settings": settings, OPTIONS_KEY: stored_options, "step_time_s": stored},
                                           indent=2, allow_nan=False) + "\n")
    return {m: stored[m] for m in requests}


def _calibration_settings(config: TrainConfig) -> dict[str, Any]:
    """The shared settings a calibration depends on (the method's options are stored per method)."""
    return {name: value for name, value in config.to_json().items()
            if name not in CALIBRATION_EXCLUDED and name != OPTIONS_KEY}


def _read_calibration(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, float]]:
    """The settings, the options per method and the step times of ``calibration.json``, checked (one of
    the flat layout before method options has every method's options in its settings); a ``ValueError``
    names the file."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict) \
            or not isinstance(data.get("step_time_s"), dict):
        raise ValueError(f"{path}: must be an object with 'settings' and 'step_time_s' objects")
    times = data["step_time_s"]
    for method, value in times.items():
        if not is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{path}: 'step_time_s.{method}' must be a finite number of seconds > 0; got {value!r}")
    settings, options = data["settings"], data.get(OPTIONS_KEY)
    if options is None:  # the flat layout
        settings, flat = split_flat_options(settings)
        options = {m: {name: flat[name] for name in flat if m in option_owners(name)} for m in times}
    if not isinstance(options, dict) or not all(isinstance(o, dict) for o in options.values()):
        raise ValueError(f"{path}: '{OPTIONS_KEY}' must map methods to objects of their options")
    return settings, options, {m: float(t) for m, t in times.items()}


@contextlib.contextmanager
def _run_lock(where: Path, *, wait: bool) -> Iterator[bool]:
    """Hold the lock of the run directory ``where`` (it must exist): yields ``True``, or ``False`` at once
    when another thread or process holds it and not ``wait``."""
    lock = FileLock(str(where / RUN_LOCK))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _run(where: Path, config: TrainConfig, prefix: str, rerun_changed: bool,
         log: Callable[[str], None]) -> dict[str, Any]:
    """Reuse, resume or train the run in ``where`` (its lock held) as :func:`_inspect` finds it; returns its
    ``final.json``."""
    action, problem, final = _inspect(where, config)
    if problem is not None:
        if not rerun_changed:  # changed since the check before training (another process wrote it)
            raise ValueError(f"{problem}; pass {RERUN_FLAG} to train it again with these settings")
        log(f"{prefix}: {problem}; training it again")
        for name in (FINAL_FILE, CHECKPOINT):  # the result first: no state of it looks finished
            with writing(where / name, "remove"):
                (where / name).unlink(missing_ok=True)
        action = "train"
    if action == "reuse" and final is not None:
        log(f"{prefix}: finished earlier, reusing {where}")
        return final
    log(f"{prefix}: {'resuming' if action == 'resume' else 'training'} {where}")
    train(config, resume=action == "resume", log=log)
    return read_final(where)


def _inspect(where: Path, config: TrainConfig) -> tuple[Action, str | None, dict[str, Any] | None]:
    """What to do with the run directory ``where`` for the request ``config``, why it cannot be done
    (``None`` when it can) and, for a finished run, its ``final.json``: reuse a finished run, resume a
    stopped one, or train a new one. The problem is a stored setting that differs from ``config`` or an
    unusable record (it names the file and the field)."""
    if (where / FINAL_FILE).exists():
        try:
            final = read_final(where)
            stored = read_config(where)
        except (ValueError, OSError) as exc:
            return "reuse", f"the record of {where} is unusable: {exc}", None
        differences = setting_differences(stored, config)
        asked = resolved_request(stored, config)
        for name in ("method", "dataset", "model", "epochs"):  # final.json's own account of its run
            if name in final and final[name] != getattr(asked, name) and name not in differences:
                differences[name] = (final[name], getattr(asked, name))
        return "reuse", _differ(f"{where} was trained", differences), final
    if (where / CHECKPOINT).exists():
        try:
            stored = TrainConfig.from_json(load_checkpoint(where)["config"])
        except (ValueError, TypeError) as exc:
            return "resume", f"the record of {where} is unusable: {exc}", None
        return "resume", _differ(f"{where} (stopped) was started", setting_differences(stored, config)), None
    return "train", None, None  # a start that never wrote a checkpoint is cleared by train()


def _differ(what: str, differences: Mapping[str, tuple[Any, Any]]) -> str | None:
    if not differences:
        return None
    shown = ", ".join(f"{_flag(name)} {_shown(old)} (asked {_shown(new)})" for name, (old, new) in differences.items())
    return f"{what} with other settings: {shown}"


def _flag(name: str) -> str:
    return "extra" if name == "extra" else "--" + name.replace("_", "-")


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def read_config(run: Path) -> TrainConfig:
    """The settings stored in ``run/config.json``, checked; a ``ValueError`` names the file."""
    path = run / CONFIG
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    try:
        if not isinstance(data, dict):
            raise ValueError(f"settings must be a JSON object; got {type(data).__name__}")
        return TrainConfig.from_json(data).validate()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def resolved_request(stored: TrainConfig, config: TrainConfig) -> TrainConfig:
    """``config`` with the dataset defaults filled in as its run would: no dataset and no data directory is
    the embedded digits; no dataset with a data directory is the one detected there, which for the same
    directory is the stored run's."""
    dataset = config.dataset or ("digits" if config.data_dir is None else stored.dataset) or "digits"
    return dataclasses.replace(config, dataset=dataset).resolved()


def setting_differences(stored: TrainConfig, config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings of a stored run that differ from the request ``config`` (resolved as its run would be:
    :func:`resolved_request`), as ``{name: (stored, asked)}`` (the shared settings and the method's options,
    :meth:`TrainConfig.settings`; one the other lacks is ``None``); the :data:`NEUTRAL_FIELDS` are not
    compared."""
    old, new = stored.settings(), resolved_request(stored, config).settings()
    names = [*old, *(name for name in new if name not in old)]
    return {name: (old.get(name), new.get(name)) for name in names
            if name not in NEUTRAL_FIELDS and old.get(name) != new.get(name)}


def summarize(runs: Sequence[Path], seeds: list[int], step_time_s: float | None = None) -> MethodSummary:
    """Mean and standard deviation over ``runs`` (one method, one run per seed) of their ``final.json``
    (each checked by :func:`~hdkd_fast.training.report.read_final`); ``step_time_s``: the method's calibrated
    seconds per training step in an equal-time comparison."""
    return _summary([read_final(run) for run in runs], runs, seeds, step_time_s)


def _summary(finals: Sequence[Mapping[str, Any]], runs: Sequence[Path], seeds: list[int],
             step_time_s: float | None) -> MethodSummary:
    """:func:`summarize` of the checked ``final.json`` contents ``finals`` of ``runs``."""
    exits = {len(f["test/top1"]) for f in finals}
    quantiles = {tuple(f["budget"]["q"]) for f in finals}
    epochs = {f["epochs"] for f in finals}
    if len(exits) != 1 or len(quantiles) != 1 or len(epochs) != 1:
        raise ValueError(f"the runs {[str(r) for r in runs]} differ in their number of exits, epochs or budget "
                         "sweep")

    def mean(values: Sequence[Sequence[float]]) -> list[float]:
        return [statistics.fmean(column) for column in zip(*values, strict=True)]

    def std(values: Sequence[Sequence[float]]) -> list[float]:
        return [statistics.stdev(column) if len(column) > 1 else 0.0 for column in zip(*values, strict=True)]

    top1 = [f["test/top1"] for f in finals]
    return MethodSummary(
        seeds=seeds, top1_mean=mean(top1), top1_std=std(top1),
        exit_costs=mean([f["exit_costs"] for f in finals]),
        budget_cost=mean([f["budget"]["cost"] for f in finals]),
        budget_accuracy=mean([f["budget"]["accuracy"] for f in finals]),
        epochs=epochs.pop(),
        train_time_s=statistics.fmean(float(f["train_time_s"]) for f in finals),
        step_time_s=step_time_s,
        runs=[str(run) for run in runs],
    )


def comparison_rows(summaries: Mapping[str, MethodSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table: per exit (then the mean over exits) ``mean ± std`` of test
    top-1 in %, then the epochs and the mean training time per run (and, in an equal-time comparison, the
    calibrated time per training step)."""
    if not summaries:
        raise ValueError("summaries is empty")
    k = max(len(s["top1_mean"]) for s in summaries.values())

    def cell(s: MethodSummary, i: int) -> str:
        if i >= len(s["top1_mean"]):
            return ""
        return f"{100 * s['top1_mean'][i]:.2f} ± {100 * s['top1_std'][i]:.2f}"

    rows = [[f"exit {i + 1}", *(cell(s, i) for s in summaries.values())] for i in range(k)]
    # the std of the exit-mean over seeds is not the mean of the per-exit stds: report the mean only
    rows.append(["mean", *(f"{100 * statistics.fmean(s['top1_mean']):.2f}" for s in summaries.values())])
    rows.append(["epochs", *(str(s["epochs"]) for s in summaries.values())])
    rows.append(["train time / run", *(f"{s['train_time_s']:.1f} s" for s in summaries.values())])
    if any(s["step_time_s"] is not None for s in summaries.values()):
        rows.append(["step time (calibrated)", *("" if s["step_time_s"] is None else f"{1000 * s['step_time_s']:.3g} ms"
                                                  for s in summaries.values())])
    return ["", *summaries], rows


def comparison_title(summaries: Mapping[str, MethodSummary]) -> str:
    """What the comparison table shows, in a sentence (and, for an equal-time comparison, its reference)."""
    first, reference = next(iter(summaries.items()))
    title = f"Test top-1 (%) per exit, mean ± std over seeds {reference['seeds']}"
    if reference["step_time_s"] is None:
        return title
    return (f"{title}; equal training time: every method trains for as long as {first}'s "
            f"{reference['epochs']} epoch(s) (epochs scaled by the calibrated step times)")


def format_comparison(summaries: Mapping[str, MethodSummary]) -> str:
    """The comparison table as plain text (see :func:`comparison_rows`)."""
    return format_text_rows(*comparison_rows(summaries))


def write_comparison(summaries: Mapping[str, MethodSummary], out: Path) -> list[Path]:
    """``comparison.json``, ``comparison.md`` and (with matplotlib) ``compare_budget.png`` in ``out``."""
    header = comparison_title(summaries) + "\n\n"
    written = []
    for name, text in ((COMPARISON_JSON, json.dumps(summaries, indent=2, allow_nan=False) + "\n"),
                       (COMPARISON_MD, header + format_markdown_rows(*comparison_rows(summaries)) + "\n")):
        with writing(out / name):
            (out / name).write_text(text)
        written.append(out / name)
    with contextlib.suppress(ImportError), writing(out / BUDGET_PLOT):  # without matplotlib: the tables only
        written.append(plot_method_budgets(summaries, out / BUDGET_PLOT))
    return written


def plot_method_budgets(summaries: Mapping[str, MethodSummary], path: Path) -> Path:
    """Mean test top-1 (%) against average FLOPs per sample, one budget curve per method, with every exit's
    mean ± std as an error bar of the curve's color."""
    from ..evaluation.plots import new_figure, save_figure

    scale, unit = flop_unit(max(max(s["exit_costs"]) for s in summaries.values()))
    fig, ax = new_figure()
    for method, s in summaries.items():
        points = sorted(zip(s["budget_cost"], s["budget_accuracy"], strict=True))
        (line,) = ax.plot([c / scale for c, _ in points], [100 * a for _, a in points], marker=".",
                          label=f"{method} (n={len(s['seeds'])})")
        ax.errorbar([c / scale for c in s["exit_costs"]], [100 * a for a in s["top1_mean"]],
                    yerr=[100 * d for d in s["top1_std"]], linestyle="none", marker="o", markerfacecolor="none",
                    color=line.get_color(), capsize=3)
    ax.set_xlabel(f"average {unit} per sample")
    ax.set_ylabel("top-1 accuracy (%)")
    return save_figure(fig, ax, path, "budgeted accuracy, mean over seeds")
