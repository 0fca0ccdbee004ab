"""Tuning with Optuna: a config over a search space, and the fair comparison of a baseline with its guided twin.

A study folder holds everything a worker needs: `study.json` (the config,
the space, the settings), the study itself (Optuna's journal file
`journal.log`, or an RDB named by a storage URL) and one folder per trial
under `trials/` (`trial-NNNN/seedS/`, ordinary run folders, and `trial.json`:
number, parameters, state, value). `work(study_dir, storage_url,
study_name)` pulls trials until the study has its number of finished
(complete or pruned) trials: run it in K local processes (`tune(...,
workers=K)`) or, as is, in jobs on a cluster.

Each trial trains the config with the trial's values on every tuning seed;
its objective is the mean validation metric at the best validation epoch
(`objective = "best"`) or the last one. The validation curve of tuning seed
k is reported to Optuna at steps k * epochs + epoch, so the pruner compares
trials at the same seed and epoch. A worker that dies leaves its trial
RUNNING: the next worker to look marks it failed (its worker's lock file is
free) and retries it with the same values in the same folder, resuming from
its checkpoints; a trial stopped by a signal is marked failed and retried
the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import statistics
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from untrainable.config import ConfigError, DistillSpec, GuidanceSpec, RunConfig, from_dict, to_toml
from untrainable.data import DataSplits
from untrainable.runs import fcntl
from untrainable.space import Space, space_from_dict

STUDY_FILE = "study.json"
JOURNAL = "journal.log"
OBJECTIVES = ("best", "last")
PRUNERS = ("median", "halving", "none")
# How a verdict reads a difference: more than this many pooled seed standard deviations counts as an effect.
EFFECT_SDS = 2.0


@dataclass(frozen=True)
class Settings:
    """How a study tunes: the budget, the objective, the seeds, the sampler and the pruner."""

    trials: int
    objective: str = "best"
    tune_seeds: tuple[int, ...] = (0, 1)
    pruner: str = "median"
    sampler_seed: int = 0
    prune_after: int | None = None  # epochs of each seed never pruned; default a quarter of the epochs
    max_retries: int = 2  # a failed trial is run again at most this many times

    def validate(self) -> "Settings":
        if self.trials < 1:
            raise ConfigError(f"--trials: expected a number >= 1, got {self.trials}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner: {self.pruner!r} is not one of {', '.join(PRUNERS)}")
        if not self.tune_seeds or len(set(self.tune_seeds)) != len(self.tune_seeds):
            raise ConfigError(f"--tune-seeds: expected distinct seeds, got {list(self.tune_seeds)}")
        if self.prune_after is not None and self.prune_after < 0:
            raise ConfigError(f"--prune-after: expected epochs >= 0, got {self.prune_after}")
        return self

    def startup_trials(self) -> int:
        """Trials the sampler draws at random before TPE models the rest: half the budget, 2 to 10."""
        return max(2, min(10, self.trials // 2))


def metric_of(config: RunConfig) -> tuple[str, str]:
    """(validation metric, Optuna direction): accuracy up for classification, else the loss down."""
    return ("accuracy", "maximize") if config.train.task == "classification" else ("loss", "minimize")


def trial_config(config: RunConfig, space: Space, values: dict[str, Any]) -> RunConfig:
    """A trial's config: `values` set, early stopping on (the test at the best validation epoch is reported too)."""
    return space.apply(config, values).with_section("train", early_stopping=True, progress=False)


# ---------------------------------------------------------------- study folders


def prepare(study_dir: Path, config: RunConfig, space: Space, settings: Settings) -> dict[str, Any]:
    """Write (or check) `study.json`: a study folder is continued only with the same config, space and settings.

    The number of trials may grow (the study continues up to it).
    """
    space.check(config)
    metric, direction = metric_of(config)
    spec = {
        "config": config.to_dict(),
        "space": space.to_dict(),
        "space_source": space.source,
        "settings": dataclasses.asdict(settings),
        "metric": metric,
        "direction": direction,
    }
    path = study_dir / STUDY_FILE
    if path.exists():
        saved = _read_json(path)
        keep = {k: saved.get(k) for k in spec if k not in ("settings", "space_source")}
        mine = {k: json.loads(json.dumps(spec[k])) for k in keep}
        old = {k: v for k, v in (saved.get("settings") or {}).items() if k != "trials"}
        new = {k: v for k, v in json.loads(json.dumps(spec["settings"])).items() if k != "trials"}
        changed = [k for k in keep if keep[k] != mine[k]] + [f"settings.{k}" for k in new if old.get(k) != new[k]]
        if changed:
            raise ValueError(
                f"{study_dir} holds a study of another {' and '.join(changed)}; choose another --out, "
                "or run the command that started it"
            )
    study_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, spec)
    return spec


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or remove the study folder") from None


