"""Studies through a real SLURM (`bash scripts/slurm_local.sh start`; run with `pytest -m slurm -n 0`).

Each test submits tiny MNIST-1D runs (one thread each) and checks what the
scheduler did with `squeue`/`scontrol` and what the run folders hold. A
requeued job waits about two minutes before it may start again; the tests
release it at once (`scontrol update JobId=... StartTime=now`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from untrainable import cli
from untrainable.arms import arm_config
from untrainable.checkpoint import CheckpointManager, load_weights
from untrainable.cluster import SlurmSettings
from untrainable.config import DataSpec, GuidanceSpec, ModelSpec, RunConfig, TrainSpec
from untrainable.executor import Detached
from untrainable.experiment import Arm, Experiment, register_experiment, run_experiment
from untrainable.space import space_from_dict
from untrainable.trainer import train
from untrainable.tune import Settings, open_study

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent


def tiny(epochs: int = 1, batch_size: int = 50) -> RunConfig:
    return RunConfig(
        model=ModelSpec("fcn", {"depth": 2, "width": 32}),
        data=DataSpec("mnist1d", {"num_samples": 600, "val_size": 50}, batch_size=batch_size, train_eval_size=50),
        guide=ModelSpec("cnn1d", {"channels": 4}),
        train=TrainSpec(epochs=epochs, progress=False, checkpoint_every=20),
    )


def study() -> Experiment:
    """Two arms, the second guided by the first's trained weights, over two seeds."""
    guide = tiny().replace(model=ModelSpec("cnn1d", {"channels": 4}), guide=None)
    arms = [Arm("cnn", guide), Arm("fcn+trained-cnn", tiny(), guide_from="cnn")]
    return Experiment(name="tiny", description="two arms", arms=arms, seeds=(0, 1))


def long_run(epochs: int) -> Experiment:
    """One arm, one seed, many small steps: long enough to be interrupted (about 20 steps a checkpoint)."""
    return Experiment(name="long", description="one long run", arms=[Arm("fcn", tiny(epochs, 10))], seeds=(0,))


@register_experiment("slurm-test-long")
def _registered(quick: bool = False) -> Experiment:
    return long_run(30)


def settings(**changes) -> SlurmSettings:
    return SlurmSettings(**{"time": 10, "signal_delay_s": 60, "poll_s": 1.0, **changes})


def quiet(line: str) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the jobs inherit the environment
    yield
    torch.set_num_threads(threads)


def squeue() -> dict[str, tuple[str, str]]:
    done = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {job: (state, reason) for job, state, reason in (line.split("|") for line in done.stdout.splitlines())}


def last_job_number() -> int:
    return max((int(job.split("_")[0]) for job in squeue()), default=0)


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"waited {seconds:.0f} s for {what}; squeue: {squeue()}")


def release_when_requeued(job: str) -> bool:
    """Start a requeued job now instead of in two minutes; whether it was waiting."""
    state, reason = squeue().get(job, ("", ""))
    if state == "PENDING" and reason == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        return True
    return False


def restarts(job: str) -> int:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"Restarts=(\d+)", text).group(1))


def recorded(out: Path) -> dict[str, str]:
    return {key: entry["job_id"] for key, entry in json.loads((out / "slurm" / "jobs.json").read_text()).items()}


def step_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def logged_steps(folder: Path) -> list[int]:
    return [r["step"] for r in step_records(folder) if "kind" not in r]


def submit_detached(experiment: Experiment, out: Path, cluster: SlurmSettings) -> str:
    with pytest.raises(Detached):
        run_experiment(experiment, out, cluster=cluster, detach=True, log=quiet)
    (job,) = recorded(out).values()
    return job


