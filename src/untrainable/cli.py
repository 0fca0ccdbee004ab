"""The `untrainable` command line: list, run, train, layers, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

EPILOG = (
    "Examples:\n"
    "  untrainable list\n"
    "  untrainable run mnist1d --quick\n"
    "  untrainable train --config src/untrainable/configs/mnist1d.toml --out runs/one\n"
    "  untrainable layers fcn cnn1d --data mnist1d\n"
    "  untrainable tune --compare GUIDED.toml --space SPACE.toml --guided-space GSPACE.toml --trials 16 --out runs/tune"
)


def _parse_value(text: str) -> Any:
    """A command-line value as JSON when it parses (numbers, booleans, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _json_args(text: str, flag: str) -> dict[str, Any]:
    """The keyword arguments given to `flag` as a JSON object, refused with a ConfigError naming the flag."""
    from untrainable.config import ConfigError

    example = f"""e.g. {flag} '{{"depth": 2, "width": 64}}'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{flag}: not valid JSON ({err.msg} at column {err.colno}); give a JSON object, {example}"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object of keyword arguments, got {text!r}; {example}")
    return value


def _out_folder(text: str | None, default: Path | None = None, flag: str = "--out") -> Path | None:
    """The folder `flag` names, refused in one line when empty or an existing file; `default` when not given."""
    from untrainable.config import ConfigError

    if text is None:
        return default
    if not text.strip():
        raise ConfigError(f"{flag} is empty; give a folder, e.g. {flag} runs/one (or drop {flag} for the default)")
    path = Path(text).expanduser()
    file = next((p for p in (path, *path.parents) if p.exists()), None)
    if file is not None and not file.is_dir():
        raise ConfigError(f"{flag} {text}: {file} is a file, not a folder; give {flag} a folder")
    return path


def cmd_list(args: argparse.Namespace) -> int:
    """Print the experiments, models, data sets and similarity measures."""
    import untrainable.recipes  # noqa: F401  (registration)
    from untrainable.data.registry import DATASETS
    from untrainable.experiment import EXPERIMENTS
    from untrainable.models.registry import MODELS
    from untrainable.similarity import similarity_table

    for title, registry in (("experiments", EXPERIMENTS), ("models", MODELS), ("datasets", DATASETS)):
        print(f"{title}:")
        for name in registry.names():
            print(f"  {name:<22} {registry.describe(name)}")
    print("similarities:")
    _print_rows(similarity_table(), indent="  ")
    return 0


def _print_rows(rows: list[tuple[str, ...]], indent: str = "") -> None:
    """Rows of cells as aligned columns."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(indent + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_run(args: argparse.Namespace) -> int:
    """Run a registered experiment and print its table."""
    import untrainable.recipes  # noqa: F401
    from untrainable.experiment import EXPERIMENTS, format_table, run_study

    cluster = _cluster_settings(args)
    built = EXPERIMENTS.create(args.experiment, quick=args.quick)
    # Quick runs get their own folder: finished runs in a folder are reused.
    root = _out_folder(args.out, Path("runs") / (args.experiment + ("-quick" if args.quick else ""))) or Path("runs")
    seeds = tuple(args.seeds) if args.seeds else None
    if cluster is None:
        steps = run_study(built, root, seeds=seeds, jobs=args.jobs)
    else:
        from untrainable.slurm import Detached, StudyFailed, format_failures

        try:
            steps = run_study(built, root, seeds=seeds, cluster=cluster, detach=args.detach)
        except Detached as detached:
            print(f"untrainable run: detached: {detached}")
            return 0
        except StudyFailed as failed:
            print(f"\n{format_failures(failed)}\n")
            print(f"untrainable run: error: {failed}", file=sys.stderr)
            return 2
    for experiment, out, table in steps:
        print(f"\n## {experiment.name}\n\n{format_table(table)}")
        for note in table.get("notes", []):
            print(f"- {note}")
        print(f"\n{len(table['seeds'])} seeds, {table['seconds']:.0f} s. Table, curves and runs in {out}/")
    return 0


def _cluster_settings(args: argparse.Namespace) -> Any:
    """The SLURM settings of `run` or `tune` `--executor slurm` (file, then flags over it), None for local runs."""
    from untrainable.cluster import FLAGS, load_cluster, require_slurm
    from untrainable.config import ConfigError

    flags = {name: getattr(args, name) for name in FLAGS}
    if args.executor == "local":
        given = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value is not None]
        given += ["--cluster"] * (args.cluster is not None) + ["--detach"] * args.detach
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --executor slurm (the local executor runs here)")
        return None
    if getattr(args, "jobs", 1) != 1:
        raise ConfigError("--jobs: only with --executor local; on SLURM, slurm.array_parallelism limits runs at once")
    settings = load_cluster(args.cluster, flags)
    require_slurm()
    return settings