def _write_json(path: Path, data: Any) -> None:
    """Atomically: a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_study(study_dir: Path) -> tuple[RunConfig, Space, Settings, dict[str, Any]]:
    path = Path(study_dir) / STUDY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{study_dir} holds no study ({STUDY_FILE} is missing); start it with untrainable tune")
    spec = _read_json(path)
    settings = dict(spec["settings"], tune_seeds=tuple(spec["settings"]["tune_seeds"]))
    return (
        from_dict(RunConfig, spec["config"]),
        space_from_dict(spec["space"], spec.get("space_source", str(path))),
        Settings(**settings).validate(),
        spec,
    )


def open_study(study_dir: Path, storage_url: str | None, study_name: str, worker: int = 0) -> Any:
    """The study in `storage_url` (an RDB) or in the folder's journal file, created on first use.

    Each worker's sampler is seeded differently (`sampler_seed + worker`) and
    TPE lies about running trials (constant liar), so parallel workers do
    not draw the same values.
    """
    import optuna

    _, _, settings, spec = read_study(study_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = optuna.samplers.TPESampler(
        seed=settings.sampler_seed + worker, constant_liar=True, n_startup_trials=settings.startup_trials()
    )
    return optuna.create_study(
        storage=_storage(study_dir, storage_url),
        study_name=study_name,
        direction=spec["direction"],
        sampler=sampler,
        pruner=_pruner(settings),
        load_if_exists=True,
    )


def _storage(study_dir: Path, storage_url: str | None) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage_url:
        return storage_url
    return JournalStorage(JournalFileBackend(str(Path(study_dir) / JOURNAL)))


def _pruner(settings: Settings) -> Any:
    """Median (a trial below the median of finished ones at the same step stops), successive halving, or none.

    Both start after a few finished trials; `prune_after` epochs of each seed are never pruned (the worker asks only later).
    """
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, settings.startup_trials() // 2))
    if settings.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(reduction_factor=3)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- workers


@contextlib.contextmanager
def _file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` while the block runs; yields False when `blocking` is off and another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _alive(study_dir: Path, worker: str | None) -> bool:
    """Whether the worker named `worker` still runs: it holds its lock file for as long as it lives."""
    if not worker:
        return False
    with _file_lock(study_dir / "workers" / f"{worker}.lock", blocking=False) as free:
        return not free


def _sweep(study: Any, study_dir: Path, max_retries: int, log: Callable[[str], None]) -> None:
    """Mark failed the RUNNING trials whose worker died; retry each failed trial (same values, same folder).

    Journal storage has no heartbeat: a worker's liveness is its lock file.
    Retries are Optuna's own (`RetryHeartbeatStaleTrialCallback`): a WAITING
    copy of the trial whose system attributes name the trials it retries.
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _alive(study_dir, trial.user_attrs.get("worker")):
            study.tell(trial.number, state=TrialState.FAIL)
            folder = trial.user_attrs.get("folder")
            _note(study_dir, folder, {"state": "failed", "why": "its worker died"})
            log(f"trial {trial.number} failed: its worker ({trial.user_attrs.get('worker')}) died")
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.number not in retried:
            before = len(trials)
            retry(study, trial)
            if len(study.get_trials(deepcopy=False)) > before:
                log(
                    f"trial {trial.number} will be run again (in {trial.user_attrs.get('folder')}, from its checkpoints)"
                )


def _note(study_dir: Path, folder: str | None, changes: dict[str, Any]) -> None:
    """Update a trial folder's trial.json."""
    if not folder:
        return
    path = study_dir / "trials" / folder / "trial.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_json(path) if path.exists() else {}
    _write_json(path, {**data, **changes})


