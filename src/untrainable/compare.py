"""Running studies to their end, and the fair comparison of a baseline with its guided twin.

`tune` runs one study (`untrainable.tune`) with K workers on the study's
executor (`untrainable.executor`: this process, local processes or SLURM
jobs), and writes its outputs: `best.toml` (the best trial's config), `trials.json` and
the figures. `compare` tunes a baseline and its guided twin with the same
budget, trains each best config on seeds the tuning did not use and writes
the studies' table with a verdict.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from untrainable.config import ConfigError, DistillSpec, GuidanceSpec, RunConfig
from untrainable.config_toml import to_toml
from untrainable.dispatch import executor_for, run_all
from untrainable.executor import Detached, StudyFailed, Work
from untrainable.space import Space
from untrainable.tune import (
    JOURNAL,
    STUDY_FILE,
    Settings,
    counts,
    default_study_name,
    format_value,
    metric_of,
    open_study,
    prepare,
    read_json,
    read_study,
    trial_config,
    work,
    write_json,
)
from untrainable.tune_checks import check_guided_space, check_out, check_storage, recorded_name

if TYPE_CHECKING:
    from untrainable.cluster import SlurmSettings

# How a verdict reads a difference: more than this many pooled seed standard deviations counts as an effect.
EFFECT_SDS = 2.0


@dataclass
class TuneWorker:
    """A tuning worker as a work item (`untrainable.executor`): `tune.work` on the study until it is done.

    Called in another process (`log` None), it prints its trials' lines and,
    at its end, how many trials it ran.
    """

    study_dir: str
    storage_url: str | None
    study_name: str
    worker: int  # its index: the stream of its sampler's seed
    log: Callable[[str], None] | None = None
    on_finish: Callable[[dict[str, int]], None] | None = None

    def __call__(self) -> None:
        ran = work(self.study_dir, self.storage_url, self.study_name, self.worker, self.log, self.on_finish)
        if self.log is None:
            print(f"{ran} trial(s) run by this worker; the study in {self.study_dir} is done", flush=True)


def run_workers(
    study_dir: Path,
    storage_url: str | None,
    study_name: str,
    workers: int,
    log: Callable[[str], None] = print,
    cluster: SlurmSettings | None = None,
    detach: bool = False,
) -> None:
    """Run `workers` tuning workers on the study until it is done: this process, local processes or SLURM jobs.

    A bar on a terminal counts finished trials (SLURM: a line at each
    change). Ctrl-C or SIGTERM stops local workers after a checkpoint (SLURM
    jobs keep running); the same command continues. Raises StudyFailed when
    a worker failed, once the others ended, and Detached with `detach` once
    the jobs were submitted.
    """
    study_dir = Path(study_dir)
    if workers < 1:
        raise ConfigError(f"--workers: expected a number >= 1, got {workers}")
    if cluster is not None and (cluster.nodes != 1 or cluster.tasks != 1):
        raise ConfigError(
            f"slurm.nodes = {cluster.nodes}, {cluster.tasks} task(s) per node: a tuning worker is a job of one task "
            "(each trial trains in one process); give nodes = 1 and one task (at most one GPU), and --workers K"
        )
    _, _, settings, _ = read_study(study_dir)
    study = open_study(study_dir, storage_url, study_name)
    inline = cluster is None and workers == 1
    bar = _bar(settings.trials, study_name) if cluster is None else None

    def line(text: str) -> None:
        if bar is None or bar.disable:
            log(f"[{study_name}] {text}")
        else:
            bar.write(f"[{study_name}] {text}")

    def finished() -> int:
        n = counts(study)
        return n["complete"] + n["pruned"]

    def status() -> str:
        n = counts(study)
        if bar is not None:
            _advance(bar, n)
        return f"{n['complete'] + n['pruned']} of {settings.trials} trials finished ({n['pruned']} pruned, {n['failed']} failed)"

    works = [
        Work(
            f"worker-{k}",
            f"tuning worker {k}",
            TuneWorker(
                str(study_dir), storage_url, study_name, k, line if inline else None,
                (lambda n: _advance(bar, n)) if inline and bar is not None else None,
            ),  # fmt: skip
        )
        for k in range(workers)
    ]
    try:
        with executor_for(study_dir, workers, cluster, log) as executor:
            outcome = run_all(
                executor, works, lambda key: finished() >= settings.trials, log, "tuning worker(s)", detach, status,
                reused=None,
            )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if detach and outcome.live:
        raise Detached(
            f"{len(outcome.live)} tuning worker(s) submitted or running ({' '.join(outcome.live.values())}); "
            f"run the same command again to collect the study (job ids in {study_dir / 'slurm' / 'jobs.json'})"
        )
    if outcome.failed:
        labels = {work.key: work.label for work in works}
        rows = [(labels[e.key], e.handle, e.state, e.log) for e in outcome.failed]
        raise StudyFailed(study_dir, rows, "tuning worker(s)")


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
    best = trial_config(config, space, space.values(trial.params)).with_section("train", seed=settings.tune_seeds[0], progress=True)
    return best, trial


def finish_study(study: Any, study_dir: Path, arm: str) -> dict[str, Any]:
    """Write best.toml, trials.json and the figures (optimisation history, parameter importances); return a summary."""
    from untrainable.plots import plot_study

    config, space, settings, spec = read_study(study_dir)
    best, trial = best_config(study, study_dir)
    folder = trial.user_attrs.get("folder", f"trial-{trial.number:04d}")
    per_seed = read_json(study_dir / "trials" / folder / "trial.json").get("per_seed", {})
    seed = settings.tune_seeds[0]
    finished = counts(study)["complete"] + counts(study)["pruned"]
    comments = [
        f"{arm}: the best of {finished} finished trials of {study_dir} (trial {trial.number}, {folder}), tuned on validation.",
        f"Objective: validation {spec['metric']} at the {'best validation' if settings.objective == 'best' else 'last'} "
        f"epoch, mean over seeds {', '.join(map(str, settings.tune_seeds))}: {trial.value:.4f} "
        f"(per seed: {', '.join(f'{s}: {v:.4f}' for s, v in per_seed.items())}).",
        f"train.seed = {seed} reproduces that trial's seed-{seed} run; change it for other seeds.",
        "Tuned: " + ", ".join(f"{k} = {format_value(v)}" for k, v in space.values(trial.params).items()) + ".",
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
                "values": space.values(t.params),
                "enqueued": t.user_attrs.get("enqueued"),
                "folder": t.user_attrs.get("folder"),
                "last_step": t.last_step,
                "retry_of": t.system_attrs.get("retry_history"),
            }
        )
    write_json(study_dir / "trials.json", rows)
    with warnings.catch_warnings(record=True) as caught:  # Optuna's, multi-line: one line each in `notes`
        warnings.simplefilter("always")
        figures = plot_study(study, study_dir, title=f"{arm}: validation {spec['metric']}")
    notes = list(dict.fromkeys(f"figures: {' '.join(str(w.message).split())}" for w in caught))
    n = counts(study)
    enqueued = [
        {"number": r["number"], "source": r["enqueued"], "value": r["value"], "values": r["values"]}
        for r in rows
        if r["enqueued"] and r["state"] != "fail"
    ]
    return {
        "arm": arm,
        "trials": n,
        "best_trial": trial.number,
        "best_value": trial.value,
        "best_params": space.values(trial.params),
        "enqueued": enqueued,
        "best_is_enqueued": bool(trial.user_attrs.get("enqueued")),
        "figures": [str(p.name) for p in figures],
        "notes": notes,
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
    cluster: SlurmSettings | None = None,
    detach: bool = False,
    points: tuple[tuple[str, dict[str, Any]], ...] = (),
) -> dict[str, Any]:
    """Tune `config` over `space`: the study in `out` until it has `settings.trials` finished trials, then its summary.

    The `workers` are local processes, or with `cluster` SLURM jobs (`run_workers`; `detach` submits them and
    raises Detached). The config's own values and `points` are the first trials.
    """
    out = Path(out)
    spec = prepare(out, config, space, settings, study_name, storage_url, arm, points)
    name = spec["study_name"]
    log(
        f"[{name}] tuning {config.name}: {settings.trials} trials over {', '.join(space.paths)}; objective validation "
        f"{metric_of(config)[0]} at the {settings.objective} epoch, mean over seeds "
        f"{', '.join(map(str, settings.tune_seeds))}; sampler {settings.sampler}; pruner {settings.pruner}; "
        f"{len(spec['enqueued'])} enqueued trial(s) first ({', '.join(e['source'] for e in spec['enqueued'])}); "
        f"{workers} worker(s)"
        f"{' as SLURM jobs' if cluster is not None else ''}; study in "
        f"{storage_url or out / JOURNAL}"
    )
    try:
        run_workers(out, storage_url, name, workers, log, cluster, detach)
    except StudyFailed as failed:
        n = counts(open_study(out, storage_url, name))
        wrote = ""
        if n["complete"]:
            finish_study(open_study(out, storage_url, name), out, arm or config.name)
            wrote = f"; best.toml and trials.json hold the {n['complete'] + n['pruned']} finished trials"
        left = settings.trials - n["complete"] - n["pruned"]
        more = (
            f"the study is unfinished: {left} trial(s) still to run: run the same command again to continue"
            if left > 0
            else "the study is done"
        )
        raise StudyFailed(out, failed.rows, "tuning worker(s)", f"{wrote}; {more}") from None
    summary = finish_study(open_study(out, storage_url, name), out, arm or config.name)
    for note in summary["notes"]:
        log(f"[{name}] {note}")
    return summary


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
    cluster: SlurmSettings | None = None,
    detach: bool = False,
    points: tuple[tuple[str, dict[str, Any]], ...] = (),
    repeats: int = 1,
) -> tuple[Any, Path, dict[str, Any]]:
    """The fair comparison: `base` over `space` and `guided` over `space` + `guided_space`, the same budget each.

    Same trials, sampler, pruner, objective and tuning seeds; each arm's
    config values and `points` (those in its space) are its first trials.
    With `repeats` R, the tuning runs R times under sampler seeds
    `sampler_seed + r` (repeat r > 0 in `out/repeat-r/`). Then repeat 0's best
    config of each arm trained on `seeds` seeds the tuning did not use, in one
    table (test at the last and at the best validation epoch, Δ in pooled seed
    stds, per-seed values, paired differences) with a verdict; budget curves
    and costs beside it (`untrainable.budget`). Returns (experiment, folder, table).
    With `cluster`, the tuning workers and the final runs are SLURM jobs.
    """
    from untrainable.experiment import run_experiment

    out = Path(out)
    if not guided.guide_entries():
        raise ConfigError(f"--compare: the config {guided.name!r} has no [guide] or [[guides]]; give the guided config")
    if base.guide_entries():
        raise ConfigError(
            f"--config: the baseline {base.name!r} has a guide; give the unguided config (or leave --config out)"
        )
    if seeds < 1:
        raise ConfigError(f"--seeds: expected a number >= 1, got {seeds}")
    check_out(out, (f"alone/{STUDY_FILE}", f"guided/{STUDY_FILE}"))
    check_storage(storage_url)
    check_guided_space(space, guided_space)
    if repeats < 1:
        raise ConfigError(f"--repeats: expected a number >= 1, got {repeats}")
    full = space.with_extra(guided_space)
    space.check(base)  # every refusal before any trial runs
    full.check(guided)
    arms = {"alone": (base, space), "guided": (guided, full)}
    recorded = recorded_name(out / "alone" / STUDY_FILE)  # a copied comparison continues its own studies
    name = study_name or (recorded.removesuffix("-alone") if recorded else default_study_name(out))
    runs = [(out if r == 0 else out / f"repeat-{r}", f"{name}-{arm}" if r == 0 else f"{name}-r{r}-{arm}", r, arm)
            for r in range(repeats) for arm in arms]  # fmt: skip
    for folder, study, r, arm in runs:
        config, arm_space = arms[arm]
        prepare(folder / arm, config, arm_space, _repeat(settings, r), study, storage_url, arm, points)
    started = time.time()
    summaries: dict[str, Any] = {}
    for folder, study, r, arm in runs:
        config, arm_space = arms[arm]
        summary = tune(
            config, arm_space, _repeat(settings, r), folder / arm, workers, storage_url, study, arm, log, cluster,
            detach, points,
        )  # fmt: skip
        summaries.setdefault(arm, summary).setdefault("repeats", []).append(summary["best_value"])
    tuned = time.time() - started
    final_seeds = tuple(s for s in range(max(settings.tune_seeds) + seeds + 1) if s not in settings.tune_seeds)[:seeds]
    experiment = _final_experiment(out, arms, space, full, settings, final_seeds, summaries)
    table = run_experiment(experiment, out / "final", jobs=workers, log=log, cluster=cluster, detach=detach)
    table["tuning_seconds"] = tuned
    table["tuning"] = summaries
    table["tune_seeds"] = list(settings.tune_seeds)
    finish_comparison(experiment, table, out, [folder for folder, _, _, arm in runs if arm == "alone"])
    return experiment, out, table


def finish_comparison(experiment: Any, table: dict[str, Any], out: Path, repeat_dirs: list[Path]) -> None:
    """Add the paired seeds, the costs, the budget curves (budget.json, budget.png) and the verdict; write the table."""
    from untrainable.budget import add_analysis
    from untrainable.experiment import write_table

    add_analysis(table, out, repeat_dirs)
    table["notes"].append(verdict(table))
    write_table(experiment, table, out / "final")
    for name_ in ("table.md", "table.json"):
        (out / name_).write_text((out / "final" / name_).read_text())


def _repeat(settings: Settings, r: int) -> Settings:
    return dataclasses.replace(settings, sampler_seed=settings.sampler_seed + r)


def _final_experiment(
    out: Path,
    arms: dict[str, tuple[RunConfig, Space]],
    space: Space,
    full: Space,
    settings: Settings,
    final_seeds: tuple[int, ...],
    summaries: dict[str, dict[str, Any]],
) -> Any:
    """Each arm's best config (its best.toml) on the final seeds, compared with `alone`, with the tuning in its notes."""
    from untrainable.experiment import Arm, Experiment

    base, guided = arms["alone"][0], arms["guided"][0]
    bests = {arm: read_best(out / arm) for arm in arms}
    metric = metric_of(guided)[0]
    experiment = Experiment(
        name=out.name,
        description=(
            f"The fair comparison: `alone` ({base.name}) tuned over {', '.join(space.paths)}; `guided` ({guided.name}) "
            f"over the same and {', '.join(p for p in full.paths if p not in space.paths)}; {settings.trials} trials each, "
            f"the same {settings.sampler} sampler (seed {settings.sampler_seed}, a seed stream per arm and process), the "
            f"config's own values and the enqueued points in its space first, {settings.pruner} pruner and objective (validation "
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
            + ", ".join(f"{k} = {format_value(v)}" for k, v in s["best_params"].items())
            + f". Figures: {arm}/optimisation_history.png, {arm}/param_importances.png."
        )
        experiment.notes.append(enqueued_note(arm, s))
        if len(s.get("repeats", [])) > 1:
            r = s["repeats"]
            experiment.notes.append(
                f"`{arm}` over {len(r)} repeats (sampler seeds {settings.sampler_seed}..{settings.sampler_seed + len(r) - 1}): "
                f"best validation {statistics.fmean(r):.4f} ± {statistics.stdev(r):.4f} "
                f"(min {min(r):.4f}, max {max(r):.4f}); the final seeds train repeat 0's best."
            )
    return experiment


def enqueued_note(arm: str, summary: dict[str, Any]) -> str:
    """Which trials were enqueued, their values, and whether the search beat the best of them."""
    done = [e for e in summary.get("enqueued", []) if e["value"] is not None]
    if not summary.get("enqueued"):
        return f"`{arm}`: no trial enqueued (the config's values lie outside the space)."
    listed = "; ".join(
        f"trial {e['number']} ({e['source']}): " + ("pruned" if e["value"] is None else f"{e['value']:.4f}")
        for e in summary["enqueued"]
    )
    if summary.get("best_is_enqueued"):
        outcome = "the best trial is an enqueued one: the search did not beat them"
    elif done:
        closest = min(done, key=lambda e: abs(e["value"] - summary["best_value"]))["value"]
        outcome = f"the search beat them ({summary['best_value']:.4f} against the best enqueued {closest:.4f})"
    else:
        outcome = "the search's best beats them (every enqueued trial was pruned)"
    return f"`{arm}` enqueued first: {listed}; {outcome}."


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
    measured = [s for s in leads if s is not None]
    if not leads or len(measured) < len(leads):
        word = "no verdict (a difference in seed stds needs two seeds or more, with some spread)"
    elif all(s > EFFECT_SDS for s in measured):
        word = "the guided arm leads"
    elif all(s < -EFFECT_SDS for s in measured):
        word = "the tuned baseline leads"
    else:
        word = f"no clear lead (within {EFFECT_SDS:g} seed stds at one epoch or both)"
    budget = f" {table['budget_verdict']}" if table.get("budget_verdict") else ""
    return f"Verdict: guided − alone = {'; '.join(parts)}: {word}.{budget}"