def test_a_study_through_slurm_gives_the_local_table_to_the_last_digit(tmp_path):
    local = run_experiment(study(), tmp_path / "local", log=quiet)
    lines: list[str] = []
    started = time.monotonic()
    slurm = run_experiment(study(), tmp_path / "slurm", cluster=settings(), log=lines.append)
    print(f"SLURM study: {time.monotonic() - started:.1f} s; " + " | ".join(lines))
    assert slurm["rows"] == local["rows"]
    assert any("submitted 2 run(s)" in line for line in lines), lines  # the guides, then the guided arm
    jobs = json.loads((tmp_path / "slurm" / "slurm" / "jobs.json").read_text())
    for seed in (0, 1):  # each guided run was submitted once its guide was done
        guide_done = (tmp_path / "slurm" / "cnn" / f"seed{seed}" / "result.json").stat().st_mtime
        assert jobs[f"fcn+trained-cnn/seed{seed}"]["submitted"] >= guide_done
    for name in ("cnn", "fcn+trained-cnn"):
        for seed in (0, 1):
            run = f"{name}/seed{seed}"
            a, b = (
                load_weights(tmp_path / "local" / run / "model.pt"),
                load_weights(tmp_path / "slurm" / run / "model.pt"),
            )
            assert all(torch.equal(a[k], b[k]) for k in a), run
    assert (tmp_path / "slurm" / "table.md").exists() and (tmp_path / "slurm" / "curves.png").exists()