def _overrides(items: list[str] | None) -> dict[str, Any]:
    """The `--set KEY=VALUE` overrides as {dotted key: value}."""
    from untrainable.config import ConfigError

    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, e.g. --set train.epochs=5; got {item!r}")
        overrides[key] = _parse_value(value)
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run from a config file."""
    from untrainable.config import ConfigError, load_config
    from untrainable.trainer import train

    if args.accept_config and not args.resume:
        raise ConfigError("--accept-config lets a resumed run change its config: it needs --resume")
    out = _out_folder(args.out)
    config = load_config(args.config, _overrides(args.set), overrides_label="--set")
    result = train(config, out or Path("runs") / config.name, resume=args.resume, accept_config=args.accept_config)
    print(json.dumps(result.final, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Tune a config with Optuna, or compare a baseline with its guided twin tuned with the same budget."""
    from untrainable import compare, tune
    from untrainable.config import ConfigError, load_config
    from untrainable.experiment import format_table
    from untrainable.slurm import Detached, StudyFailed, format_failures
    from untrainable.space import load_space

    if args.worker:
        study = Path(args.worker)
        ran = tune.work(study, args.storage, args.study_name, worker=args.worker_index)
        print(f"{ran} trial(s) run by this worker; the study in {study} is done")
        return 0
    cluster = _cluster_settings(args)
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
    ).validate()
    overrides = _overrides(args.set)
    space = load_space(args.space)
    out = Path(args.out)
    try:
        if not args.compare:
            config = load_config(args.config, overrides)
            summary = compare.tune(
                config, space, settings, out, args.workers, args.storage, args.study_name,
                cluster=cluster, detach=args.detach,
            )  # fmt: skip
        else:
            guided = load_config(args.compare, overrides)
            base = load_config(args.config, overrides) if args.config else compare.unguided(guided)
            experiment, folder, table = compare.compare(
                guided, base, space, load_space(args.guided_space), settings, out, args.seeds, args.workers,
                args.storage, args.study_name, cluster=cluster, detach=args.detach,
            )  # fmt: skip
    except Detached as detached:
        print(f"untrainable tune: detached: {detached}")
        return 0
    except StudyFailed as failed:
        print(f"\n{format_failures(failed)}\n")
        print(f"untrainable tune: error: {failed}", file=sys.stderr)
        return 2
    if not args.compare:
        n = summary["trials"]
        print(
            f"\n{n['complete']} complete, {n['pruned']} pruned, {n['failed']} failed trials; best trial "
            f"{summary['best_trial']}: validation {summary['best_value']:.4f}. Best config: {out / 'best.toml'}"
        )
        return 0
    print(f"\n## {experiment.name}\n\n{format_table(table)}")
    for note in table.get("notes", []):
        print(f"- {note}")
    print(
        f"\nTuning {table['tuning_seconds']:.0f} s, {len(table['seeds'])} seeds {table['seconds']:.0f} s. "
        f"Table in {folder}/table.md; studies, best.toml and figures in {folder}/alone and {folder}/guided"
    )
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    """Print the guide-target pairs with their shapes and similarity at initialisation."""
    from untrainable.build import build_data, build_model
    from untrainable.config import ConfigError, DataSpec, ModelSpec
    from untrainable.guidance import MIN_EXAMPLES, describe_pairs
    from untrainable.similarity import SIMILARITY_INFO, list_similarities, similarity_table

    if args.similarity not in SIMILARITY_INFO:
        raise ConfigError(
            f"--similarity {args.similarity}: not a registered measure; expected one of {', '.join(list_similarities())}"
        )

    least = MIN_EXAMPLES.get(args.similarity, 2)
    if args.batch < least:
        raise ConfigError(
            f"--batch {args.batch}: {args.similarity} needs at least {least} examples to compare layers; "
            "give --batch 256 (the default) or another number >= " + str(least)
        )

    data_args, target_args, guide_args = (
        _json_args(text, flag)
        for text, flag in (
            (args.data_args, "--data-args"),
            (args.target_args, "--target-args"),
            (args.guide_args, "--guide-args"),
        )
    )
    data = build_data(DataSpec(args.data, data_args), where="--data")  # a flag: its fields read --data-args KEY
    target = build_model(ModelSpec(args.target, target_args), data, args.seed, where="--target")
    guide_spec = ModelSpec(args.guide, guide_args, checkpoint=args.guide_checkpoint)
    guide = build_model(guide_spec, data, args.seed + 1, where="--guide")
    rows = describe_pairs(
        target,
        guide,
        data.train,
        batch_size=args.batch,
        target_layers=args.target_layers,
        guide_layers=args.guide_layers,
        similarity=args.similarity,
    )
    _print_rows(rows)
    info = SIMILARITY_INFO.get(args.similarity)
    if info is not None:
        print(
            f"\n{args.similarity}: " + "; ".join(f"{h} {c}" for h, c in zip(similarity_table()[0][1:], info.row()[1:]))
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time and measure the memory of unguided, guided, cached and the authors' guided steps."""
    from untrainable.bench import format_results, run_bench, write_results

    out = _out_folder(args.out)  # refused before the benchmark runs, not after
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"--out {args.out}: cannot make the folder ({err.strerror}); give another --out") from None
        if not os.access(out, os.W_OK):
            raise PermissionError(f"--out {args.out}: the folder is not writable; give another --out")
    if args.measures:
        return _bench_measures(args, out)
    results = run_bench(quick=args.quick, device=args.device, threads=args.threads)
    print(f"\nMachine: {results['machine']}\n\n{format_results(results)}")
    if out is not None:
        print(f"\nWritten to {write_results(results, out)}/")
    return 0