def counts(study: Any) -> dict[str, int]:
    """Trials by state: complete, pruned, failed, running, waiting."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    names = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    for trial in study.get_trials(deepcopy=False):
        out[names[trial.state.name]] += 1
    return out


_DATA: dict[str, DataSplits] = {}  # a worker process loads a data set once


def work(
    study_dir: str | Path,
    storage_url: str | None = None,
    study_name: str | None = None,
    worker: int = 0,
    log: Callable[[str], None] | None = None,
    on_finish: Callable[[dict[str, int]], None] | None = None,
) -> int:
    """Pull trials of the study until it has its number of finished trials; returns the trials run here.

    Any number of workers (processes, cluster jobs) may call this on the same
    study at once: asking for a trial happens under the folder's lock, so
    the study never gets more trials than its budget and no trial runs twice.
    `on_finish(counts)` is called after each trial this worker ends.
    """
    study_dir = Path(study_dir)
    config, space, settings, spec = read_study(study_dir)
    name = study_name or default_study_name(study_dir)
    log = log or (lambda line: print(f"[{name}] {line}", flush=True))
    study = open_study(study_dir, storage_url, name, worker)
    me = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ran = 0
    with _file_lock(study_dir / "workers" / f"{me}.lock"):
        while True:
            with _file_lock(study_dir / ".ask.lock"):
                _sweep(study, study_dir, settings.max_retries, log)
                n = counts(study)
                if n["complete"] + n["pruned"] >= settings.trials:
                    break
                trial = None
                if n["complete"] + n["pruned"] + n["running"] < settings.trials:
                    trial = study.ask()
                    trial.set_user_attr("worker", me)
                    folder = trial.user_attrs.get("folder") or f"trial-{trial.number:04d}"
                    trial.set_user_attr("folder", folder)
            if trial is None:
                time.sleep(2.0)  # the others' trials are running; one may die and need a retry
                continue
            run_trial(study, trial, study_dir, config, space, settings, spec["metric"], log)
            ran += 1
            if on_finish is not None:
                on_finish(counts(study))
    with contextlib.suppress(OSError):
        (study_dir / "workers" / f"{me}.lock").unlink()
    return ran


def default_study_name(study_dir: Path) -> str:
    return Path(study_dir).resolve().name


def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / "history.json"
    try:
        return json.loads(path.read_text()) if path.exists() else []
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []  # written again by the resumed run


class _Pruned(Exception):
    """Raised in a run's epoch hook when Optuna says the trial should stop."""


