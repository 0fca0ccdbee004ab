"""Tuning with Optuna: a study in a folder, and the workers that pull its trials.

A study folder holds everything a worker needs: `study.json` (the config,
the space, the settings), the study itself (Optuna's journal file
`journal.log`, or an RDB named by a storage URL) and one folder per trial
under `trials/` (`trial-NNNN/seedS/`, ordinary run folders, and `trial.json`:
number, parameters, state, value). `work(study_dir, storage_url,
study_name)` pulls trials until the study has its number of finished
(complete or pruned) trials: `compare.run_workers` runs K of them on the
study's executor (local processes or SLURM jobs, `untrainable.executor`).

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
import os
import socket
import statistics
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from untrainable.config import ConfigError, RunConfig, from_dict
from untrainable.data import DataSplits
from untrainable.runs import fcntl
from untrainable.space import Space, enqueued_points, space_from_dict
from untrainable.trackers import log_trial, study_logging
from untrainable.tune_checks import (
    check_journal,
    check_out,
    check_same_storage,
    check_spec,
    check_storage,
    recorded_name,
    storage_label,
)

STUDY_FILE = "study.json"
JOURNAL = "journal.log"
OBJECTIVES = ("best", "last")
PRUNERS = ("median", "halving", "none")
SAMPLERS = ("tpe", "random", "qmc", "gp")


@dataclass(frozen=True)
class Settings:
    """How a study tunes: the budget, the objective, the seeds, the sampler and the pruner.

    `sampler`: Optuna's TPE (multivariate, grouped by conditional branch, with a
    constant liar for parallel workers), random, quasi-random (Sobol) or
    Gaussian-process sampler.
    """

    trials: int
    objective: str = "best"
    tune_seeds: tuple[int, ...] = (0, 1)
    pruner: str = "median"
    sampler_seed: int = 0
    prune_after: int | None = None  # epochs of each seed never pruned; default a quarter of the epochs
    max_retries: int = 2  # a failed trial is run again at most this many times
    sampler: str = "tpe"

    def validate(self) -> "Settings":
        if self.trials < 1:
            raise ConfigError(f"--trials: expected a number >= 1, got {self.trials}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler: {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner: {self.pruner!r} is not one of {', '.join(PRUNERS)}")
        if not self.tune_seeds or len(set(self.tune_seeds)) != len(self.tune_seeds):
            raise ConfigError(f"--tune-seeds: expected distinct seeds, got {list(self.tune_seeds)}")
        if self.prune_after is not None and self.prune_after < 0:
            raise ConfigError(f"--prune-after: expected epochs >= 0, got {self.prune_after}")
        return self

    def startup_trials(self) -> int:
        """Trials drawn at random (enqueued ones count) before TPE or GP models the rest: a third, at least 5."""
        return max(5, self.trials // 3)


def metric_of(config: RunConfig) -> tuple[str, str]:
    """(validation metric, Optuna direction): accuracy up for classification, else the loss down."""
    return ("accuracy", "maximize") if config.train.task == "classification" else ("loss", "minimize")


def trial_config(config: RunConfig, space: Space, values: dict[str, Any]) -> RunConfig:
    """A trial's config: `values` set, early stopping on (the test at the best validation epoch is reported too)."""
    return space.apply(config, values).with_section("train", early_stopping=True, progress=False)


# ---------------------------------------------------------------- study folders


