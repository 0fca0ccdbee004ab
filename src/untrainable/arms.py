"""An arm of a study and its runs: one run folder per seed, its config, and a run trained, resumed or reused there."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from untrainable.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, write_atomic
from untrainable.config import RunConfig, config_differences
from untrainable.data import DataSplits, load_data
from untrainable.runs import holds_logs, keep_earlier_log, writer_lock
from untrainable.trainer import RunResult, train


@dataclass
class Arm:
    """One row of an experiment's table: a run configuration trained once per seed.

    `guide_from` names an earlier arm whose final weights (same seed) become
    this arm's guide: how a trained guide is made and then used. `runs_in`
    (`EXPERIMENT/ARM`) names an arm of an earlier experiment of the same study
    with this very config: its run folders are this arm's, so the seeds run
    there (a tuning sweep's) are reused and the others trained there.
    """

    name: str
    config: RunConfig
    guide_from: str | None = None
    runs_in: str | None = None


def arm_folder(arm: Arm, seed: int, out: Path) -> Path:
    """The run folder of `arm` for `seed` in the experiment folder `out`."""
    return (out.parent / arm.runs_in if arm.runs_in else out / arm.name) / f"seed{seed}"


def arm_config(arm: Arm, seed: int, out: Path) -> RunConfig:
    config = arm.config
    train = dataclasses.replace(config.train, seed=seed)
    changes: dict[str, Any] = {"train": train, "name": arm.runs_in.split("/")[-1] if arm.runs_in else arm.name}
    if arm.guide_from is not None:
        if config.guide is None:
            raise ValueError(f"arm {arm.name!r} takes its guide from {arm.guide_from!r} but has no guide model")
        changes["guide"] = dataclasses.replace(
            config.guide, checkpoint=os.path.join(os.path.abspath(out), arm.guide_from, f"seed{seed}", "model.pt")
        )
    return config.replace(**changes)


def read_json(path: Path) -> Any:
    """A run folder's JSON file, refused with a ValueError naming it when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); restore it, or remove that run folder ({path.parent}) to train it again"
        ) from None


def check_arm_folder(folder: Path, config: RunConfig, guide_from: str | None = None, repoint: bool = False) -> None:
    """Refuse a run folder of another config; a guide's checkpoint at another spelling of the study folder is the same.

    The run's config is its config.json, or, when an interrupted run lost
    that file, the copy in its newest checkpoint. Guided arms name their
    guide's model.pt under the study folder; a study resumed with `--out`
    spelled otherwise, or moved, names the same arm and seed: the same guide.
    With `repoint` (the caller holds the folder's lock), config.json is
    (re)written with the guide's current path, so that the run resumes.
    """
    path = folder / "config.json"
    saved, source = (read_json(path), path.name) if path.exists() else _checkpoint_config(folder)
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path} holds a JSON {type(saved).__name__}, not a run's config; restore it or remove {folder}"
        )
    changed = config_differences(saved, config, ignore=("train.progress", "logging"))
    if changed == ["guide.checkpoint"] and guide_from is not None and config.guide is not None:
        recorded = Path((saved.get("guide") or {}).get("checkpoint") or "")
        if recorded.parts[-3:] == Path(config.guide.checkpoint or "").parts[-3:]:
            if repoint:
                saved["guide"]["checkpoint"] = config.guide.checkpoint
                write_atomic(path, json.dumps(saved, indent=2) + "\n")
            changed = []
    if changed:
        raise ValueError(
            f"{folder} holds a run with a different config ({source} differs in {', '.join(changed)}); "
            "choose another --out or remove the folder"
        )


def _checkpoint_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The config in the newest checkpoint that loads (read only: nothing set aside), or None."""
    for checkpoint in reversed(CheckpointManager(folder / "checkpoints").paths()):
        try:
            return load_checkpoint(checkpoint).get("config"), f"checkpoints/{checkpoint.name}"
        except CheckpointError:
            continue
    return None, ""


def run_arm(
    arm: Arm,
    seed: int,
    out: Path,
    log: Callable[[str], None],
    data_sets: dict[str, DataSplits],
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """One arm's run for one seed: reused when finished, resumed when interrupted, else trained.

    `on_epoch` goes to `train` (called after each epoch trained here, not for a reused run).
    """
    folder = arm_folder(arm, seed, out)
    label = f"{arm.name} seed {seed}"
    return run_folder(folder, arm_config(arm, seed, out), label, arm.guide_from, log, data_sets, progress, on_epoch)


@dataclass
class RunWork:
    """An arm's run for one seed as a work item (`untrainable.executor`): `run_arm` wherever it is called.

    It holds nothing of training: started again (a requeued job, a second
    runner), it continues from the folder's newest checkpoint. Called in
    another process (`log` None), only rank 0 prints.
    """

    arm: Arm
    seed: int
    out: str  # the experiment folder, absolute
    log: Callable[[str], None] | None = None
    data_sets: dict[str, DataSplits] | None = None  # shared by the runs called in one process
    progress: bool = False

    def __call__(self) -> None:
        data = self.data_sets if self.data_sets is not None else {}
        run_arm(self.arm, self.seed, Path(self.out), self.log or _print_on_rank_0, data, self.progress)


def _print_on_rank_0(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def read_result(folder: Path) -> RunResult:
    """A finished run's result, read from its folder."""
    return RunResult(folder, read_json(folder / "history.json"), read_json(folder / "result.json"))


def run_folder(
    folder: Path,
    config: RunConfig,
    label: str,
    guide_from: str | None,
    log: Callable[[str], None],
    data_sets: dict[str, DataSplits],
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train `config` into `folder`: reused when finished, resumed from its newest checkpoint when started, else trained.

    The run folder's writer lock is taken first: a process that does not
    hold it touches nothing in the folder.
    """
    main = os.environ.get("RANK", "0") == "0"  # in a job of several tasks, rank 0 holds the lock for all
    with writer_lock(folder, hold=main):
        check_arm_folder(folder, config, guide_from, repoint=main)
        if not progress:
            config = config.with_section("train", progress=False)
        if (folder / "result.json").exists():
            log(f"[{label}] done earlier, reusing {folder}")
            return RunResult(folder, read_json(folder / "history.json"), read_json(folder / "result.json"))
        log(f"[{label}] training")
        # A checkpoint, good or set aside, means the run started; a temporary file of a killed first write does not.
        checkpoints = CheckpointManager(folder / "checkpoints")
        resume = bool(checkpoints.paths() or checkpoints.set_aside())
        if main and not resume and holds_logs(folder):
            kept = keep_earlier_log(folder)
            log(f"[{label}] stopped before its first checkpoint: trained again, its log kept as {kept.name}")
        result = train(
            config, folder, resume=resume, data=data_once(config, data_sets), locked=True, on_epoch=on_epoch
        )
    if not progress:
        log(f"[{label}] done in {result.final['seconds']:.0f} s: test {_headline(result.final)}")
    return result


def _headline(final: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in final["test"].items() if isinstance(v, (int, float)) and k != "loss")


def data_once(config: RunConfig, data_sets: dict[str, DataSplits]) -> DataSplits:
    """The config's data, built once per process: arms that share a data set reuse it."""
    key = json.dumps([config.data.name, config.data.args], sort_keys=True)
    if key not in data_sets:
        data_sets[key] = load_data(config.data.name, **config.data.args)
    return data_sets[key]
