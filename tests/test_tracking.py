"""Experiment trackers: MLflow (SQLite) and W&B (offline) read back with their own clients; resumes log each step once;
a failing tracker never stops training."""

from __future__ import annotations

import ast
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny import tiny_config
from untrainable.config import ConfigError, LoggingSpec, load_config
from untrainable.data import load_data
from untrainable.trainer import TrainingInterrupted, train

SRC = Path(__file__).resolve().parents[1] / "src" / "untrainable"


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing reaches the network or the home folder: W&B offline and silent, its folders in the test's own."""
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'unused-default.db'}")


def _tracked(tmp_path: Path, loggers: list[str], **train_args) -> object:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir(exist_ok=True)
    config = tiny_config(**{"epochs": 2, "max_steps": None, **train_args})
    return config.replace(logging=LoggingSpec(loggers=loggers, mlflow_uri=uri))


def _jsonl(folder: Path) -> tuple[list[int], list[dict]]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "kind" not in r], [r for r in records if r.get("kind") == "epoch"]


def _mlflow_run(folder: Path):
    from mlflow import MlflowClient

    ids = json.loads((folder / "meta.json").read_text())["trackers"]["mlflow"]
    client = MlflowClient(tracking_uri=ids["uri"])
    return client, client.get_run(ids["run_id"])


def _wandb_rows(folder: Path) -> list[tuple[int, dict]]:
    """Every history row of the run's offline files, in the order written, read with W&B's protobuf Record."""
    from untrainable.trackers import offline_files, wandb_history

    run_id = json.loads((folder / "meta.json").read_text())["trackers"]["wandb"]["run_id"]
    files = offline_files(folder / "wandb", run_id)
    assert files, f"no W&B offline run file for {run_id} in {folder / 'wandb'}"
    return [row for path in files for row in wandb_history(path)]


def test_trackers_are_imported_only_where_a_run_selects_them() -> None:
    """mlflow and wandb load slowly: no module imports them at its top level."""
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("mlflow", "wandb")], path.name


def test_the_logging_section_takes_set_overrides_and_refuses_unknown_loggers(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    config = load_config(path, {"logging.loggers": ["mlflow", "wandb"], "logging.tags": {"lab": "x"}}, "--set")
    assert config.logging.trackers == ["mlflow", "wandb"] and config.logging.wandb_mode == "offline"
    assert tiny_config().logging.loggers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"--set logging.loggers=.*logging.loggers\[0\]: 'neptune' is not one of"):
        load_config(path, {"logging.loggers": ["neptune"]}, "--set")
    with pytest.raises(ConfigError, match="logging.wandb_mode: 'cloud' is not one of offline, online"):
        load_config(path, {"logging.wandb_mode": "cloud"}, "--set")


@pytest.mark.slow  # W&B runs its service as a subprocess
def test_mlflow_and_wandb_hold_the_steps_of_metrics_jsonl_once_each(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    folder = tmp_path / "run"
    result = train(_tracked(tmp_path, ["mlflow", "wandb"]), folder)
    steps, epochs = _jsonl(folder)
    assert len(epochs) == 2 and not (folder / "tensorboard").exists()

    client, run = _mlflow_run(folder)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "task_loss")] == steps
    val = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in val] == [(e["step"], e["val_accuracy"]) for e in epochs]
    assert run.data.metrics["result/test/accuracy"] == result.final["test"]["accuracy"]
    assert run.data.params["config.train.seed"] == "0" and run.data.params["config.model.name"] == "fcn"
    assert run.data.params["git_commit"] and run.data.params["versions.torch"]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    rows = _wandb_rows(folder)
    assert [step for step, row in rows if "task_loss" in row] == steps
    assert [(step, row["val_accuracy"]) for step, row in rows if "val_accuracy" in row] == [
        (e["step"], e["val_accuracy"]) for e in epochs
    ]


def _steps_once(steps: list[int], expected: list[int]) -> None:
    assert sorted(steps) == expected, "a step logged twice or missing"


