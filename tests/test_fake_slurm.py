"""The SLURM executor against fake `sbatch`, `squeue`, `scontrol` and `srun` scripts: no cluster needed.

The fakes are shell scripts in a folder that is the whole PATH, so no SLURM
command installed on the machine is found instead. `sbatch` refuses with a
message, or answers `Submitted batch job N`; `squeue` prints what the test
writes into its file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from untrainable import cli
from untrainable.cluster import SlurmSettings, load_cluster
from untrainable.config import ConfigError, DataSpec, ModelSpec, RunConfig, TrainSpec
from untrainable.config_toml import to_toml
from untrainable.executor import StudyFailed
from untrainable.experiment import Arm, Experiment, run_experiment
from untrainable.slurm import JobStuck, StuckWatch, drop_pickles

ROOT = Path(__file__).resolve().parents[1]


class FakeSlurm:
    """A folder of fake SLURM commands; `squeue_lines` is what squeue prints, `refuse` makes sbatch fail."""

    def __init__(self, folder: Path, commands: tuple[str, ...] = ("sbatch", "squeue", "scontrol", "srun")) -> None:
        self.bin = folder / "bin"
        self.bin.mkdir(parents=True)
        self.state = folder / "state"
        self.state.mkdir()
        scripts = {
            "sbatch": f"""#!/bin/sh
if [ -s {self.state}/refuse ]; then /bin/cat {self.state}/refuse >&2; exit 1; fi
echo x >> {self.state}/submitted
echo "Submitted batch job 12"
""",
            "squeue": f"""#!/bin/sh
echo x >> {self.state}/squeue_calls
if [ -e {self.state}/squeue ]; then /bin/cat {self.state}/squeue; fi
""",
            "scontrol": "#!/bin/sh\nexit 0\n",
            "srun": "#!/bin/sh\nexit 0\n",
        }
        for name in commands:
            (self.bin / name).write_text(scripts[name])
            (self.bin / name).chmod(0o755)

    def refuse(self, message: str) -> None:
        (self.state / "refuse").write_text(message + "\n")

    def squeue_lines(self, text: str) -> None:
        (self.state / "squeue").write_text(text)

    def count(self, name: str) -> int:
        path = self.state / name
        return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    slurm = FakeSlurm(tmp_path / "fake")
    monkeypatch.setenv("PATH", str(slurm.bin))
    return slurm


def tiny() -> RunConfig:
    return RunConfig(
        model=ModelSpec("fcn", {"depth": 2, "width": 16}),
        data=DataSpec("mnist1d", {"num_samples": 400, "val_size": 50}, batch_size=50),
        train=TrainSpec(epochs=1, progress=False),
        name="tiny",
    )


def tune_command(tmp_path: Path, out: Path) -> list[str]:
    config, space = tmp_path / "c.toml", tmp_path / "s.toml"
    config.write_text(to_toml(tiny()))
    space.write_text('[space]\n"optim.lr" = { low = 1e-4, high = 1e-2, log = true }\n')
    return ["tune", "--config", str(config), "--space", str(space), "--trials", "2", "--out", str(out)]


REFUSALS = [
    "sbatch: error: Batch job submission failed: Invalid partition name specified",
    "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
]


@pytest.mark.parametrize("message", REFUSALS, ids=["partition", "controller"])
@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_refused_submission_is_one_line_with_sbatchs_message_and_exit_2(fake, tmp_path, capsys, message, command):
    out = tmp_path / "out"
    args = ["run", "mnist1d", "--quick", "--out", str(out)] if command == "run" else tune_command(tmp_path, out)
    fake.refuse(message)
    assert cli.main([*args, "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"untrainable {command}: error: sbatch refused the job(s): {message}; nothing was submitted")
    logs = out / "slurm" / "logs"
    assert not list(logs.glob("*.pkl")) and not list(logs.glob(".submission_file_*")), "nothing left of the submission"
    assert not (out / "slurm" / "jobs.json").exists() or "worker" not in (out / "slurm" / "jobs.json").read_text()


@pytest.mark.parametrize("command", ["run", "tune"])
def test_without_srun_the_slurm_executor_says_so_in_one_line(tmp_path, monkeypatch, capsys, command):
    slurm = FakeSlurm(tmp_path / "fake", commands=("sbatch", "squeue", "scontrol"))
    monkeypatch.setenv("PATH", str(slurm.bin))
    out = tmp_path / "out"
    args = ["run", "mnist1d", "--quick", "--out", str(out)] if command == "run" else tune_command(tmp_path, out)
    assert cli.main([*args, "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "srun not found on PATH" in err and "apt-get install" in err, err
    assert slurm.count("submitted") == 0


@pytest.mark.parametrize("value", ['"gpu"', "3", '["gpu"]'])
def test_a_slurm_key_that_is_not_a_table_names_the_file_and_the_key_before_slurm_is_looked_for(
    tmp_path, monkeypatch, capsys, value
):
    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM: the file is checked first
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(f"slurm = {value}\n")
    out = str(tmp_path / "out")
    assert cli.main(["run", "mnist1d", "--quick", "--out", out, "--executor", "slurm", "--cluster", str(cluster)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cluster file {cluster}: slurm is " in err and "not a table" in err, err
    assert "dictionary update" not in err and "sbatch" not in err


def test_a_folder_given_as_the_cluster_file_or_the_space_file_is_called_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    folder = tmp_path / "somewhere"
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"cluster file {re.escape(str(folder))} is a folder, not a file"):
        load_cluster(folder)
    args = tune_command(tmp_path, tmp_path / "out")
    args[args.index("--space") + 1] = str(folder)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"space file {folder} is a folder, not a file" in err and "does not exist" not in err, err


def study() -> Experiment:
    return Experiment(name="tiny", description="one arm", arms=[Arm("fcn", tiny())], seeds=(0,))


def test_a_job_that_cannot_start_stops_the_runner_naming_the_job_its_reason_and_the_request(fake, tmp_path):
    fake.squeue_lines("12|PENDING|PartitionConfig\n")
    settings = SlurmSettings(poll_s=0.05, stuck_after_s=1, tasks_per_node=2, partition="debug")
    with pytest.raises(JobStuck) as err:
        run_experiment(study(), tmp_path / "out", cluster=settings, log=lambda line: None)
    message = str(err.value)
    assert "job 12 (fcn seed 0) has been pending for 1 s with reason PartitionConfig" in message, message
    assert "1 node(s) x 2 task(s) x 1 CPU(s), 60 min, partition debug" in message and "scancel 12" in message
    assert "--stuck-after-s 0" in message and fake.count("squeue_calls") >= 2


def test_asked_to_keep_waiting_the_runner_waits_on_a_job_that_cannot_start(fake, tmp_path):
    # stuck_after_s 0: the runner waits until the job leaves the queue (here cancelled by hand: a failed row).
    (fake.bin / "squeue").write_text(
        f"""#!/bin/sh