def run_trial(
    study: Any,
    trial: Any,
    study_dir: Path,
    config: RunConfig,
    space: Space,
    settings: Settings,
    metric: str,
    log: Callable[[str], None],
) -> None:
    """Train the trial's config on every tuning seed, reporting each epoch's validation metric; tell Optuna the end."""
    from optuna.trial import TrialState

    from untrainable.experiment import Arm, _run_arm
    from untrainable.step import NonFiniteError

    folder = trial.user_attrs["folder"]
    values = space.suggest(trial)
    retries = study.get_trials(deepcopy=False)[trial.number].system_attrs.get("retry_history")
    _note(
        study_dir,
        folder,
        {"number": trial.number, "params": values, "state": "running", "worker": trial.user_attrs["worker"]}
        | ({"retry_of": retries} if retries else {}),
    )
    epochs = config.train.epochs
    prune_after = settings.prune_after if settings.prune_after is not None else max(1, epochs // 4)
    arm = Arm(folder, trial_config(config, space, values))
    per_seed: list[float] = []
    started = time.time()
    try:
        for k, seed in enumerate(settings.tune_seeds):
            run_folder = study_dir / "trials" / folder / f"seed{seed}"
            for entry in _history(run_folder):  # epochs trained before a retry: reported again
                trial.report(entry[f"val_{metric}"], k * epochs + entry["epoch"])

            def on_epoch(entry: dict[str, Any], k: int = k, seed: int = seed) -> None:
                trial.report(entry[f"val_{metric}"], k * epochs + entry["epoch"])
                if entry["epoch"] > prune_after and trial.should_prune():
                    raise _Pruned(f"seed {seed}, epoch {entry['epoch']}")

            result = _run_arm(arm, seed, study_dir / "trials", _quiet(log), _DATA, progress=True, on_epoch=on_epoch)
            per_seed.append(objective_value(result.final, metric, settings.objective))
    except _Pruned as where:
        study.tell(trial, state=TrialState.PRUNED)
        _note(study_dir, folder, {"state": "pruned", "pruned_at": str(where), "seconds": time.time() - started})
        _line(study, trial.number, "pruned at " + str(where), values, log)
        return
    except NonFiniteError as err:  # diverged: a result the sampler learns from, not a failure to retry
        study.tell(trial, state=TrialState.PRUNED)
        _note(study_dir, folder, {"state": "pruned", "pruned_at": f"diverged: {err}", "seconds": time.time() - started})
        _line(study, trial.number, "pruned (diverged)", values, log)
        return
    except BaseException as err:
        study.tell(trial, state=TrialState.FAIL)
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
        _note(study_dir, folder, {"state": "failed", "why": why})
        log(f"trial {trial.number} failed ({why}); it is retried when the study runs again")
        raise
    value = statistics.fmean(per_seed)
    study.tell(trial, value)
    _note(
        study_dir,
        folder,
        {"state": "complete", "value": value, "per_seed": dict(zip(map(str, settings.tune_seeds), per_seed))}
        | {"seconds": time.time() - started},
    )
    _line(study, trial.number, f"{value:.4f}", values, log)


def _quiet(log: Callable[[str], None]) -> Callable[[str], None]:
    """A run's lines worth a tuning log: only a restart (never the per-run start lines or any test number)."""
    return lambda line: log(line) if "trained again" in line else None


def objective_value(final: dict[str, Any], metric: str, objective: str) -> float:
    """A finished run's validation metric at its best validation epoch, or at its last."""
    if objective == "best":
        return float(final["best"]["val"][metric])
    return float(final["val"][metric])


def _line(study: Any, number: int, outcome: str, values: dict[str, Any], log: Callable[[str], None]) -> None:
    """One progress line: the trial, its values, its outcome, the best so far and how many are finished."""
    n = counts(study)
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    params = " ".join(f"{k}={_short(v)}" for k, v in values.items())
    log(f"trial {number}: {outcome} | {params} | {best} | {n['complete'] + n['pruned']} finished")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- driving a study


def _worker_main(study_dir: str, storage_url: str | None, study_name: str, worker: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards a stop as SIGTERM; the run checkpoints
    try:
        work(study_dir, storage_url, study_name, worker)
    except KeyboardInterrupt:
        sys.exit(143)


def run_workers(
    study_dir: Path, storage_url: str | None, study_name: str, workers: int, log: Callable[[str], None] = print
) -> None:
    """Run `workers` local processes of `work` on the study (one in this process when 1) until it is done.

    A progress bar on a terminal counts finished trials. Ctrl-C or SIGTERM
    stops each worker after a checkpoint; the same command continues.
    """
    import multiprocessing

    _, _, settings, _ = read_study(study_dir)
    if workers < 1:
        raise ConfigError(f"--workers: expected a number >= 1, got {workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    procs = [
        context.Process(
            target=_worker_main,
            args=(str(study_dir), storage_url, study_name, i, max(1, cores // workers)),
            name=f"tune-worker-{i}",
        )
        for i in range(workers)
    ]
    study = open_study(study_dir, storage_url, study_name)
    bar = _bar(settings.trials, study_name)

    def stop(signum: int, frame: Any) -> None:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        raise KeyboardInterrupt(f"stopped by signal {signum}; every worker stops after a checkpoint")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in procs:
            proc.start()
        while any(proc.is_alive() for proc in procs):
            for proc in procs:
                proc.join(timeout=2.0 / workers)
            _advance(bar, counts(study))
    except KeyboardInterrupt:
        for proc in procs:
            proc.join()
        raise
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [proc.name for proc in procs if proc.exitcode != 0]
    if failed:
        raise RuntimeError(
            f"{', '.join(failed)} stopped with an error (see its lines above); run the same command again to continue "
            "(its trial is retried from its checkpoints)"
        )


def _bar(total: int, name: str) -> Any:
    """A bar of finished trials, drawn on a terminal only (log files get the trial lines)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="trial", disable=None, leave=False)


def _advance(bar: Any, n: dict[str, int]) -> None:
    bar.n = min(bar.total, n["complete"] + n["pruned"])
    bar.set_postfix(pruned=n["pruned"], failed=n["failed"], refresh=False)
    bar.refresh()


def best_config(study: Any, study_dir: Path) -> tuple[RunConfig, Any]:
    """The best trial's config (its first tuning seed) and the trial; ValueError when no trial completed."""
    config, space, settings, _ = read_study(study_dir)
    try:
        trial = study.best_trial
    except ValueError:
        raise ValueError(
            f"{study_dir}: no trial completed (all pruned or failed); widen the space or add trials"
        ) from None
    best = trial_config(config, space, trial.params).with_section("train", seed=settings.tune_seeds[0], progress=True)
    return best, trial


def finish_study(study: Any, study_dir: Path, arm: str) -> dict[str, Any]:
    """Write best.toml, trials.json and the figures (optimisation history, parameter importances); return a summary."""
    from untrainable.plots import plot_study

    config, space, settings, spec = read_study(study_dir)
    best, trial = best_config(study, study_dir)
    folder = trial.user_attrs.get("folder", f"trial-{trial.number:04d}")
    per_seed = _read_json(study_dir / "trials" / folder / "trial.json").get("per_seed", {})
    seed = settings.tune_seeds[0]
    comments = [
        f"{arm}: the best of {settings.trials} trials of {study_dir} (trial {trial.number}, {folder}), tuned on validation.",
        f"Objective: validation {spec['metric']} at the {'best validation' if settings.objective == 'best' else 'last'} "
        f"epoch, mean over seeds {', '.join(map(str, settings.tune_seeds))}: {trial.value:.4f} "
        f"(per seed: {', '.join(f'{s}: {v:.4f}' for s, v in per_seed.items())}).",
        f"train.seed = {seed} reproduces that trial's seed-{seed} run; change it for other seeds.",
        "Tuned: " + ", ".join(f"{k} = {_short(v)}" for k, v in trial.params.items()) + ".",
        f"Run: untrainable train --config {study_dir / 'best.toml'} --out runs/{best.name}",
    ]
    (study_dir / "best.toml").write_text(to_toml(best, comments))
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": t.params,
                "folder": t.user_attrs.get("folder"),
                "last_step": t.last_step,
                "retry_of": t.system_attrs.get("retry_history"),
            }
        )
    _write_json(study_dir / "trials.json", rows)
    figures = plot_study(study, study_dir, title=f"{arm}: validation {spec['metric']}")
    n = counts(study)
    return {
        "arm": arm,
        "trials": n,
        "best_trial": trial.number,
        "best_value": trial.value,
        "best_params": trial.params,
        "figures": [str(p.name) for p in figures],
    }


def tune(
    config: RunConfig,
    space: Space,
    settings: Settings,
    out: Path,
    workers: int = 1,
    storage_url: str | None = None,
    study_name: str | None = None,
    arm: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune `config` over `space`: the study in `out` until it has `settings.trials` finished trials, then its summary."""
    out = Path(out)
    prepare(out, config, space, settings)
    name = study_name or default_study_name(out)
    log(
        f"[{name}] tuning {config.name}: {settings.trials} trials over {', '.join(space.paths)}; objective validation "
        f"{metric_of(config)[0]} at the {settings.objective} epoch, mean over seeds "
        f"{', '.join(map(str, settings.tune_seeds))}; pruner {settings.pruner}; {workers} worker(s); study in "
        f"{storage_url or out / JOURNAL}"
    )
    if workers == 1:
        bar = _bar(settings.trials, name)

        def line(text: str) -> None:
            if bar.disable:
                log(f"[{name}] {text}")
            else:
                bar.write(f"[{name}] {text}")

        try:
            work(out, storage_url, name, log=line, on_finish=lambda n: _advance(bar, n))
        finally:
            bar.close()
    else:
        run_workers(out, storage_url, name, workers, log)
    return finish_study(open_study(out, storage_url, name), out, arm or config.name)


def unguided(config: RunConfig) -> RunConfig:
    """The guided config's baseline twin: the same config without guide, guidance or distillation."""
    return config.replace(
        guide=None, guides=None, guidance=GuidanceSpec(), distill=DistillSpec(), name=f"{config.name}-alone"
    )


def compare(
    guided: RunConfig,
    base: RunConfig,
    space: Space,
    guided_space: Space,
    settings: Settings,
    out: Path,
    seeds: int = 5,
    workers: int = 1,
    storage_url: str | None = None,
    study_name: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, Path, dict[str, Any]]:
    """The fair comparison: `base` over `space` and `guided` over `space` + `guided_space`, the same budget each.

    Same trials, sampler, pruner, objective and tuning seeds; then the best
    config of each trained on `seeds` seeds the tuning did not use, in one
    table (test at the last and at the best validation epoch, Δ in pooled seed
    stds, per-seed values) with a verdict. Returns (experiment, folder, table).
    """
    from untrainable.experiment import Arm, Experiment, run_experiment, write_table

    out = Path(out)
    if not guided.guide_entries():
        raise ConfigError(f"--compare: the config {guided.name!r} has no [guide] or [[guides]]; give the guided config")
    if base.guide_entries():
        raise ConfigError(
            f"--config: the baseline {base.name!r} has a guide; give the unguided config (or leave --config out)"
        )
    if seeds < 1:
        raise ConfigError(f"--seeds: expected a number >= 1, got {seeds}")
    full = space.with_extra(guided_space)
    space.check(base)  # every refusal before any trial runs
    full.check(guided)
    arms = {"alone": (base, space), "guided": (guided, full)}
    name = study_name or default_study_name(out)
    for arm, (config, arm_space) in arms.items():
        prepare(out / arm, config, arm_space, settings)
    started = time.time()
    summaries = {}
    for arm, (config, arm_space) in arms.items():
        summaries[arm] = tune(config, arm_space, settings, out / arm, workers, storage_url, f"{name}-{arm}", arm, log)
    tuned = time.time() - started
    final_seeds = tuple(s for s in range(max(settings.tune_seeds) + seeds + 1) if s not in settings.tune_seeds)[:seeds]
    bests = {arm: read_best(out / arm) for arm in arms}
    metric = metric_of(guided)[0]
    experiment = Experiment(
        name=out.name,
        description=(
            f"The fair comparison: `alone` ({base.name}) tuned over {', '.join(space.paths)}; `guided` ({guided.name}) "
            f"over the same and {', '.join(p for p in full.paths if p not in space.paths)}; {settings.trials} trials each, "
            f"the same TPE sampler (seed {settings.sampler_seed}), {settings.pruner} pruner and objective (validation "
            f"{metric} at the {settings.objective} epoch, mean over tuning seeds "
            f"{', '.join(map(str, settings.tune_seeds))}). Each arm's best config (best.toml) then trained on seeds "
            f"{', '.join(map(str, final_seeds))}, which the tuning did not use. Test {metric} at the last epoch and at "
            "the best validation epoch, mean ± std over seeds; Δ / std: difference to `alone` in pooled seed standard "
            f"deviations (more than {EFFECT_SDS:g} counts as an effect)."
        ),
        arms=[Arm(arm, bests[arm]) for arm in arms],
        metric=metric,
        higher_is_better=metric == "accuracy",
        seeds=final_seeds,
        baseline="alone",
    )
    for arm in arms:
        s = summaries[arm]
        n = s["trials"]
        experiment.notes.append(
            f"`{arm}` tuning: {n['complete']} complete, {n['pruned']} pruned, {n['failed']} failed trials; best trial "
            f"{s['best_trial']} (validation {s['best_value']:.4f}): "
            + ", ".join(f"{k} = {_short(v)}" for k, v in s["best_params"].items())
            + f". Figures: {arm}/optimisation_history.png, {arm}/param_importances.png."
        )
    table = run_experiment(experiment, out / "final", jobs=workers, log=log)
    table["notes"].append(verdict(table))
    table["tuning_seconds"] = tuned
    table["tuning"] = summaries
    table["tune_seeds"] = list(settings.tune_seeds)
    write_table(experiment, table, out / "final")
    for name_ in ("table.md", "table.json"):
        (out / name_).write_text((out / "final" / name_).read_text())
    return experiment, out, table


def read_best(study_dir: Path) -> RunConfig:
    from untrainable.config import load_config

    return load_config(Path(study_dir) / "best.toml")


def verdict(table: dict[str, Any]) -> str:
    """One sentence: guided − alone at the last and at the best validation epoch, in seed stds, and what that means."""
    metric = table["metric"]
    rows = {row["arm"]: row for row in table["rows"]}
    sign = 1 if metric == "accuracy" else -1
    parts, leads = [], []
    for label, key in (("the last epoch", "vs_baseline"), ("the best validation epoch", "best_vs_baseline")):
        vs = rows["guided"].get(key)
        if vs is None:
            continue
        sd = vs["sd"]
        parts.append(f"{vs['difference']:+.3f} ({'—' if sd is None else f'{sd:+.1f}'} std) at {label}")
        leads.append(None if sd is None or math.isnan(sd) else sign * sd)
    if leads and all(s is not None and s > EFFECT_SDS for s in leads):
        word = "the guided arm leads"
    elif leads and all(s is not None and s < -EFFECT_SDS for s in leads):
        word = "the tuned baseline leads"
    else:
        word = f"no clear lead (within {EFFECT_SDS:g} seed stds at one epoch or both)"
    return f"Verdict: guided − alone = {'; '.join(parts)}: {word}."
