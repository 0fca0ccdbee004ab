"""Experiments: named arms, each trained over several seeds, summarised in one table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from untrainable.arms import Arm, RunWork, arm_config, arm_folder, check_arm_folder, read_result
from untrainable.cluster import SlurmSettings
from untrainable.config import LoggingSpec
from untrainable.data import DataSplits
from untrainable.dispatch import executor_for, run_all
from untrainable.executor import Detached, StudyFailed, Work
from untrainable.registry import Registry
from untrainable.trackers import study_logging
from untrainable.trainer import RunResult

__all__ = ["Arm", "EXPERIMENTS", "Experiment", "register_experiment", "run_experiment", "run_study"]


@dataclass
class Experiment:
    """A list of arms, the metric to report, and how to describe them."""

    name: str
    description: str
    arms: list[Arm]
    metric: str = "accuracy"
    higher_is_better: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    notes: list[str] = field(default_factory=list)
    # The arm every other is compared with: the table then gives each row's
    # test difference to it, in pooled seed standard deviations, and the per-seed numbers.
    baseline: str | None = None
    # Analysis after the table (error consistency, similarity maps...):
    # called as after(out_folder, table, results) and may add keys to the table.
    after: Callable[[Path, dict[str, Any], dict[str, list[RunResult]]], None] | None = None


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register_experiment(name: str) -> Callable[[Callable[..., Experiment]], Callable[..., Experiment]]:
    """Register `builder(quick: bool) -> Experiment | list[Experiment]` under `name`.

    A list is a study of several experiments (each with its own metric), run
    one after another into sub-folders named after each.
    """
    return EXPERIMENTS.register(name)


def run_experiment(
    experiment: Experiment,
    out: str | Path,
    seeds: tuple[int, ...] | None = None,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    cluster: SlurmSettings | None = None,
    detach: bool = False,
) -> dict[str, Any]:
    """Train every arm for every seed (finished runs are reused, interrupted ones resumed) and write the table.

    Runs go to the study's executor (`untrainable.executor`): this process,
    `jobs` processes (each with cores / jobs threads) or, with `cluster`,
    SLURM jobs (`detach` submits and raises Detached); an arm's run starts
    once the run it takes its guide from (same seed) has finished. A failed
    run ends in StudyFailed once every other has ended (in this process: its
    error, at once).
    Writes into `out`: one run folder per arm and seed (`ARM/seedN/`),
    `table.md`, `table.json` and `curves.png`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds) if seeds else experiment.seeds
    names = [arm.name for arm in experiment.arms]
    for arm in experiment.arms:
        if arm.guide_from is not None and arm.guide_from not in names[: names.index(arm.name)]:
            raise ValueError(f"arm {arm.name!r}: guide_from {arm.guide_from!r} must name an earlier arm")
        if arm.runs_in is not None and (arm.guide_from is not None or arm.runs_in.count("/") != 1):
            raise ValueError(f"arm {arm.name!r}: runs_in {arm.runs_in!r} must be EXPERIMENT/ARM, without guide_from")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    started = time.time()
    tasks = [(arm, seed) for arm in experiment.arms for seed in seeds]
    for arm, seed in tasks:  # refuse a folder of other runs before anything trains
        folder = arm_folder(arm, seed, out)
        if (folder / "config.json").exists() or (folder / "checkpoints").is_dir():
            check_arm_folder(folder, arm_config(arm, seed, out), arm.guide_from)  # read only: no lock held
    done = _run_tasks(tasks, out, log, jobs, cluster, detach)
    results = {arm.name: [done[arm.name, seed] for seed in seeds] for arm in experiment.arms}
    table = summarise(experiment, results, seeds)
    if experiment.after is not None:
        experiment.after(out, table, results)
    table["seconds"] = time.time() - started
    write_table(experiment, table, out)
    from untrainable.plots import plot_curves

    plot_curves(
        {name: [r.history for r in runs] for name, runs in results.items()},
        out / "curves.png",
        experiment.metric,
        title=experiment.name,
    )
    return table


