"""The `untrainable` command line: list, run, train, tune, layers, bench, pack."""

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

from untrainable import cli_tune
from untrainable.cli_args import add_cluster_flags, cluster_settings, json_args, out_folder, set_overrides

EPILOG = (
    "Examples:\n"
    "  untrainable list\n"
    "  untrainable run mnist1d --quick\n"
    "  untrainable train --config src/untrainable/configs/mnist1d.toml --out runs/one\n"
    "  untrainable layers fcn cnn1d --data mnist1d\n"
    "  untrainable pack /path/to/imagenet --out /data/imagenet-256 --size 256\n"
    "  untrainable tune --compare GUIDED.toml --space SPACE.toml --guided-space GSPACE.toml --trials 16 --out runs/tune"
)


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

    cluster = cluster_settings(args)
    built = EXPERIMENTS.create(args.experiment, quick=args.quick)
    # Quick runs get their own folder: finished runs in a folder are reused.
    root = out_folder(args.out, Path("runs") / (args.experiment + ("-quick" if args.quick else ""))) or Path("runs")
    seeds = tuple(args.seeds) if args.seeds else None
    tracking = _study_logging(built, set_overrides(args.set))
    steps = run_study(
        built, root, seeds=seeds, jobs=args.jobs, cluster=cluster, detach=args.detach, logging=tracking,
        name=args.experiment,
    )  # fmt: skip
    for experiment, out, table in steps:
        print(f"\n## {experiment.name}\n\n{format_table(table)}")
        for note in table.get("notes", []):
            print(f"- {note}")
        print(f"\n{len(table['seeds'])} seeds, {table['seconds']:.0f} s. Table, curves and runs in {out}/")
    return 0


def _study_logging(built: Any, overrides: dict[str, Any]) -> Any:
    """A study's `[logging]`: its first arm's, with `run --set logging.KEY=VALUE` over it (only logging keys)."""
    import dataclasses

    from untrainable.config import ConfigError, LoggingSpec, from_dict, set_dotted

    other = [key for key in overrides if not key.startswith("logging.")]
    if other:
        raise ConfigError(f"--set {other[0]}: run sets only logging.* keys (the arms' configs are the experiment's)")
    if not overrides:
        return None
    steps = built if isinstance(built, list) else [built]
    first = next((step for step in steps if not callable(step) and step.arms), None)
    base = dataclasses.asdict(first.arms[0].config.logging if first is not None else LoggingSpec())
    for key, value in overrides.items():
        set_dotted(base, key.split(".", 1)[1], value)
    try:
        spec = from_dict(LoggingSpec, base, "logging")
        spec.validate("logging")
    except ConfigError as err:
        raise ConfigError(f"--set {err}") from None
    return spec


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run from a config file."""
    from untrainable.config import ConfigError, load_config
    from untrainable.trainer import train

    if args.accept_config and not args.resume:
        raise ConfigError("--accept-config lets a resumed run change its config: it needs --resume")
    out = out_folder(args.out)
    config = load_config(args.config, set_overrides(args.set), overrides_label="--set")
    result = train(config, out or Path("runs") / config.name, resume=args.resume, accept_config=args.accept_config)
    print(json.dumps(result.final, indent=2))
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    """Print the guide-target pairs with their shapes and similarity at initialisation."""
    from untrainable.build import build_data, build_model
    from untrainable.config import ConfigError, DataSpec, ModelSpec
    from untrainable.data.registry import Prepared
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
        json_args(text, flag)
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
        Prepared(data.train, data.prepare),
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

    out = out_folder(args.out)  # refused before the benchmark runs, not after
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


def cmd_pack(args: argparse.Namespace) -> int:
    """Pack an image folder into an image store (`[data] name = "image_store"`)."""
    from untrainable.data.pack import pack

    out = out_folder(args.out)
    assert out is not None  # --out is required
    manifest = pack(args.image_folder, out, args.size, args.shard_size, args.processes, args.skip_bad, not args.quiet)
    parts = manifest["parts"]
    counts = ", ".join(f"{name} {part['count']}" for name, part in parts.items())
    skipped = sum(len(part["skipped"]) for part in parts.values())
    shards = [shard for part in parts.values() for shard in part["shards"]]
    print(
        f"image store {out}: {counts} images of {len(manifest['classes'])} classes at {manifest['size']} x "
        f"{manifest['size']}, {len(shards)} shards, {sum(s['bytes'] for s in shards) / 1e9:.2f} GB, checksums verified"
        + (f"; {skipped} unreadable image(s) skipped (listed in store.json)" if skipped else "")
    )
    return 0


def _add_pack(sub: Any) -> None:
    """The `pack` subcommand's arguments."""
    p = sub.add_parser(
        "pack",
        help="pack an image folder into a store of decoded images (data name image_store)",
        description="Decode every image of a class-per-folder tree once, resize its shorter side to --size and "
        "centre-crop it to a square, and write the uint8 pixels in memory-mapped shards with labels, classes and a "
        "checksum per shard. Run again after a kill: the shards written are kept.",
    )
    p.add_argument("image_folder", help="the tree of images, laid out as for the image_folder data set")
    p.add_argument("--out", required=True, help="the store's folder (new, empty, or an unfinished pack to resume)")
    p.add_argument("--size", type=int, required=True, help="side of the stored squares, >= the image_size trained")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard (default: 1024)")
    p.add_argument("--processes", type=int, help="decoding processes (default: every core)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (listed in store.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pack)


def _add_train(sub: Any) -> None:
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
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="where the runs log, e.g. --set 'logging.loggers=[\"mlflow\"]' (logging.* keys only; repeatable)",
    )
    add_cluster_flags(p)
    p.set_defaults(func=cmd_run)

    _add_train(sub)

    cli_tune.add_parser(sub)

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

    _add_pack(sub)
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


def _debug_hint(line: str) -> str:
    """The line with the hint that --debug shows the traceback, unless it gives one already."""
    return line if "--debug" in line else f"{line} (--debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    from untrainable.checkpoint import CheckpointError
    from untrainable.config import ConfigError
    from untrainable.errors import CallableError, StudyError
    from untrainable.executor import Detached, StudyFailed, format_failures
    from untrainable.guidance import NonFiniteError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the subcommand
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.argv = [a for a in argv if a != "--debug"]  # as typed: a stopped command names itself to continue
    debug = debug or os.environ.get("UNTRAINABLE_DEBUG", "") not in ("", "0")
    try:
        with contextlib.ExitStack() as stack:
            if not _is_main_process():
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")  # every rank would print the same warning
            return args.func(args)
    except Detached as detached:  # submitted; the same command collects
        print(f"untrainable {args.command}: detached: {detached}")
        return 0
    except StudyFailed as failed:  # every other run ended: which failed, how, and their logs
        if debug:
            raise
        print(f"\n{format_failures(failed)}\n")
        print(f"untrainable {args.command}: error: {_one_line(failed)}", file=sys.stderr)
        return 2
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
    except (ConfigError, CheckpointError, NonFiniteError, StudyError, ValueError, TypeError, KeyError, OSError) as err:
        if debug:
            raise
        if _is_main_process():
            print(f"untrainable {args.command}: error: {_debug_hint(_one_line(err))}", file=sys.stderr)
        elif _may_be_this_ranks_own(err):
            rank = os.environ.get("RANK")
            print(f"untrainable {args.command} (rank {rank}): error: {_debug_hint(_one_line(err))}", file=sys.stderr)
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