echo x >> {fake.state}/squeue_calls
n=0; while read line; do n=$((n+1)); done < {fake.state}/squeue_calls
if [ $n -lt 20 ]; then echo "12|PENDING|ReqNodeNotAvail, UnavailableNodes:node1"; fi
"""
    )
    settings = SlurmSettings(poll_s=0.05, stuck_after_s=0)
    with pytest.raises(StudyFailed, match="VANISHED"):
        run_experiment(study(), tmp_path / "out", cluster=settings, log=lambda line: None)
    assert fake.count("squeue_calls") >= 20


def test_the_watch_restarts_its_clock_when_the_reason_changes():
    now = [0.0]
    watch = StuckWatch(SlurmSettings(stuck_after_s=60), clock=lambda: now[0])
    labels = {"5": "fcn seed 0"}
    watch.check({"5": ("PENDING", "PartitionConfig")}, labels)
    now[0] = 50.0
    watch.check({"5": ("PENDING", "Resources")}, labels)  # a reason that passes: not stuck
    now[0] = 70.0
    watch.check({"5": ("PENDING", "ReqNodeNotAvail, UnavailableNodes:n1")}, labels)
    now[0] = 129.0
    watch.check({"5": ("PENDING", "ReqNodeNotAvail, UnavailableNodes:n1")}, labels)
    now[0] = 130.0
    with pytest.raises(JobStuck, match="pending for 60 s with reason ReqNodeNotAvail"):
        watch.check({"5": ("PENDING", "ReqNodeNotAvail, UnavailableNodes:n1")}, labels)


def test_the_pickles_of_an_ended_job_are_removed_from_the_study_folder(fake, tmp_path):
    out = tmp_path / "out"
    logs = out / "slurm" / "logs"
    fake.squeue_lines("12|RUNNING|None\n")
    from untrainable.executor import Detached

    with pytest.raises(Detached):
        run_experiment(study(), out, cluster=SlurmSettings(poll_s=0.05), detach=True, log=lambda line: None)
    assert (logs / "12_submitted.pkl").exists(), "a queued job keeps its call: a requeue loads it again"
    (logs / "12_0_result.pkl").write_bytes(b"written by the job's task")
    fake.squeue_lines("")  # the job ended (and failed: no result.json)
    with pytest.raises(StudyFailed):
        run_experiment(study(), out, cluster=SlurmSettings(poll_s=0.05), log=lambda line: None)
    assert not list(logs.glob("*.pkl")), sorted(p.name for p in logs.iterdir())
    assert (logs / "12_submission.sh").exists(), "the submission script (text) stays beside the log"
    drop_pickles(logs, "12")  # nothing left: no error


def test_a_done_runs_job_still_ending_is_waited_for_and_its_pickles_removed(fake, tmp_path):
    # The run wrote result.json; its job (and submitit's result pickle) ends a moment later.
    out = tmp_path / "out"
    run_experiment(study(), out, log=lambda line: None)
    logs = out / "slurm" / "logs"
    logs.mkdir(parents=True)
    for name in ("12_submitted.pkl", "12_0_result.pkl"):
        (logs / name).write_bytes(b"pickle")
    (out / "slurm" / "jobs.json").write_text('{"fcn/seed0": {"job_id": "12", "log": "-", "submitted": 0}}')
    (fake.bin / "squeue").write_text(
        f"""#!/bin/sh