def _run_tasks(
    tasks: list[tuple[Arm, int]],
    out: Path,
    log: Callable[[str], None],
    jobs: int,
    cluster: SlurmSettings | None,
    detach: bool,
) -> dict[tuple[str, int], RunResult]:
    """Each (arm, seed) a work item on the study's executor, a guided run after its guide's; their results."""
    inline = cluster is None and jobs == 1  # in this process: the runs share data sets, draw bars, raise as they are
    data_sets: dict[str, DataSplits] = {}
    folders = {f"{arm.name}/seed{seed}": arm_folder(arm, seed, out) for arm, seed in tasks}
    works = [
        Work(
            f"{arm.name}/seed{seed}",
            f"{arm.name} seed {seed}",
            RunWork(arm, seed, os.path.abspath(out), log if inline else None, data_sets if inline else None, inline),
            after=None if arm.guide_from is None else f"{arm.guide_from}/seed{seed}",
        )
        for arm, seed in tasks
    ]

    def finished(key: str) -> bool:
        return (folders[key] / "result.json").exists()

    with executor_for(out, jobs, cluster, log) as executor:
        outcome = run_all(
            executor, works, finished, log, "run(s)", detach, succeeded=lambda ended: finished(ended.key)
        )
    if detach and (outcome.live or outcome.waiting):
        raise Detached(
            f"{len(outcome.live)} run(s) submitted or running ({' '.join(outcome.live.values())}), "
            f"{len(outcome.succeeded)} done"
            + (f", {len(outcome.waiting)} waiting for their guide (submitted by a later run)" if outcome.waiting else "")
            + f"; run the same command again to collect the table (job ids in {out / 'slurm' / 'jobs.json'})"
        )
    if outcome.failed:
        labels = {work.key: work.label for work in works}
        raise StudyFailed(out, [(labels[e.key], e.handle, e.state, e.log) for e in outcome.failed])
    return {(arm.name, seed): read_result(folders[f"{arm.name}/seed{seed}"]) for arm, seed in tasks}


StudyStep = Union[Experiment, Callable[[dict[str, dict[str, Any]]], Experiment]]


def run_study(
    steps: Experiment | list[StudyStep],
    root: str | Path,
    seeds: tuple[int, ...] | None = None,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    cluster: SlurmSettings | None = None,
    detach: bool = False,
    logging: LoggingSpec | None = None,
    name: str | None = None,
) -> list[tuple[Experiment, Path, dict[str, Any]]]:
    """Run one experiment into `root`, or a study of several into `root/NAME/`, one after another.

    A step may be a function of the tables of the experiments before it
    (name -> table): how a study builds an arm from a choice made on an
    earlier experiment's validation split.
    Every run logs as `logging` says (default: the first arm's `[logging]`):
    to the study's trackers, under one MLflow experiment and parent run and
    one W&B group, named `name` (default: the folder's name); see `trackers.study_logging`.
    """
    steps = steps if isinstance(steps, list) else [steps]
    root = Path(root)
    tables: dict[str, dict[str, Any]] = {}
    done = []
    first = next((step for step in steps if isinstance(step, Experiment) and step.arms), None)
    spec = logging or (first.arms[0].config.logging if first is not None else None)
    if spec is not None:
        spec = study_logging(spec, root, name or root.resolve().name)
    for step in steps:
        experiment = step if isinstance(step, Experiment) else step(tables)
        if spec is not None:
            arms = [dataclasses.replace(arm, config=arm.config.replace(logging=spec)) for arm in experiment.arms]
            experiment = dataclasses.replace(experiment, arms=arms)
        out = root / experiment.name if len(steps) > 1 else root
        table = run_experiment(experiment, out, seeds=seeds, log=log, jobs=jobs, cluster=cluster, detach=detach)
        tables[experiment.name] = table
        done.append((experiment, out, table))
    return done


