"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow and Weights & Biases, behind one small interface.

Every tracker has the four methods of `MetricLogger` (as torchtune's metric
loggers do). MLflow and W&B are imported only when a config names them. A
resumed run continues the same tracker run (its id is kept in meta.json) and
never logs a step twice: each tracker first reads which steps it holds
(MLflow's store, W&B's offline run files) and skips them when they run again.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

from untrainable.config import LoggingSpec, RunConfig


class MetricLogger(Protocol):
    """Where a run's numbers go: scalars by name and step, the run's parameters once, then closed."""

    def log(self, name: str, value: float, step: int) -> None: ...

    def log_dict(self, payload: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def close(self, finished: bool = True) -> None: ...


def flatten(data: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested tables as one level of `a.b.c` keys (lists kept as JSON text)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else value
    return out


def git_commit() -> str | None:
    """The commit of the source tree the package runs from, when it is a git checkout; else None."""
    source = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


class TensorBoardLogger:
    """Events under `folder/tensorboard`; a resume from step S drops the events written after S (purge_step)."""

    def __init__(self, folder: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        for name, value in payload.items():
            self.writer.add_scalar(name, value, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=1, default=str) + "\n```")

    def close(self, finished: bool = True) -> None:
        self.writer.close()


_MLFLOW_NAME = re.compile(r"[^/\w.\- :]")  # what MLflow refuses in a metric, parameter or tag name


def mlflow_name(name: str) -> str:
    """`name` with each character MLflow refuses replaced by `_` (`layer1<-layer2` becomes `layer1_-layer2`)."""
    return _MLFLOW_NAME.sub("_", name)


def mlflow_client(uri: str) -> Any:
    """An MlflowClient of the store at `uri`, quiet (no INFO lines when a SQLite store is first made)."""
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


class MLflowLogger:
    """One MLflow run (created, or continued by `run_id`) in experiment `experiment` of the store at `uri`."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        run_id: str | None = None,
        parent_run: str | None = None,
    ) -> None:
        self.client = mlflow_client(uri)
        self.uri = uri
        found = self._existing(run_id)
        self.new = found is None
        self.done: dict[str, int] = {}  # metric -> the last step the store holds (a resumed run skips up to it)
        if found is not None:
            self.run_id = found.info.run_id
            for key in found.data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.done[key] = max((m.step for m in history), default=-1)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {**tags, **({"mlflow.parentRunId": parent_run} if parent_run else {})}
            created = self.client.create_run(experiment_id(self.client, experiment), run_name=run_name, tags=tags)
            self.run_id = created.info.run_id

    def _existing(self, run_id: str | None) -> Any:
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None  # another store, or the run was deleted: a new run

    def log(self, name: str, value: float, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), float(v), now, step) for k, v in payload.items()]
        metrics = [m for m in metrics if step > self.done.get(m.key, -1)]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Parameters, once per run (MLflow refuses a changed value; a resume may change `train.max_steps`)."""
        if not self.new:
            return
        from mlflow.entities import Param

        params = [Param(mlflow_name(k), str(v)[:6000]) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def close(self, finished: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment `name`, created when missing (two processes may race to create it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:
        return str(client.get_experiment_by_name(name).experiment_id)


class WandbLogger:
    """One W&B run with id `run_id`, its files under `folder/wandb`; offline unless `mode` is `online`."""

    def __init__(
        self, folder: Path, project: str, run_name: str, run_id: str, mode: str, group: str | None, tags: list[str]
    ) -> None:
        self.done = logged_steps(folder / "wandb", run_id)  # the offline files of earlier starts
        import wandb

        self.run = wandb.init(
            project=project,
            dir=str(folder),
            id=run_id,
            name=run_name,
            group=group,
            tags=tags,
            mode=mode,  # type: ignore[arg-type]
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = run_id

    def log(self, name: str, value: float, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        fresh = {k: v for k, v in payload.items() if step > self.done.get(k, -1)}
        if fresh:
            self.run.log(fresh, step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(flatten(config), allow_val_change=True)

    def close(self, finished: bool = True) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def offline_files(folder: Path, run_id: str) -> list[Path]:
    """The offline files of W&B run `run_id` under `folder`, one per start, in the order the starts began.

    W&B names a start's folder `offline-run-YYYYMMDD_HHMMSS-ID`, and a second start within the same
    second `...-ID-1` (then `-2`, ...).
    """
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for path in folder.glob(f"offline-run-*/run-{run_id}.wandb"):
        match = pattern.fullmatch(path.parent.name)
        if match:
            found.append(((match.group(1), int(match.group(2) or 0)), path))
    return [path for _, path in sorted(found)]


def logged_steps(folder: Path, run_id: str) -> dict[str, int]:
    """Metric -> the last step that W&B's offline files of run `run_id` under `folder` hold."""
    done: dict[str, int] = {}
    for path in offline_files(folder, run_id):
        for step, row in wandb_history(path):
            for key in row:
                done[key] = max(done.get(key, -1), step)
    return done


def wandb_history(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, {metric: value}) of each history row in a W&B run file (`run-ID.wandb`).

    The file is a LevelDB-style log (a 7-byte header `:W&B`, then 32 KiB
    blocks of records: crc32, length, type, data) of W&B's protobuf
    `Record`s; a record cut off by a killed writer ends the scan.
    """
    from wandb.proto import wandb_internal_pb2

    for raw in _log_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        try:
            record.ParseFromString(raw)
        except Exception:  # a torn record
            return
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            yield (
                int(row.get("_step", record.history.step.num)),
                {k: v for k, v in row.items() if not k.startswith("_")},
            )


def _log_records(data: bytes, block: int = 32768, header: int = 7) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        return
    pos, parts = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0 or pos + header + length > len(data):
            return
        parts += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST
            yield parts
            parts = b""


def open_trackers(config: RunConfig, folder: Path, resume_step: int | None, ids: dict[str, Any]) -> dict[str, Any]:
    """The config's trackers for a run in `folder`, by name; `ids` (meta.json's `trackers`) continues their runs.

    Raises what a tracker raises when it cannot start (the caller warns and goes on without it).
    """
    spec: LoggingSpec = config.logging
    project = spec.experiment or spec.group or config.name
    seed = config.train.seed
    run_name = f"{config.name}-seed{seed}" if spec.group else config.name
    tags = {**spec.tags, **({"study": spec.group, "arm": config.name} if spec.group else {}), "seed": str(seed)}
    opened: dict[str, Any] = {}
    for name in spec.trackers:
        try:
            if name == "tensorboard":
                opened[name] = TensorBoardLogger(folder, resume_step)
            elif name == "mlflow":
                uri = spec.mlflow_uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
                known = ids.get("mlflow") or {}
                run_id = known.get("run_id") if known.get("uri") == uri else None
                opened[name] = MLflowLogger(uri, project, run_name, tags, run_id, spec.parent_run)
            elif name == "wandb":
                run_id = (ids.get("wandb") or {}).get("run_id") or uuid.uuid4().hex[:8]
                labels = [f"{k}={v}" for k, v in tags.items()]
                opened[name] = WandbLogger(folder, project, run_name, run_id, spec.wandb_mode, spec.group, labels)
        except Exception as err:  # noqa: BLE001  (any fault of a tracker: it is left out, training goes on)
            opened[name] = err
    return opened


def tracker_ids(trackers: Mapping[str, Any]) -> dict[str, Any]:
    """What meta.json keeps so that a resumed run continues the same tracker runs."""
    ids: dict[str, Any] = {}
    if isinstance(trackers.get("mlflow"), MLflowLogger):
        ids["mlflow"] = {"uri": trackers["mlflow"].uri, "run_id": trackers["mlflow"].run_id}
    if isinstance(trackers.get("wandb"), WandbLogger):
        ids["wandb"] = {"run_id": trackers["wandb"].run_id}
    return ids


def run_params(config: RunConfig) -> dict[str, Any]:
    """What each tracker run records as parameters: the resolved config, seed, versions, git commit."""
    from untrainable.runs import versions

    spec = config.logging
    study = {"study": spec.group, "arm": config.name} if spec.group else {}
    return {
        "config": config.to_dict(),
        "seed": config.train.seed,
        "versions": versions(),
        "git_commit": git_commit() or "unknown",
        **study,
    }


# ---------------------------------------------------------------- studies and tuning

STUDY_FILE = "tracking.json"  # in a study folder: the MLflow parent run of its runs


def study_logging(spec: LoggingSpec, root: Path, name: str) -> LoggingSpec:
    """The logging of a study's runs: one store (`mlflow.db` in `root`), one experiment, one W&B group, one parent run.

    The MLflow parent run is made once and kept in `root/tracking.json`, so a
    study run again (or its other workers) puts its runs under the same one.
    """
    if not {"mlflow", "wandb"} & set(spec.trackers):
        return spec
    import dataclasses

    uri = spec.mlflow_uri or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"
    changes: dict[str, Any] = {"mlflow_uri": uri, "experiment": spec.experiment or name, "group": spec.group or name}
    if "mlflow" in spec.trackers and spec.parent_run is None:
        try:
            changes["parent_run"] = _parent_run(Path(root), uri, changes["experiment"], name, spec.tags)
        except Exception as err:  # noqa: BLE001  (the runs log without a parent; their own faults are reported)
            reason = " ".join(str(err).split())[:200]
            print(f"warning: no MLflow parent run for study {name} ({type(err).__name__}: {reason})", file=sys.stderr)
    return dataclasses.replace(spec, **changes)


def _parent_run(root: Path, uri: str, experiment: str, name: str, tags: Mapping[str, str]) -> str:
    from untrainable.checkpoint import write_atomic
    from untrainable.runs import fcntl

    path = root / STUDY_FILE
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tracking.lock", "a") as lock:  # the workers of a study make one parent run between them
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        client = mlflow_client(uri)
        run_id = known.get("parent_run") if known.get("uri") == uri else None
        if run_id is None or _missing(client, run_id):
            tags = {**tags, "study": name}
            run_id = client.create_run(experiment_id(client, experiment), run_name=name, tags=tags).info.run_id
            client.set_terminated(run_id)  # it holds no metrics of its own: its children do
            write_atomic(path, json.dumps({"uri": uri, "parent_run": run_id}, indent=2) + "\n")
    return str(run_id)


def _missing(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return True
    return False


def log_trial(study_dir: Path, spec: LoggingSpec, trial: Mapping[str, Any]) -> None:
    """A finished tuning trial as a tracker run: its values as parameters, `objective` as a metric, its state a tag.

    In MLflow, its seeds' runs become its children, so the trials sort by
    `objective` in the UI and each opens onto its runs. Faults give one warning line.
    """
    if not {"mlflow", "wandb"} & set(spec.trackers):
        return
    number = trial.get("number", str(trial.get("folder", "")).removeprefix("trial-").lstrip("0") or "0")
    folder = str(trial.get("folder") or f"trial-{int(number):04d}")
    params = {str(k): v for k, v in (trial.get("params") or {}).items()}
    value = trial.get("value")
    tags = {**spec.tags, "study": spec.group or "", "trial": str(number), "state": str(trial.get("state"))}
    for name in spec.trackers:
        try:
            if name == "mlflow" and spec.mlflow_uri:
                logger = MLflowLogger(spec.mlflow_uri, spec.experiment or folder, folder, tags, None, spec.parent_run)
                logger.log_config(params)
                if isinstance(value, (int, float)):
                    logger.log("objective", value, 0)
                for meta in sorted((study_dir / "trials" / folder).glob("seed*/meta.json")):
                    child = (json.loads(meta.read_text()).get("trackers") or {}).get("mlflow") or {}
                    if child.get("uri") == spec.mlflow_uri and child.get("run_id"):
                        logger.client.set_tag(child["run_id"], "mlflow.parentRunId", logger.run_id)
                logger.close()
            elif name == "wandb":
                import wandb

                run = wandb.init(
                    project=spec.experiment or folder,
                    dir=str(study_dir / "trials" / folder),
                    name=folder,
                    group=spec.group,
                    job_type="trial",
                    tags=[f"{k}={v}" for k, v in tags.items()],
                    config=params,
                    mode=spec.wandb_mode,  # type: ignore[arg-type]
                    reinit="create_new",
                    settings=wandb.Settings(silent=True, console="off"),
                )
                if isinstance(value, (int, float)):
                    run.summary["objective"] = value
                run.finish()
        except Exception as err:  # noqa: BLE001  (a tracker's fault never fails a trial)
            reason = " ".join(str(err).split())[:200]
            print(
                f"warning: the {name} tracker could not log trial {folder} ({type(err).__name__}: {reason})",
                file=sys.stderr,
            )