def _bench_measures(args: argparse.Namespace, out: Path | None) -> int:
    """`bench --measures`: the guided step per similarity measure at the rescue's shapes."""
    import json

    import torch

    from untrainable.bench import bench_device, check_threads
    from untrainable.bench.measures import format_measures, run_measures
    from untrainable.checkpoint import write_atomic

    check_threads(args.threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run_measures(args.quick, bench_device(args.device))
    table = format_measures(results)
    print(f"\nMachine: {results['machine']}\n\n{table}")
    if out is not None:
        write_atomic(out / "measures.json", (json.dumps(results, indent=1) + "\n").encode())
        write_atomic(out / "measures.md", f"Machine: {results['machine']}\n\n{table}\n".encode())
        print(f"\nWritten to {out}/measures.md")
    return 0


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """The flags that send a study's runs (`run`) or tuning workers (`tune`) to SLURM, each over the --cluster file."""
    p.add_argument(
        "--executor", choices=("local", "slurm"), default="local", help="where runs train: here, or as SLURM jobs"
    )
    p.add_argument("--cluster", metavar="FILE", help="SLURM settings: a TOML file with a [slurm] table")
    p.add_argument("--detach", action="store_true", help="SLURM: submit and return; the same command later collects")
    for name, kind, text in (
        ("partition", str, "SLURM partition"),
        ("account", str, "SLURM account"),
        ("qos", str, "SLURM quality of service"),
        ("time", str, "time limit per job, minutes or HH:MM:SS"),
        ("gpus_per_run", int, "GPUs per run (one task each)"),
        ("cpus_per_run", int, "CPUs per task"),
        ("array_parallelism", int, "array tasks running at once"),
        ("max_requeues", int, "requeues after a time limit"),
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{text} (over --cluster)")


def _add_tune(sub: Any) -> None:
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
        default=5,
        help="with --compare: seeds of the final runs, none of the tuning seeds (default: 5)",
    )
    p.add_argument(
        "--pruner",
        default="median",
        choices=("median", "halving", "none"),
        help="stops hopeless trials on the validation curve (default: median)",
    )
    p.add_argument("--prune-after", type=int, help="epochs of each seed never pruned (default: a quarter)")
    p.add_argument("--sampler-seed", type=int, default=0, help="TPE sampler seed (worker k uses seed + k)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="trials run at once: local processes, or SLURM jobs with --executor slurm (default: 1)",
    )
    p.add_argument("--storage", help="an RDB URL for the study (default: a journal file in the study folder)")
    p.add_argument(
        "--study-name",
        help="the study's name in the storage (default: the folder's name; with --compare, NAME-alone and NAME-guided)",
    )
    p.add_argument("--worker", metavar="STUDY_DIR", help="only pull trials of the study in this folder (a job)")
    p.add_argument("--worker-index", type=int, default=0, help="with --worker: this worker's number (sampler seed)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value of both configs (repeatable)")
    add_cluster_flags(p)
    p.set_defaults(func=cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="untrainable",
        description="Train untrainable networks by guiding their layers toward a frozen guide network (CKA).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (or set UNTRAINABLE_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list experiments, models, data sets and similarity measures")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run an experiment (several arms x seeds) and print its table")
    p.add_argument("experiment", help="experiment name (see `untrainable list`)")
    p.add_argument("--quick", action="store_true", help="a small version that finishes in minutes on a CPU")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the experiment's, 3 or more)")
    p.add_argument("--out", help="output folder (default: runs/EXPERIMENT); finished runs in it are reused")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default: 1)")
    add_cluster_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train one run from a TOML or JSON config file")
    p.add_argument(
        "--config",
        required=True,
        help=(
            "config file (.toml or .json, such as a run folder's config.json); "
            "a model named by import path (package.module:callable) runs that code: read a config you did not write"
        ),
    )
    p.add_argument("--out", help="run folder (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last good checkpoint")
    p.add_argument(
        "--accept-config",
        action="store_true",
        help="with --resume: continue with a config other than the run's, or one that cannot be checked "
        "(the changes are recorded in meta.json)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )
    p.set_defaults(func=cmd_train)

    _add_tune(sub)

    p = sub.add_parser("layers", help="show guide/target layer pairs, shapes and similarity at initialisation")
    p.add_argument("target", help="target model name")
    p.add_argument("guide", help="guide model name")
    p.add_argument("--data", default="mnist1d", help="data set whose inputs are used (default: mnist1d)")
    p.add_argument("--data-args", default="{}", help="JSON keyword arguments of the data set")
    p.add_argument("--target-args", default="{}", help="JSON keyword arguments of the target model")
    p.add_argument("--guide-args", default="{}", help="JSON keyword arguments of the guide model")
    p.add_argument("--guide-checkpoint", help="weights for the guide (a run's model.pt)")
    p.add_argument("--target-layers", nargs="+", help="target layer paths or globs (default: the library's)")
    p.add_argument("--guide-layers", nargs="+", help="guide layer paths or globs (default: the library's)")
    p.add_argument("--similarity", default="cka", help="similarity measure (default: cka)")
    p.add_argument("--batch", type=int, default=256, help="examples used to measure similarity")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("bench", help="time guided vs unguided vs the authors' step, and the CKA kernel")
    p.add_argument("--quick", action="store_true", help="tiny models, a few seconds (numbers not meaningful)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", help="folder for table.md and bench.json (e.g. results/bench)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--measures", action="store_true", help="only the guided step per similarity measure at the rescue's shapes"
    )
    p.set_defaults(func=cmd_bench)
    return parser


def _is_main_process() -> bool:
    """False in the processes of a torchrun launch other than rank 0: only rank 0 prints."""
    return os.environ.get("RANK", "0") == "0"


def _may_be_this_ranks_own(err: BaseException) -> bool:
    """Whether a process other than rank 0 should print `err`.

    Not a ConfigError (every rank reads the same config: rank 0 reports it),
    nor anything raised before the process group started (parsing, set-up);
    after it, an error may be this rank's alone (a file, a checkpoint).
    """
    import torch.distributed

    from untrainable.config import ConfigError

    return not isinstance(err, ConfigError) and torch.distributed.is_available() and torch.distributed.is_initialized()


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(message).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from untrainable.checkpoint import CheckpointError
    from untrainable.config import ConfigError
    from untrainable.errors import CallableError
    from untrainable.guidance import NonFiniteError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the subcommand
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    debug = debug or os.environ.get("UNTRAINABLE_DEBUG", "") not in ("", "0")
    try:
        with contextlib.ExitStack() as stack:
            if not _is_main_process():
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")  # every rank would print the same warning
            return args.func(args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        if _is_main_process():
            print(f"untrainable {args.command}: interrupted: {_one_line(err)}", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM, as the shell counts
    except CallableError as err:  # the user's code failed: their traceback, from their callable's frame on
        if debug:
            raise
        if _is_main_process():
            print(f"untrainable {args.command}: error: {_one_line(err)}", file=sys.stderr)
            inner = err.error
            frames = inner.__traceback__.tb_next if inner.__traceback__ is not None else None
            traceback.print_exception(type(inner), inner, frames, file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, NonFiniteError, ValueError, TypeError, KeyError, OSError) as err:
        if debug:
            raise
        if _is_main_process():
            print(f"untrainable {args.command}: error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        elif _may_be_this_ranks_own(err):
            rank = os.environ.get("RANK")
            print(
                f"untrainable {args.command} (rank {rank}): error: {_one_line(err)} (--debug shows the traceback)",
                file=sys.stderr,
            )
        return 2
    except RuntimeError as err:
        from untrainable.distributed import is_timeout

        if debug or not is_timeout(err):
            raise
        print(
            f"untrainable {args.command} (rank {os.environ.get('RANK', '0')}): error: another process did not answer "
            f"within train.timeout_s ({_one_line(err)[:160]}); it hung or died: see its log (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