def test_a_job_requeued_while_running_resumes_each_step_once_to_the_uninterrupted_weights(tmp_path):
    experiment = long_run(30)
    reference = tmp_path / "reference"
    config = arm_config(experiment.arms[0], 0, tmp_path / "unused").with_section("train", progress=False)
    train(config, reference)

    out = tmp_path / "study"
    job = submit_detached(experiment, out, settings())
    folder = out / "fcn" / "seed0"
    wait_for(lambda: (folder / "checkpoints").is_dir() and len(logged_steps(folder)) > 200, 120, "200 steps")
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: release_when_requeued(job), 60, "the requeued job to wait")
    run_experiment(experiment, out, cluster=settings(), log=quiet)  # re-attaches and waits

    total = json.loads((folder / "result.json").read_text())["steps"]
    assert logged_steps(folder) == list(range(1, total + 1)), "each step logged once"
    resumes = [r for r in step_records(folder) if r.get("kind") == "resume"]
    print(f"requeued job {job}: resumed at step(s) {[r['step'] for r in resumes]}, restarts {restarts(job)}")
    assert len(resumes) == 1 and restarts(job) == 1
    expected, got = load_weights(reference / "model.pt"), load_weights(folder / "model.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_job_at_its_time_limit_is_checkpointed_requeued_and_finishes(tmp_path):
    # SIGUSR2 55 s before a one-minute limit reaches the job at SLURM's next time-limit check, 5 to 35 s after it
    # starts; the run (about 13,000 steps, over 40 s at the fastest measured here, 300 steps/s) is still training
    # then, in its first attempt or, when that one was signalled during its set-up, in the next. A signal during the
    # set-up requeues at once (submitit's own handler); one during training stops the run at its next step with a
    # checkpoint. Once that happened the requeued job gets ten minutes, so the test need not wait for more requeues.
    experiment = long_run(300)
    out = tmp_path / "study"
    job = submit_detached(experiment, out, settings(time=1, signal_delay_s=55, max_requeues=6))
    folder = out / "fcn" / "seed0"
    released = 0

    def finished() -> bool:
        nonlocal released
        state, reason = squeue().get(job, ("", ""))
        if state == "PENDING" and reason == "BeginTime" and restarts(job) > released:
            longer = ["TimeLimit=10"] if CheckpointManager(folder / "checkpoints").paths() else []
            subprocess.run(["scontrol", "update", f"JobId={job}", *longer, "StartTime=now"], check=True)
            released += 1
        if (folder / "result.json").exists():
            return True
        if state in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"):  # no result
            log = out / "slurm" / "logs" / f"{job}_0_log.out"
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            raise AssertionError(f"job {job} ended {state} after {restarts(job)} requeue(s); its log ends:\n{tail}")
        return False

    wait_for(finished, 600, "the run to finish")
    lines: list[str] = []
    run_experiment(experiment, out, cluster=settings(), log=lines.append)  # collects: the run is done
    assert recorded(out) == {"fcn/seed0": job} and not [line for line in lines if "submitted" in line], lines
    total = json.loads((folder / "result.json").read_text())["steps"]
    assert logged_steps(folder) == list(range(1, total + 1)), "each step logged once"
    resumes = [r["step"] for r in step_records(folder) if r.get("kind") == "resume"]
    log = (out / "slurm" / "logs" / f"{job}_0_log.out").read_text()
    print(f"time-limited job {job}: {restarts(job)} requeue(s), resumed at steps {resumes}")
    assert restarts(job) == released >= 1 and 1 <= len(resumes) <= restarts(job)
    assert "this job is timed-out" in log and "Requeued job" in log


RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from test_slurm import settings, study
from untrainable.experiment import run_experiment
run_experiment(study(), {out!r}, cluster=settings(), log=lambda line: print(line, flush=True))
"""


def test_a_runner_killed_mid_study_and_started_again_reattaches_without_a_second_submission(tmp_path):
    out = tmp_path / "study"
    before = last_job_number()
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(TESTS), out=str(out)))
    runner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(
            lambda: (out / "slurm" / "jobs.json").exists() and len(recorded(out)) == 2, 120, "the first submission"
        )
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    first = recorded(out)
    assert all(squeue()[job][0] in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED") for job in first.values())

    lines: list[str] = []
    started = time.monotonic()
    run_experiment(study(), out, cluster=settings(), log=lines.append)
    print(f"re-attached and finished in {time.monotonic() - started:.1f} s: " + " | ".join(lines))
    jobs = recorded(out)
    assert {k: jobs[k] for k in first} == first, "the guides' jobs were not submitted again"
    # The guided arm's two seeds only, each submitted when its guide finishes (together or apart).
    submissions = [re.search(r"submitted (\d+) run", line) for line in lines]
    assert sum(int(m.group(1)) for m in submissions if m) == 2
    submitted = {job for job in squeue() if int(job.split("_")[0]) > before}
    assert submitted == set(jobs.values()), "squeue knows no other job of this study"
    assert "slurm: re-attached to 2 run(s): " + " ".join(sorted(first.values())) in lines


def test_a_cancelled_job_is_a_failed_row_with_its_log_and_the_study_exits_2(tmp_path, capsys):
    out = tmp_path / "study"
    cluster_file = tmp_path / "cluster.toml"
    cluster_file.write_text("[slurm]\ntime = 10\nsignal_delay_s = 60\npoll_s = 1\n")
    command = ["run", "slurm-test-long", "--executor", "slurm", "--cluster", str(cluster_file), "--out", str(out)]
    assert cli.main([*command, "--detach"]) == 0
    (job,) = recorded(out).values()
    wait_for(lambda: squeue().get(job, ("",))[0] == "RUNNING", 120, "the job to run")
    subprocess.run(["scancel", job], check=True)
    capsys.readouterr()
    assert cli.main(command) == 2
    captured = capsys.readouterr()
    log = out / "slurm" / "logs" / f"{job}_0_log.out"
    assert f"| fcn seed 0 | {job} | CANCELLED | {log} |" in captured.out, captured.out
    assert log.exists() and "error: 1 run(s)" in captured.err and "\n" not in captured.err.strip()
    assert not (out / "table.json").exists()


def test_a_two_task_job_trains_one_ddp_run_with_the_global_batch_guidance(tmp_path):
    from torch.utils.data import DistributedSampler, default_collate

    from untrainable.step import _losses
    from untrainable.trainer import _set_up

    config = tiny(1, 20).replace(
        model=ModelSpec("fcn", {"depth": 2, "width": 32, "batch_norm": False}), guidance=GuidanceSpec(alpha=1.0)
    )
    experiment = Experiment(name="ddp", description="one DDP run", arms=[Arm("fcn", config)], seeds=(0,))
    out = tmp_path / "study"
    run_experiment(experiment, out, cluster=settings(tasks_per_node=2), log=quiet)
    folder = out / "fcn" / "seed0"
    records = [r for r in step_records(folder) if "kind" not in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "one writer"
    (job,) = recorded(out).values()
    log = (out / "slurm" / "logs" / f"{job}_0_log.out").read_text()
    assert "global_rank=0(2)" in log and (out / "slurm" / "logs" / f"{job}_1_log.out").exists()

    # Step 1 in one process: the first batch of each rank's shard, concatenated (the gather's order).
    run, _ = _set_up(arm_config(experiment.arms[0], 0, out), tmp_path / "recompute", False, None)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(
            run.loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True
        )
        sampler.set_epoch(0)
        shards.append(default_collate([run.loader.dataset[i] for i in list(sampler)[: config.data.batch_size]]))
    both = tuple(torch.cat([shards[0][i], shards[1][i]]) for i in range(len(shards[0])))
    with torch.no_grad():
        global_loss = _losses(run.parts, both, 1)[0]["guidance_loss"].item()
        shard_loss = _losses(run.parts, shards[0], 1)[0]["guidance_loss"].item()
    print(
        f"step 1 guidance loss: logged {records[0]['guidance_loss']}, both shards {global_loss}, rank 0's {shard_loss}"
    )
    assert records[0]["guidance_loss"] == pytest.approx(global_loss, rel=1e-5, abs=1e-7)
    assert abs(shard_loss - global_loss) > 1e-4, "the shard alone gives another loss: the batch was gathered"


def test_tune_on_two_slurm_worker_jobs_shares_one_study_and_runs_no_trial_twice(tmp_path):
    from untrainable.compare import tune

    config = tiny(2).replace(guide=None, name="tiny-tune")
    space = space_from_dict({"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "test space")
    out = tmp_path / "study"
    lines: list[str] = []
    started = time.monotonic()
    summary = tune(
        config, space, Settings(trials=4, tune_seeds=(0,), pruner="none"), out, workers=2, cluster=settings(),
        log=lines.append,
    )  # fmt: skip
    print(f"tuned by two SLURM workers in {time.monotonic() - started:.1f} s: " + " | ".join(lines))
    jobs = recorded(out)
    assert sorted(jobs) == ["worker-0", "worker-1"] and len(set(jobs.values())) == 2, jobs
    assert any(line.startswith("slurm: submitted 2 tuning worker(s) in ") for line in lines), lines
    assert "4 of 4 trials finished" in lines[-1], lines
    study = open_study(out, None, "study")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4  # exactly the budget: none asked twice
    assert summary["trials"]["complete"] == 4 and (out / "best.toml").exists()
    notes = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("trial-*/trial.json"))]
    assert sorted(note["number"] for note in notes) == [0, 1, 2, 3]
    assert len({t.params["optim.lr"] for t in study.trials}) == 4  # no values drawn twice
    ran = {}
    for key, job in jobs.items():
        log = (out / "slurm" / "logs" / f"{job}_0_log.out").read_text()
        ran[job] = int(re.search(r"(\d+) trial\(s\) run by this worker", log).group(1))
        assert ran[job] == sum(note["worker"].startswith(f"job{job}-") for note in notes), (key, log)
    print(f"trials run by each job: {ran}")
    assert sum(ran.values()) == 4, ran  # each trial run by exactly one job (whichever got a CPU first)
    for note in notes:
        assert note["worker"].split("-")[0] in {f"job{job}" for job in jobs.values()}
        folder = out / "trials" / f"trial-{note['number']:04d}" / "seed0"
        records = step_records(folder)
        assert not any(r.get("kind") == "resume" for r in records)
        assert logged_steps(folder) == list(range(1, len(logged_steps(folder)) + 1))  # trained once, by one job
        assert (folder / "result.json").exists()


def test_tune_when_its_worker_job_is_cancelled_exits_2_with_its_log_and_the_same_command_finishes(tmp_path, capsys):
    from untrainable.config_toml import to_toml

    config_file, space_file, cluster_file = tmp_path / "c.toml", tmp_path / "s.toml", tmp_path / "cluster.toml"
    config_file.write_text(to_toml(tiny(20, 10).replace(guide=None, name="tiny-tune")))
    space_file.write_text('[space]\n"optim.lr" = { low = 1e-4, high = 1e-2, log = true }\n')
    cluster_file.write_text("[slurm]\ntime = 10\nsignal_delay_s = 60\npoll_s = 1\n")
    out = tmp_path / "study"
    command = ["tune", "--config", str(config_file), "--space", str(space_file), "--trials", "2", "--out", str(out)]
    command += ["--tune-seeds", "0", "--pruner", "none", "--executor", "slurm", "--cluster", str(cluster_file)]
    assert cli.main([*command, "--detach"]) == 0
    (job,) = recorded(out).values()
    assert "detached: 1 tuning worker(s) submitted" in capsys.readouterr().out
    checkpoints = out / "trials" / "trial-0000" / "seed0" / "checkpoints"
    with ThreadPoolExecutor(1) as pool:
        runner = pool.submit(cli.main, command)  # re-attaches to the job and waits
        wait_for(lambda: list(checkpoints.glob("step-*.pt")), 120, "the first trial to checkpoint")
        subprocess.run(["scancel", job], check=True)
        assert runner.result(timeout=120) == 2
    captured = capsys.readouterr()
    assert f"slurm: re-attached to 1 tuning worker(s): {job}" in captured.out, captured.out
    log = out / "slurm" / "logs" / f"{job}_0_log.out"
    assert f"| tuning worker 0 | {job} | CANCELLED | {log} |" in captured.out, captured.out
    assert "the study is unfinished" in captured.err and "\n" not in captured.err.strip(), captured.err
    assert not (out / "best.toml").exists()

    assert cli.main(command) == 0  # a new worker job: the cancelled trial is retried from its checkpoints
    print(capsys.readouterr().out)
    (again,) = recorded(out).values()
    assert again != job
    study = open_study(out, None, "study")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1, states
    records = step_records(checkpoints.parent)
    assert any(r.get("kind") == "resume" for r in records)
    steps = logged_steps(checkpoints.parent)
    assert steps == list(range(1, len(steps) + 1)), "each step logged once"
    assert (out / "best.toml").exists()


def test_tune_compare_on_slurm_tunes_both_arms_by_worker_jobs_and_trains_the_final_seeds_as_jobs(tmp_path):
    from untrainable.compare import compare, unguided

    guided = tiny(2).replace(name="tiny-guided")
    space = space_from_dict({"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "test space")
    twin = space_from_dict({"guidance.alpha": {"low": 0.1, "high": 10.0, "log": True}}, "test twin space")
    out = tmp_path / "cmp"
    lines: list[str] = []
    started = time.monotonic()
    _, _, table = compare(
        guided, unguided(guided), space, twin, Settings(trials=2, tune_seeds=(0,), pruner="none"), out, seeds=2,
        workers=2, cluster=settings(), log=lines.append,
    )  # fmt: skip
    print(f"compared through SLURM in {time.monotonic() - started:.1f} s: " + " | ".join(lines))
    assert table["seeds"] == [1, 2] and table["tune_seeds"] == [0]
    for arm in ("alone", "guided"):
        assert sorted(recorded(out / arm)) == ["worker-0", "worker-1"]
        assert [t.state.name for t in open_study(out / arm, None, f"cmp-{arm}").trials] == ["COMPLETE"] * 2
    assert sorted(recorded(out / "final")) == ["alone/seed1", "alone/seed2", "guided/seed1", "guided/seed2"]
    assert (out / "table.md").exists() and table["notes"][-1].startswith("Verdict: ")