def prepare(
    study_dir: Path,
    config: RunConfig,
    space: Space,
    settings: Settings,
    study_name: str | None = None,
    storage_url: str | None = None,
    arm: str | None = None,
    points: tuple[tuple[str, dict[str, Any]], ...] = (),
) -> dict[str, Any]:
    """Write (or check) `study.json`: a study folder is continued only with the same config, space and settings.

    The number of trials may grow (the study continues up to it), never
    shrink. The study's name in the storage (default: the name the folder
    records, else the folder's name, so a copied folder continues its own
    study) and its storage are recorded, so a worker given only the folder
    finds it, and a run with another storage is refused. The trials enqueued
    first (`enqueued`): the config's own values, then `points` ((source,
    {dotted path: value})) that lie in the space; `arm` names the arm's seed
    stream (default: the config's name).
    """
    path = Path(study_dir) / STUDY_FILE
    check_out(study_dir, (STUDY_FILE,))
    check_journal(Path(study_dir) / JOURNAL)
    check_storage(storage_url)
    space.check(config)
    study_name = study_name or recorded_name(path)
    metric, direction = metric_of(config)
    spec = {
        "config": config.to_dict(),
        "space": space.to_dict(),
        "space_source": space.source,
        "settings": dataclasses.asdict(settings),
        "metric": metric,
        "direction": direction,
        "study_name": study_name or default_study_name(study_dir),
        "storage": storage_label(storage_url),
        "arm": arm or config.name,
        "enqueued": enqueued_points(config, space, points, arm or config.name),
    }
    if path.exists():
        saved = check_spec(path, read_json(path))
        check_same_storage(path, saved, storage_url)
        if saved["settings"].get("trials", 0) > settings.trials:
            raise ConfigError(
                f"--trials {settings.trials}: {path} records a budget of {saved['settings']['trials']} trials; "
                f"give --trials {saved['settings']['trials']} or more (a study's budget may grow, not shrink)"
            )
        keep = {k: saved[k] for k in spec if k in saved and k not in ("settings", "space_source")}  # older: fewer keys
        mine = {k: json.loads(json.dumps(spec[k])) for k in keep}
        defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
        old = {k: v for k, v in (defaults | (saved.get("settings") or {})).items() if k != "trials"}
        new = {k: v for k, v in json.loads(json.dumps(spec["settings"])).items() if k != "trials"}
        changed = [k for k in keep if keep[k] != mine[k]] + [f"settings.{k}" for k in new if old.get(k) != new[k]]
        if changed == ["study_name"]:
            raise ConfigError(
                f"--study-name {spec['study_name']}: {path} records the study {saved['study_name']!r}; "
                f"give --study-name {saved['study_name']} or leave it out, or another --out for a new study"
            )
        if changed:
            raise ValueError(
                f"{study_dir} holds a study of another {' and '.join(changed)}; choose another --out, "
                "or run the command that started it"
            )
    study_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, spec)
    return spec


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or remove the study folder") from None


def write_json(path: Path, data: Any) -> None:
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
    spec = check_spec(path, read_json(path))
    try:
        settings = dict(spec["settings"], tune_seeds=tuple(spec["settings"]["tune_seeds"]))
        return (
            from_dict(RunConfig, spec["config"]),
            space_from_dict(spec["space"], spec.get("space_source", str(path))),
            Settings(**settings).validate(),
            spec,
        )
    except (ConfigError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a study file ({err}); restore it from a copy, or start the study again in another --out"
        ) from None


def open_study(study_dir: Path, storage_url: str | None, study_name: str, seed: int | None = None) -> Any:
    """The study in `storage_url` (an RDB) or in the folder's journal file, created on first use.

    Its sampler draws from `seed` (a process that asks for trials claims its
    own first: `claim_seed`); TPE lies about running trials (constant liar),
    so parallel workers do not draw the same values.
    """
    import optuna

    _, _, settings, spec = read_study(study_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.create_study(
        storage=_storage(study_dir, storage_url),
        study_name=study_name,
        direction=spec["direction"],
        sampler=make_sampler(settings, seed),
        pruner=_pruner(settings),
        load_if_exists=True,
    )


def make_sampler(settings: Settings, seed: int | None) -> Any:
    """The study's sampler drawing from `seed`."""
    import optuna

    startup = settings.startup_trials()
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    if settings.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
    )


def seed_stream(sampler_seed: int, arm: str, process: int) -> int:
    """The sampler seed of a study's `process`-th asking process in `arm`: apart from every other (arm, process)."""
    import numpy as np

    return int(np.random.SeedSequence([sampler_seed, zlib.crc32(arm.encode()), process]).generate_state(1)[0])


def claim_seed(study: Any, settings: Settings, arm: str, worker: str) -> int:
    """Give this process the study's next process number and its seed stream, recorded in the study.

    Call it under the folder's ask lock. Each process (a local worker, a
    resumed run, a SLURM job) draws from its own stream, so none repeats
    another's draws; the study's `process-K` attribute names its worker and seed.
    """
    process = int(study.user_attrs.get("processes", 0))
    seed = seed_stream(settings.sampler_seed, arm, process)
    study.set_user_attr("processes", process + 1)
    study.set_user_attr(f"process-{process}", {"worker": worker, "seed": seed})
    return seed


def enqueue(study: Any, spec: dict[str, Any]) -> None:
    """Enqueue the study's first trials (`study.json`'s `enqueued`) once, before any other is asked for."""
    if study.user_attrs.get("enqueued") is not None:
        return
    for point in spec.get("enqueued", []):
        study.enqueue_trial(point["params"], user_attrs={"enqueued": point["source"]})
    study.set_user_attr("enqueued", len(spec.get("enqueued", [])))