def _gap(final: dict[str, Any], metric: str) -> float | None:
    train, test = final.get("train", {}).get(metric), final["test"].get(metric)
    return None if train is None or test is None else train - test


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(experiment: Experiment, results: dict[str, list[RunResult]], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Mean and std over seeds of the test metric, the train-minus-test gap and the validation metric."""
    metric = experiment.metric
    rows = []
    for name, runs in results.items():
        test = _mean_std([r.final["test"].get(metric) for r in runs])
        val = _mean_std([r.final.get("val", {}).get(metric) for r in runs])
        train = _mean_std([r.final.get("train", {}).get(metric) for r in runs])
        # The gap in the experiment's own metric (a run's "gap" is in accuracy when it has one).
        gap = _mean_std([_gap(r.final, metric) for r in runs])
        row: dict[str, Any] = {
            "arm": name,
            "seeds": len(runs),
            f"test_{metric}": test,
            f"val_{metric}": val,
            f"train_{metric}": train,
            "gap": gap,
            "per_seed_test": [r.final["test"].get(metric) for r in runs],
        }
        if any("best" in r.final for r in runs):  # early stopping: test at each run's best validation epoch
            best = [r.final.get("best", {}).get("test", {}).get(metric) for r in runs]
            row[f"best_{metric}"] = _mean_std(best)
            row[f"best_val_{metric}"] = _mean_std([r.final.get("best", {}).get("val", {}).get(metric) for r in runs])
            row["per_seed_best"] = best
            row["best_epoch"] = [r.final.get("best", {}).get("epoch") for r in runs]
        for extra in sorted({k for r in runs for k in r.final.get("extra_test", {})}):
            row[f"{extra}_{metric}"] = _mean_std([r.final["extra_test"].get(extra, {}).get(metric) for r in runs])
        rows.append(row)
    table = {
        "experiment": experiment.name,
        "metric": metric,
        "seeds": list(seeds),
        "rows": rows,
        "notes": list(experiment.notes),
    }
    if experiment.baseline is not None:
        add_effects(table, experiment.baseline)
    return table


def effect(row: tuple[float, float], base: tuple[float, float]) -> tuple[float, float | None]:
    """(difference of means, difference in pooled seed stds sqrt((s1^2 + s2^2) / 2)); None where both stds are 0."""
    difference = row[0] - base[0]
    pooled = math.sqrt((row[1] ** 2 + base[1] ** 2) / 2)
    return difference, (difference / pooled if pooled > 0 else None)


def add_effects(table: dict[str, Any], baseline: str) -> None:
    """Give every row `vs_baseline`: its test difference to the baseline arm, raw and in seed stds."""
    key = f"test_{table['metric']}"
    base = next((row for row in table["rows"] if row["arm"] == baseline), None)
    if base is None:
        raise ValueError(f"baseline arm {baseline!r} is not among the arms {[row['arm'] for row in table['rows']]}")
    table["baseline"] = baseline
    best = f"best_{table['metric']}"
    for row in table["rows"]:
        difference, sds = effect(row[key], base[key])
        row["vs_baseline"] = {"difference": difference, "sd": sds}
        if best in row and best in base:
            difference, sds = effect(row[best], base[best])
            row["best_vs_baseline"] = {"difference": difference, "sd": sds}


def _fmt(pair: tuple[float, float], scale: float = 1.0) -> str:
    mean, std = pair
    return f"{mean * scale:.3f} ± {std * scale:.3f}"


def _effect_cells(vs: dict[str, Any]) -> list[str]:
    return [f"{vs['difference']:+.3f}", "—" if vs["sd"] is None else f"{vs['sd']:+.1f}"]


def _seeds(values: list[float | None]) -> str:
    return " ".join("—" if v is None else f"{v:.3f}" for v in values)


def format_table(table: dict[str, Any]) -> str:
    """The table in Markdown: mean ± std over seeds; with early stopping, the test at the best validation epoch too."""
    metric = table["metric"]
    best = f"best_{metric}"
    rows = table["rows"]
    extras = (
        [k for k in rows[0] if k.endswith(f"_{metric}") and k.split("_")[0] not in ("test", "val", "train", "best")]
        if rows
        else []
    )
    with_best = any(best in row for row in rows)
    header = ["arm", "seeds", f"test {metric}" + (" (last epoch)" if with_best else "")]
    header += [f"test {metric} (best val epoch)"] if with_best else []
    header += [f"val {metric}", f"train {metric}", "train − test"] + [e.replace("_", " ") for e in extras]
    if "baseline" in table:
        header += [f"Δ vs {table['baseline']}", "Δ / std"]
        header += ["Δ (best)", "Δ / std (best)"] if with_best else []
        header += ["per-seed test"] + (["per-seed test (best)"] if with_best else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["arm"], str(row["seeds"]), _fmt(row[f"test_{metric}"])]
        cells += [_fmt(row[best]) if best in row else "—"] if with_best else []
        cells += [_fmt(row[f"val_{metric}"]), _fmt(row[f"train_{metric}"]), _fmt(row["gap"])]
        cells += [_fmt(row[e]) for e in extras]
        if "baseline" in table:
            cells += _effect_cells(row["vs_baseline"])
            if with_best:
                cells += _effect_cells(row["best_vs_baseline"]) if "best_vs_baseline" in row else ["—", "—"]
            cells.append(_seeds(row["per_seed_test"]))
            if with_best:
                cells.append(_seeds(row.get("per_seed_best", [])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(experiment: Experiment, table: dict[str, Any], out: Path) -> None:
    text = f"# {experiment.name}\n\n{experiment.description}\n\n{format_table(table)}\n"
    if table["notes"]:
        text += "\n" + "\n".join(f"- {note}" for note in table["notes"]) + "\n"
    text += f"\nSeeds: {', '.join(map(str, table['seeds']))}. Wall time: {table['seconds']:.0f} s.\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
