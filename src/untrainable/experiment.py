"""Experiments: named arms, each trained over several seeds, summarised in one table."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from untrainable.config import RunConfig, config_differences
from untrainable.data import DataSplits, load_data
from untrainable.registry import Registry
from untrainable.trainer import RunResult, train


@dataclass
class Arm:
    """One row of an experiment's table: a run configuration trained once per seed.

    `guide_from` names an earlier arm whose final weights (same seed) become
    this arm's guide: how a trained guide is made and then used.
    """

    name: str
    config: RunConfig
    guide_from: str | None = None


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


def _arm_config(arm: Arm, seed: int, out: Path) -> RunConfig:
    config = arm.config
    train = dataclasses.replace(config.train, seed=seed)
    changes: dict[str, Any] = {"train": train, "name": arm.name}
    if arm.guide_from is not None:
        if config.guide is None:
            raise ValueError(f"arm {arm.name!r} takes its guide from {arm.guide_from!r} but has no guide model")
        changes["guide"] = dataclasses.replace(config.guide, checkpoint=str(out / arm.guide_from / f"seed{seed}" / "model.pt"))
    return config.replace(**changes)


def run_experiment(
    experiment: Experiment,
    out: str | Path,
    seeds: tuple[int, ...] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every arm for every seed (finished runs are reused, interrupted ones resumed) and write the table.

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
    started = time.time()
    data_sets: dict[str, DataSplits] = {}
    results: dict[str, list[RunResult]] = {}
    for arm in experiment.arms:
        for seed in seeds:
            folder = out / arm.name / f"seed{seed}"
            config = _arm_config(arm, seed, out)
            if (folder / "config.json").exists():
                changed = config_differences(json.loads((folder / "config.json").read_text()), config, ignore=("train.progress",))
                if changed:
                    raise ValueError(
                        f"{folder} holds a run with a different config (differs in {', '.join(changed)}); "
                        "choose another --out or remove the folder"
                    )
            if (folder / "result.json").exists():
                log(f"[{arm.name} seed {seed}] done earlier, reusing {folder}")
                result = RunResult(folder, json.loads((folder / "history.json").read_text()), json.loads((folder / "result.json").read_text()))
            else:
                log(f"[{arm.name} seed {seed}] training")
                resume = (folder / "checkpoints").exists() and any((folder / "checkpoints").iterdir())
                result = train(config, folder, resume=resume, data=_data(config, data_sets))
            results.setdefault(arm.name, []).append(result)
    table = summarise(experiment, results, seeds)
    if experiment.after is not None:
        experiment.after(out, table, results)
    table["seconds"] = time.time() - started
    write_table(experiment, table, out)
    from untrainable.plots import plot_curves

    plot_curves({name: [r.history for r in runs] for name, runs in results.items()}, out / "curves.png", experiment.metric, title=experiment.name)
    return table


def _data(config: RunConfig, data_sets: dict[str, DataSplits]) -> DataSplits:
    """The config's data, built once per experiment: arms that share a data set reuse it."""
    key = json.dumps([config.data.name, config.data.args], sort_keys=True)
    if key not in data_sets:
        data_sets[key] = load_data(config.data.name, **config.data.args)
    return data_sets[key]


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
        for extra in sorted({k for r in runs for k in r.final.get("extra_test", {})}):
            row[f"{extra}_{metric}"] = _mean_std([r.final["extra_test"].get(extra, {}).get(metric) for r in runs])
        rows.append(row)
    return {"experiment": experiment.name, "metric": metric, "seeds": list(seeds), "rows": rows, "notes": list(experiment.notes)}


def _fmt(pair: tuple[float, float], scale: float = 1.0) -> str:
    mean, std = pair
    return f"{mean * scale:.3f} ± {std * scale:.3f}"


def format_table(table: dict[str, Any]) -> str:
    """The table in Markdown: mean ± std over seeds."""
    metric = table["metric"]
    extras = [k for k in table["rows"][0] if k.endswith(f"_{metric}") and k.split("_")[0] not in ("test", "val", "train")] if table["rows"] else []
    header = ["arm", "seeds", f"test {metric}", f"val {metric}", f"train {metric}", "train − test"] + [e.replace("_", " ") for e in extras]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["arm"], str(row["seeds"]), _fmt(row[f"test_{metric}"]), _fmt(row[f"val_{metric}"]), _fmt(row[f"train_{metric}"]), _fmt(row["gap"])]
        cells += [_fmt(row[e]) for e in extras]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(experiment: Experiment, table: dict[str, Any], out: Path) -> None:
    text = f"# {experiment.name}\n\n{experiment.description}\n\n{format_table(table)}\n"
    if table["notes"]:
        text += "\n" + "\n".join(f"- {note}" for note in table["notes"]) + "\n"
    text += f"\nSeeds: {', '.join(map(str, table['seeds']))}. Wall time: {table['seconds']:.0f} s.\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