def _storage(study_dir: Path, storage_url: str | None) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage_url:
        return storage_url
    check_journal(Path(study_dir) / JOURNAL)
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
    data = read_json(path) if path.exists() else {}
    write_json(path, {**data, **changes})
    if changes.get("state") in ("complete", "pruned"):  # a finished trial: a tracker run of its own
        config, _, _, spec = read_study(study_dir)
        tracking = study_logging(config.logging, study_dir, spec["study_name"])
        log_trial(study_dir, tracking, {**data, **changes, "folder": folder})


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
    check_same_storage(study_dir / STUDY_FILE, spec, storage_url)
    check_storage(storage_url)
    name = study_name or spec["study_name"]
    log = log or (lambda line: print(f"[{name}] {line}", flush=True))
    study = open_study(study_dir, storage_url, name)
    config = config.replace(logging=study_logging(config.logging, study_dir, name))  # trial runs: one study
    me = _job_prefix() + f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ran = 0
    with _file_lock(study_dir / "workers" / f"{me}.lock"):
        with _file_lock(study_dir / ".ask.lock"):
            enqueue(study, spec)
            seed = claim_seed(study, settings, spec.get("arm", name), f"{me} (index {worker})")
            study.sampler = make_sampler(settings, seed)
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


def _job_prefix() -> str:
    """In a SLURM job, `jobID-` (an array task: `jobARRAY_TASK-`, as squeue and submitit write it): its trials name it."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"job{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}-"
    return f"job{env['SLURM_JOB_ID']}-" if env.get("SLURM_JOB_ID") else ""


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

    from untrainable.arms import Arm, run_arm
    from untrainable.step import NonFiniteError

    folder = trial.user_attrs["folder"]
    values = space.suggest(trial)
    retries = study.get_trials(deepcopy=False)[trial.number].system_attrs.get("retry_history")
    _note(
        study_dir,
        folder,
        {"number": trial.number, "params": values, "state": "running", "worker": trial.user_attrs["worker"]}
        | ({"retry_of": retries} if retries else {})
        | ({"enqueued": trial.user_attrs["enqueued"]} if "enqueued" in trial.user_attrs else {}),
    )
    epochs = config.train.epochs
    prune_after = settings.prune_after if settings.prune_after is not None else max(1, epochs // 4)
    arm = Arm(folder, trial_config(config, space, values))
    per_seed: list[float] = []
    enqueued = "enqueued" in trial.user_attrs  # runs to its end: the search cannot lose to it by pruning it
    started = time.time()
    try:
        for k, seed in enumerate(settings.tune_seeds):
            run_folder = study_dir / "trials" / folder / f"seed{seed}"
            for entry in _history(run_folder):  # epochs trained before a retry: reported again
                trial.report(entry[f"val_{metric}"], k * epochs + entry["epoch"])

            def on_epoch(entry: dict[str, Any], k: int = k, seed: int = seed) -> None:
                trial.report(entry[f"val_{metric}"], k * epochs + entry["epoch"])
                if entry["epoch"] > prune_after and not enqueued and trial.should_prune():
                    raise _Pruned(f"seed {seed}, epoch {entry['epoch']}")

            result = run_arm(arm, seed, study_dir / "trials", _quiet(log), _DATA, progress=True, on_epoch=on_epoch)
            per_seed.append(objective_value(result.final, metric, settings.objective))
    except _Pruned as where:
        study.tell(trial, state=TrialState.PRUNED)
        _note(
            study_dir,
            folder,
            {"state": "pruned", "pruned_at": str(where), "value_at_prune": _partial(study_dir, folder, metric, settings)}
            | _cost(study_dir, folder, started),
        )
        _line(study, trial.number, "pruned at " + str(where), values, log)
        return
    except NonFiniteError as err:  # diverged: a result the sampler learns from, not a failure to retry
        study.tell(trial, state=TrialState.PRUNED)
        _note(study_dir, folder, {"state": "pruned", "pruned_at": f"diverged: {err}"} | _cost(study_dir, folder, started))
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
        | _cost(study_dir, folder, started),
    )
    _line(study, trial.number, f"{value:.4f}", values, log)


def _partial(study_dir: Path, folder: str, metric: str, settings: Settings) -> float | None:
    """A pruned trial's objective over the epochs it trained: the mean over its seeds' runs so far."""
    per_seed = []
    for seed in settings.tune_seeds:
        history = _history(study_dir / "trials" / folder / f"seed{seed}")
        curve = [entry[f"val_{metric}"] for entry in history]
        if curve:
            best = max(curve) if metric == "accuracy" else min(curve)
            per_seed.append(best if settings.objective == "best" else curve[-1])
    return statistics.fmean(per_seed) if per_seed else None


def _cost(study_dir: Path, folder: str, started: float) -> dict[str, Any]:
    """A trial's cost: seconds this run of it took and the epochs its seeds trained (a retry's earlier ones too)."""
    epochs = sum(len(_history(run)) for run in (study_dir / "trials" / folder).glob("seed*"))
    return {"seconds": time.time() - started, "epochs": epochs}


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
    params = " ".join(f"{k}={format_value(v)}" for k, v in values.items())
    log(f"trial {number}: {outcome} | {params} | {best} | {n['complete'] + n['pruned']} finished")


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