@pytest.mark.slow
def test_a_run_killed_and_resumed_continues_its_tracker_runs_each_step_once(tmp_path: Path) -> None:
    """kill -9 after step 7, the last checkpoint at step 6: steps 7.. run again but reach each tracker once."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    folder = tmp_path / "run"
    config = _tracked(tmp_path, ["mlflow", "wandb", "tensorboard"], checkpoint_every=3)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from untrainable.config import RunConfig, from_dict
        from untrainable.data import load_data
        from untrainable.trainer import train

        class KilledAfter:
            def __init__(self, dataset, limit):
                self.dataset, self.limit, self.reads = dataset, limit, 0
            def __len__(self):
                return len(self.dataset)
            def __getitem__(self, i):
                self.reads += 1
                if self.reads > self.limit:
                    os.kill(os.getpid(), signal.SIGKILL)
                return self.dataset[i]

        config = from_dict(RunConfig, json.load(open({str(tmp_path / "config.json")!r})))
        data = load_data("mnist1d", num_samples=600, val_size=60)
        data.train = KilledAfter(data.train, 50 * 7 + 10)  # while reading step 8's batch
        train(config, {str(folder)!r}, data=data)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    # Its own W&B service, as a job has: not this process's (which an earlier test may have started), which would
    # outlive the kill and keep holding the run.
    env.pop("WANDB_SERVICE", None)
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _, run = _mlflow_run(folder)
    assert run.info.status == "RUNNING"  # as a killed process leaves it

    train(config, folder, resume=True)
    steps, epochs = _jsonl(folder)
    assert steps == list(range(1, steps[-1] + 1))
    client, run = _mlflow_run(folder)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    _steps_once([m.step for m in client.get_metric_history(run.info.run_id, "task_loss")], steps)
    _steps_once(
        [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")], [e["step"] for e in epochs]
    )
    rows = _wandb_rows(folder)
    _steps_once([step for step, row in rows if "task_loss" in row], steps)
    _steps_once([step for step, row in rows if "val_accuracy" in row], [e["step"] for e in epochs])


class _SignalsAfter:
    """A data set that sends this process SIGUSR2 (a SLURM job's notice before its time limit) after `limit` reads."""

    def __init__(self, dataset, limit: int) -> None:
        self.dataset, self.limit, self.reads = dataset, limit, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.limit:
            os.kill(os.getpid(), signal.SIGUSR2)
        return self.dataset[i]


@pytest.mark.slow  # W&B runs its service as a subprocess
def test_a_requeued_run_continues_its_tracker_runs_each_step_once(tmp_path: Path) -> None:
    """SIGUSR2 stops the run after a checkpoint of its last step; the requeued job resumes the same tracker runs."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    folder = tmp_path / "run"
    config = _tracked(tmp_path, ["mlflow", "wandb"])
    data = load_data("mnist1d", num_samples=600, val_size=60)
    data.train = _SignalsAfter(data.train, 50 * 5 + 10)
    with pytest.raises(TrainingInterrupted):
        train(config, folder, data=data)
    first = json.loads((folder / "meta.json").read_text())["trackers"]
    _, run = _mlflow_run(folder)
    assert run.info.status == "KILLED"

    train(config, folder, resume=True)
    assert json.loads((folder / "meta.json").read_text())["trackers"] == first
    steps, epochs = _jsonl(folder)
    client, run = _mlflow_run(folder)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    _steps_once([m.step for m in client.get_metric_history(run.info.run_id, "task_loss")], steps)
    _steps_once(
        [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")], [e["step"] for e in epochs]
    )
    _steps_once([step for step, row in _wandb_rows(folder) if "task_loss" in row], steps)


def test_a_failing_tracker_gives_one_warning_line_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from untrainable import trackers

    calls = []

    def full_disk(self, payload, step):
        calls.append(step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers.TensorBoardLogger, "log_dict", full_disk)
    folder = tmp_path / "run"
    result = train(tiny_config(), folder)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracker" in line]
    assert len(warnings) == 1 and "the tensorboard tracker failed" in warnings[0]
    assert "No space left on device" in warnings[0] and "training goes on" in warnings[0]
    assert calls == [1]  # left out after its first fault
    assert _jsonl(folder)[0] == list(range(1, result.final["steps"] + 1))


@pytest.mark.slow
def test_a_locked_mlflow_store_gives_one_warning_line_and_training_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow")
    store = tmp_path / "locked.db"
    holder = sqlite3.connect(store)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than MLflow waits
    try:
        config = tiny_config().replace(logging=LoggingSpec(loggers=["mlflow"], mlflow_uri=f"sqlite:///{store}"))
        result = train(config, tmp_path / "run")
    finally:
        holder.rollback()
        holder.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracker" in line]
    assert len(warnings) == 1 and "the mlflow tracker could not start" in warnings[0], warnings
    assert "locked" in warnings[0]
    assert _jsonl(tmp_path / "run")[0] == list(range(1, result.final["steps"] + 1))
    assert "trackers" not in json.loads((tmp_path / "run" / "meta.json").read_text())


@pytest.mark.slow
def test_a_study_is_one_mlflow_experiment_with_a_parent_run_and_one_wandb_group(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from untrainable.experiment import Arm, Experiment, run_study
    from untrainable.trackers import _log_records, mlflow_client

    config = tiny_config().replace(logging=LoggingSpec(loggers=["mlflow", "wandb"]))
    arms = [Arm("a", config), Arm("b", config.with_section("optim", lr=3e-3))]
    study = Experiment("step", "two arms", arms, seeds=(0,))
    root = tmp_path / "study"
    run_study(study, root, name="my-study", log=lambda line: None)
    run_study(study, root, name="my-study", log=lambda line: None)  # run again: reused, nothing logged twice

    client = mlflow_client(f"sqlite:///{(root / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("my-study")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["a-seed0", "b-seed0", "my-study"]
    parent = json.loads((root / "tracking.json").read_text())["parent_run"]
    assert runs["my-study"].info.run_id == parent
    for arm in ("a", "b"):
        tags = runs[f"{arm}-seed0"].data.tags
        assert tags["mlflow.parentRunId"] == parent and tags["arm"] == arm and tags["study"] == "my-study"
    from wandb.proto import wandb_internal_pb2

    groups = set()
    for path in root.glob("*/seed0/wandb/offline-run-*/run-*.wandb"):
        for raw in _log_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "run":
                groups.add((record.run.run_group, record.run.project))
    assert groups == {("my-study", "my-study")}


@pytest.mark.slow
def test_each_tuning_trial_is_a_run_with_its_values_and_objective(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from untrainable.compare import tune
    from untrainable.space import load_space
    from untrainable.trackers import mlflow_client
    from untrainable.tune import Settings

    space = tmp_path / "space.toml"
    space.write_text('[space]\n"optim.lr" = { low = 1e-4, high = 1e-2, log = true }\n')
    config = tiny_config().replace(logging=LoggingSpec(loggers=["mlflow"]))
    study_dir = tmp_path / "study"
    tune(config, load_space(space), Settings(trials=2, tune_seeds=(0,), pruner="none"), study_dir, log=lambda _: None)

    client = mlflow_client(f"sqlite:///{study_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study")
    runs = client.search_runs([experiment.experiment_id], order_by=["metrics.objective DESC"])
    trials = {r.info.run_name: r for r in runs if "trial" in r.data.tags}
    assert sorted(trials) == ["trial-0000", "trial-0001"]
    for name, run in trials.items():
        saved = json.loads((study_dir / "trials" / name / "trial.json").read_text())
        assert run.data.metrics["objective"] == pytest.approx(saved["value"])
        assert float(run.data.params["optim.lr"]) == pytest.approx(saved["params"]["optim.lr"])
        assert run.data.tags["state"] == "complete"
        seed_run = json.loads((study_dir / "trials" / name / "seed0" / "meta.json").read_text())["trackers"]["mlflow"]
        assert client.get_run(seed_run["run_id"]).data.tags["mlflow.parentRunId"] == run.info.run_id


def test_only_rank_0_opens_trackers(tmp_path: Path) -> None:
    """Every other process of a torchrun launch or a SLURM job of several tasks writes nothing, tracker or file."""
    from untrainable.logs import MetricsLog

    config = tiny_config().replace(logging=LoggingSpec(loggers=["mlflow", "wandb", "tensorboard"]))
    log = MetricsLog(tmp_path, False, None, config)
    log.log({"step": 1, "loss": 1.0})
    log.close({"steps": 1})
    assert log.trackers == {} and list(tmp_path.iterdir()) == []


def test_run_sets_only_logging_keys_of_a_study(tmp_path: Path) -> None:
    from untrainable.cli import _study_logging
    from untrainable.experiment import Arm, Experiment

    study = Experiment("s", "", [Arm("a", tiny_config())])
    spec = _study_logging(study, {"logging.loggers": ["mlflow"], "logging.tags.lab": "x"})
    assert spec.loggers == ["mlflow"] and spec.tags == {"lab": "x"}
    assert _study_logging(study, {}) is None
    with pytest.raises(ConfigError, match="--set train.epochs: run sets only logging"):
        _study_logging(study, {"train.epochs": 2})
    with pytest.raises(ConfigError, match=r"--set logging.loggers\[0\]: 'csv' is not one of"):
        _study_logging(study, {"logging.loggers": ["csv"]})


def test_w_and_b_starts_within_one_second_are_both_read(tmp_path: Path) -> None:
    """A resume in the second of the last start gets the folder `...-ID-1`: its steps count, in start order."""
    from untrainable.trackers import offline_files

    names = ["offline-run-20260101_120000-ab12-1", "offline-run-20260101_115959-ab12", "offline-run-20260101_120000-ab12",
             "offline-run-20260101_120000-ab123", "offline-run-20260101_120000-ab12-10"]  # fmt: skip
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / f"run-{name.split('-')[3]}.wandb").write_bytes(b"")
    found = [p.parent.name for p in offline_files(tmp_path, "ab12")]
    assert found == [names[1], names[2], names[0], names[4]]  # not ab123's