echo x >> {fake.state}/squeue_calls
n=0; while read line; do n=$((n+1)); done < {fake.state}/squeue_calls
if [ $n -lt 3 ]; then echo "12|COMPLETING|None"; fi
"""
    )
    lines: list[str] = []
    table = run_experiment(study(), out, cluster=SlurmSettings(poll_s=0.05), log=lines.append)
    assert "slurm: re-attached to 1 run(s): 12" in lines and fake.count("submitted") == 0, lines
    assert table["rows"][0]["seeds"] == 1 and not list(logs.glob("*.pkl"))


def test_a_job_seen_ended_once_and_then_queued_again_is_not_submitted_twice(fake, tmp_path):
    # squeue's view of a requeue: running, once as ended (FAILED), then pending and running again, then gone. Only an
    # end seen by two polls in a row is believed; the run (done by the requeued job) is collected, never resubmitted.
    (fake.bin / "squeue").write_text(
        f"""#!/bin/sh
echo x >> {fake.state}/squeue_calls
n=0; while read line; do n=$((n+1)); done < {fake.state}/squeue_calls
case $n in 1) echo "12|RUNNING|None";; 2) echo "12|FAILED|None";; 3) echo "12|PENDING|BeginTime";;
  4) echo "12|RUNNING|None"; /bin/touch {fake.state}/finish;; esac
"""
    )
    out = tmp_path / "out"
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if (fake.state / "finish").exists() and not (out / "fcn" / "seed0" / "result.json").exists():
            run_experiment(study(), tmp_path / "elsewhere", log=lambda _: None)  # the requeued job's run, done
            for name in ("result.json", "history.json"):
                (out / "fcn" / "seed0").mkdir(parents=True, exist_ok=True)
                (out / "fcn" / "seed0" / name).write_text((tmp_path / "elsewhere" / "fcn" / "seed0" / name).read_text())

    table = run_experiment(study(), out, cluster=SlurmSettings(poll_s=0.05), log=log)
    assert fake.count("submitted") == 1 and table["rows"][0]["seeds"] == 1, lines
    assert any("1 pending" in line for line in lines) and fake.count("squeue_calls") >= 6, lines


def test_an_import_error_in_a_model_module_gives_the_debug_hint_once(tmp_path, capsys):
    module = tmp_path / "broken_models.py"
    module.write_text("raise RuntimeError('boom at import')\n")
    config = tmp_path / "c.toml"
    config.write_text(to_toml(tiny().replace(model=ModelSpec("broken_models:build"))))
    sys.path.insert(0, str(tmp_path))
    try:
        assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("broken_models", None)
    err = capsys.readouterr().err.strip()
    assert "boom at import" in err and err.count("--debug") == 1, err


def test_the_quick_mnist1d_study_has_no_two_arms_alike():
    import untrainable.recipes  # noqa: F401
    from untrainable.build import build_data
    from untrainable.experiment import EXPERIMENTS

    experiment = EXPERIMENTS.create("mnist1d", quick=True)
    configs = [(arm.config.to_dict(), arm.guide_from) for arm in experiment.arms]
    assert all(configs.count(c) == 1 for c in configs)
    for arm in experiment.arms:
        guidance = arm.config.guidance
        if guidance is not None and guidance.schedule == "first_steps":
            data = build_data(arm.config.data)
            steps = arm.config.train.epochs * (len(data.train) // arm.config.data.batch_size)
            assert guidance.steps < steps, f"{arm.name}: guided for {guidance.steps} of {steps} steps"


def test_the_local_slurm_declares_every_core_whatever_omp_num_threads_says():
    script = ROOT / "scripts" / "slurm_local.sh"
    counts = {}
    for variable in ("", "OMP_NUM_THREADS=1", "OMP_THREAD_LIMIT=1"):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
        if variable:
            env.update([variable.split("=")])
        done = subprocess.run(["bash", str(script), "cpus"], capture_output=True, text=True, env=env, check=True)
        counts[variable] = int(done.stdout.strip())
    assert set(counts.values()) == {os.cpu_count()}, counts
