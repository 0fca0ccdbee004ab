"""`untrainable tune`: its flags, and the study or the comparison it runs."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from untrainable.cli_args import add_cluster_flags, cluster_settings, out_folder, set_overrides


def cmd_tune(args: argparse.Namespace) -> int:
    """Tune a config with Optuna, or compare a baseline with its guided twin tuned with the same budget."""
    from untrainable import compare, tune
    from untrainable.config import ConfigError, load_config
    from untrainable.space import load_points, load_space
    from untrainable.tune_checks import check_tune_flags

    check_tune_flags(args)
    if args.worker:
        study = Path(args.worker)
        ran = tune.work(study, args.storage, args.study_name, worker=args.worker_index or 0)
        print(f"{ran} trial(s) run by this worker; the study in {study} is done")
        return 0
    cluster = cluster_settings(args)
    missing = [
        flag
        for flag, value in (("--space", args.space), ("--trials", args.trials), ("--out", args.out))
        if value is None
    ]
    if not (args.config or args.compare):
        missing.insert(0, "--config (or --compare)")
    if args.compare and not args.guided_space:
        missing.append("--guided-space")
    if missing:
        raise ConfigError(f"untrainable tune needs {', '.join(missing)}; see untrainable tune --help")
    if args.guided_space and not args.compare:
        raise ConfigError("--guided-space: only with --compare GUIDED.toml")
    if args.workers < 1:
        raise ConfigError(f"--workers: expected a number >= 1, got {args.workers}")
    settings = tune.Settings(
        trials=args.trials,
        objective=args.objective,
        tune_seeds=tuple(args.tune_seeds),
        pruner=args.pruner,
        sampler_seed=args.sampler_seed,
        prune_after=args.prune_after,
        sampler=args.sampler,
    ).validate()
    overrides = set_overrides(args.set)
    space = load_space(args.space)
    points = load_points(args.enqueue) if args.enqueue else ()
    out = out_folder(args.out) or Path(args.out)
    try:
        if not args.compare:
            config = load_config(args.config, overrides)
            summary = compare.tune(
                config, space, settings, out, args.workers, args.storage, args.study_name,
                cluster=cluster, detach=args.detach, points=points,
            )  # fmt: skip
        else:
            guided = load_config(args.compare, overrides)
            base = load_config(args.config, overrides) if args.config else compare.unguided(guided)
            experiment, folder, table = compare.compare(
                guided, base, space, load_space(args.guided_space), settings, out, args.seeds or 5, args.workers,
                args.storage, args.study_name, cluster=cluster, detach=args.detach, points=points,
                repeats=args.repeats,
            )  # fmt: skip
    except KeyboardInterrupt as err:
        raise continue_with(err, args) from None
    if not args.compare:
        n = summary["trials"]
        print(
            f"\n{n['complete']} complete, {n['pruned']} pruned, {n['failed']} failed trials; best trial "
            f"{summary['best_trial']}: validation {summary['best_value']:.4f}. Best config: {out / 'best.toml'}"
        )
        print(compare.enqueued_note(summary["arm"], summary))
        return 0
    print_comparison(experiment.name, table, folder)
    return 0


def print_comparison(name: str, table: dict[str, Any], folder: Path) -> None:
    """The comparison's table, its notes (enqueued trials, paired seeds, cost, verdict) and where it all is."""
    from untrainable.experiment import format_table

    print(f"\n## {name}\n\n{format_table(table)}")
    for note in table.get("notes", []):
        print(f"- {note}")
    cost = table["cost"]
    print(
        f"\nTuning {table['tuning_seconds']:.0f} s (trial seconds: alone {cost['alone']['trial_seconds']:.0f}, guided "
        f"{cost['guided']['trial_seconds']:.0f}), {len(table['seeds'])} seeds {table['seconds']:.0f} s. "
        f"Budget curves in {folder}/budget.json and budget.png. "
        f"Table in {folder}/table.md; studies, best.toml and figures in {folder}/alone and {folder}/guided"
    )


