"""A study through a real SLURM while a seeded injector applies faults at random times (`pytest -m slurm -n 0`).

Two arms (a CNN, and an FCN guided by that CNN's trained weights) x three
seeds run through `untrainable run --executor slurm` in a runner process.
At random times the injector requeues a running job, cancels one (and runs
the command again once the runner gave up), kills the runner (and runs it
again), and restarts slurmctld and slurmd. The final table must equal a
local run's; every step is logged once and every run started from scratch
once. Needs the daemons of `scripts/slurm_local.sh` (their PID files), as root.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from untrainable.config import DataSpec, ModelSpec, RunConfig, TrainSpec
from untrainable.experiment import Arm, Experiment, register_experiment, run_experiment

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STATE = Path("/var/lib/untrainable-slurm")
SEED = 20261206
LIMIT_S = 900  # the whole soak, faults and reruns included
FAULTS = ["requeue", "scancel", "kill-runner", "restart-slurmctld", "restart-slurmd", "requeue"]


def soak() -> Experiment:
    config = RunConfig(
        model=ModelSpec("fcn", {"depth": 2, "width": 32}),
        data=DataSpec("mnist1d", {"num_samples": 600, "val_size": 50}, batch_size=10, train_eval_size=50),
        guide=ModelSpec("cnn1d", {"channels": 4}),
        train=TrainSpec(epochs=12, progress=False, checkpoint_every=20),
    )
    guide = config.replace(model=ModelSpec("cnn1d", {"channels": 4}), guide=None)
    arms = [Arm("cnn", guide), Arm("fcn+trained-cnn", config, guide_from="cnn")]
    return Experiment(name="soak", description="two arms under faults", arms=arms, seeds=(0, 1, 2))


@register_experiment("slurm-test-soak")
def _registered(quick: bool = False) -> Experiment:
    return soak()


def squeue() -> dict[str, tuple[str, str]]:
    done = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r"], capture_output=True, text=True)
    if done.returncode != 0:  # the controller is restarting
        return {}
    return {job: (state, reason) for job, state, reason in (line.split("|") for line in done.stdout.splitlines())}


def recorded(out: Path) -> list[str]:
    path = out / "slurm" / "jobs.json"
    return [entry["job_id"] for entry in json.loads(path.read_text()).values()] if path.exists() else []


def restart(daemon: str) -> None:
    """Stop a daemon by its PID file and start it again; slurmctld keeps its state in StateSaveLocation."""
    pid = int((STATE / f"{daemon}.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    subprocess.run([daemon], check=True)


class Runner:
    """`untrainable run slurm-test-soak --executor slurm` in a process of its own, started again when it ends."""

    def __init__(self, out: Path, cluster: Path, log: Path) -> None:
        script = (
            "import sys; sys.path.insert(0, {tests!r}); import test_slurm_soak; from untrainable.cli import main; "
            "sys.exit(main(['run', 'slurm-test-soak', '--executor', 'slurm', '--cluster', {cluster!r}, "
            "'--out', {out!r}]))"
        ).format(tests=str(Path(__file__).parent), cluster=str(cluster), out=str(out))
        self.command = [sys.executable, "-c", script]
        self.log = open(log, "a")
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.codes: list[int] = []

    def ensure(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if self.process is not None:
            self.codes.append(self.process.returncode)
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def running_job(out: Path) -> str | None:
    jobs = squeue()
    candidates = [job for job in recorded(out) if jobs.get(job, ("",))[0] == "RUNNING"]
    return random.Random(len(candidates)).choice(candidates) if candidates else None


def test_a_study_under_random_faults_gives_the_local_table_each_step_once(tmp_path):
    if not (STATE / "slurmctld.pid").exists():
        pytest.fail("no daemons of scripts/slurm_local.sh: run bash scripts/slurm_local.sh start")
    os.environ["OMP_NUM_THREADS"] = "1"  # the jobs inherit it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each job does (one CPU a task): the same sums in the same order, to the last bit
    try:
        _soak(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _soak(tmp_path: Path) -> None:
    started = time.monotonic()
    local = run_experiment(soak(), tmp_path / "local", log=lambda line: None)
    out, cluster = tmp_path / "slurm", tmp_path / "cluster.toml"
    cluster.write_text("[slurm]\ntime = 10\nsignal_delay_s = 60\npoll_s = 1\n")
    runner = Runner(out, cluster, tmp_path / "runner.log")
    rng = random.Random(SEED)
    faults = list(FAULTS)
    rng.shuffle(faults)
    applied: list[tuple[float, str, str]] = []
    next_fault = time.monotonic() + rng.uniform(3, 6)
    deadline = time.monotonic() + LIMIT_S
    while not (out / "table.json").exists():
        assert time.monotonic() < deadline, f"not done in {LIMIT_S} s; faults {applied}; see {tmp_path / 'runner.log'}"
        runner.ensure()
        for job, (state, reason) in squeue().items():  # a requeued job waits two minutes: start it now
            if job in recorded(out) and state == "PENDING" and reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        if faults and time.monotonic() >= next_fault:
            kind = faults[0]
            target = ""
            if kind in ("requeue", "scancel"):
                target = running_job(out) or ""
                if target:
                    command = ["scontrol", "requeue", target] if kind == "requeue" else ["scancel", target]
                    subprocess.run(command, capture_output=True)
            elif kind == "kill-runner":
                runner.kill()
                target = "runner"
            else:
                restart(kind.split("-")[1])
                target = kind.split("-")[1]
            if target:
                applied.append((round(time.monotonic() - started, 1), kind, target))
                faults.pop(0)
            next_fault = time.monotonic() + rng.uniform(2, 6)
        time.sleep(0.5)
    assert runner.process is not None
    runner.process.wait(timeout=120)
    seconds = time.monotonic() - started
    print(f"soak: {seconds:.0f} s, {runner.starts} runner start(s), exit codes {runner.codes}, faults {applied}")
    table = json.loads((out / "table.json").read_text())
    assert table["rows"] == json.loads(json.dumps(local["rows"]))
    for arm in ("cnn", "fcn+trained-cnn"):
        for seed in (0, 1, 2):
            folder = out / arm / f"seed{seed}"
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            steps = [r["step"] for r in records if "kind" not in r]
            assert steps == list(range(1, len(steps) + 1)), f"{arm} seed {seed}: a step logged twice or lost"
            starts = json.loads((folder / "meta.json").read_text())["starts"]
            fresh = [s for s in starts if "resumed_from" not in s]
            assert len(fresh) == 1, f"{arm} seed {seed}: trained from scratch {len(fresh)} times"
    assert len(applied) == len(FAULTS), f"the study ended after {len(applied)} of the faults: {applied}"