def continue_with(err: KeyboardInterrupt, args: argparse.Namespace) -> KeyboardInterrupt:
    """A stopped tune's message: its trial checkpointed, and the same command (not `train --resume`) continues."""
    stopped = KeyboardInterrupt(
        f"{str(err).split('; continue with --resume')[0]}; continue the study with the same command: "
        f"untrainable {shlex.join(getattr(args, 'argv', sys.argv[1:]))}"
    )
    stopped.signum = getattr(err, "signum", signal.SIGINT)  # type: ignore[attr-defined]  # the exit status
    return stopped


def add_parser(sub: Any) -> None:
    """The `tune` subcommand's arguments."""
    p = sub.add_parser(
        "tune",
        help="tune a config with Optuna on validation; --compare: a baseline and its guided twin, the same budget",
        description="Tune the config fields named in a space file (dotted --set paths) with Optuna, on the validation "
        "split. With --compare GUIDED.toml, tune the baseline (--config, default: GUIDED without its guide) over "
        "--space and the guided config over --space plus --guided-space, the same budget each, then train each "
        "best config on seeds the tuning did not use and print the table with a verdict.",
    )
    p.add_argument("--config", help="the config to tune (with --compare: the baseline; default GUIDED without guide)")
    p.add_argument("--compare", metavar="GUIDED", help="the guided config: compare it with its baseline, tuned alike")
    p.add_argument("--space", help='space file: the fields tuned, as [space] "optim.lr" = { low, high, log } ...')
    p.add_argument("--guided-space", help="with --compare: the guided arm's extra fields (guidance.alpha, ...)")
    p.add_argument("--trials", type=int, help="finished trials per study (complete or pruned)")
    p.add_argument("--out", help="study folder; the same command continues the study in it")
    p.add_argument(
        "--objective",
        default="best",
        choices=("best", "last"),
        help="validation metric at the best validation epoch (early stopping) or at the last epoch (default: best)",
    )
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1], help="seeds each trial trains (default: 0 1)")
    p.add_argument(
        "--seeds",
        type=int,
        help="with --compare: seeds of the final runs, none of the tuning seeds (default: 5)",
    )
    p.add_argument(
        "--pruner",
        default="median",
        choices=("median", "halving", "none"),
        help="stops hopeless trials on the validation curve (default: median)",
    )
    p.add_argument("--prune-after", type=int, help="epochs of each seed never pruned (default: a quarter)")
    p.add_argument(
        "--sampler",
        default="tpe",
        choices=("tpe", "random", "qmc", "gp"),
        help="Optuna's sampler: TPE (a third of the budget, at least 5, at random first), random, "
        "quasi-random (Sobol) or Gaussian process (default: tpe)",
    )
    p.add_argument(
        "--sampler-seed",
        type=int,
        default=0,
        help="sampler seed: each arm and each process draws from its own stream derived from it (default: 0)",
    )
    p.add_argument(
        "--enqueue",
        metavar="FILE",
        help="points to try first (after the config's own values): [[enqueue]] tables of dotted paths and values",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="with --compare: tune both arms this many times under sampler seeds seed, seed + 1, ... (default: 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="trials run at once: local processes, or SLURM jobs with --executor slurm (default: 1)",
    )
    p.add_argument(
        "--storage",
        help="an RDB URL for the study, recorded in study.json (default: a journal file in the study folder)",
    )
    p.add_argument(
        "--study-name",
        help="the study's name in the storage (default: the one study.json records, so a copied folder continues its "
        "own study, else the folder's name; with --compare, NAME-alone and NAME-guided)",
    )
    p.add_argument("--worker", metavar="STUDY_DIR", help="only pull trials of the study in this folder (a job)")
    p.add_argument("--worker-index", type=int, help="with --worker: this worker's number, recorded beside its seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of both configs (repeatable)")
    add_cluster_flags(p)
    p.set_defaults(func=cmd_tune)

