"""Studies as SLURM jobs through submitit: each arm x seed a job, requeued at time limits, re-attached by a later runner.

The run folder is the truth, not the scheduler's accounting (there may be no
`sacct`): `result.json` says a run is done. The runner records each job's id
in `OUT/slurm/jobs.json`; a second runner on the same folder re-attaches to
the jobs `squeue` still lists, reuses finished runs and resubmits only runs
whose job failed or vanished.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from untrainable.cluster import SlurmSettings, require_slurm
from untrainable.runs import writer_lock

if TYPE_CHECKING:
    from untrainable.experiment import Arm
    from untrainable.trainer import RunResult

# squeue states of a job that will still run (or is running); any other means it ended.
ACTIVE = {
    "PENDING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "RESV_DEL_HOLD": "pending",
    "SUSPENDED": "pending",
    "PREEMPTED": "pending",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "RESIZING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
    "STOPPED": "running",
}


class Detached(Exception):
    """`--detach`: the runs were submitted (or are running); the same command later collects them."""


class StudyFailed(Exception):
    """Some runs failed; `rows` gives (label, job id, state, log path) for each, after every other run ended."""

    def __init__(self, out: Path, rows: list[tuple[str, str, str, str]]) -> None:
        self.rows = rows
        super().__init__(f"{len(rows)} run(s) of {out} failed: " + "; ".join(f"{r[0]}: {r[2]}, log {r[3]}" for r in rows))


@dataclass
class RunJob:
    """What a SLURM job runs: one run folder and its config, nothing else; every start resumes from disk.

    Each task of the job calls it (several tasks: one DDP run, torch.distributed
    set up from SLURM's variables). Holding no training state, a requeued job
    (this very object, or the fresh copy `checkpoint` returns) continues from
    the folder's newest checkpoint, as `untrainable train --resume` does.
    """

    folder: str
    config: dict[str, Any]  # RunConfig.to_dict()
    label: str
    guide_from: str | None = None

    def __call__(self) -> str:
        import torch

        from untrainable import distributed
        from untrainable.config import RunConfig, from_dict
        from untrainable.experiment import run_folder
        from untrainable.trainer import TrainingInterrupted

        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        distributed.export_slurm_env()
        rank = os.environ.get("RANK", "0")
        # submitit's handler for the signal before the time limit: it calls `checkpoint` and requeues (rank 0 only).
        requeue = signal.getsignal(signal.SIGUSR2)

        def log(line: str) -> None:
            if rank == "0":
                print(line, flush=True)

        try:
            run_folder(Path(self.folder), from_dict(RunConfig, self.config), self.label, self.guide_from, log, {}, False)
        except TrainingInterrupted as stop:
            # The checkpoint of the last step is on disk. Before a time limit, requeue (bounded by
            # slurm.max_requeues); on SIGTERM (preemption, `scontrol requeue`, `scancel`) SLURM decides.
            log(f"[{self.label}] {stop}")
            if stop.signum == signal.SIGUSR2 and callable(requeue):
                requeue(signal.SIGUSR2, None)  # exits after requeueing; raises when out of requeues
            sys.exit(-1)  # no result: the job is requeued or ends, never reported done
        return self.folder

    def checkpoint(self) -> Any:
        """submitit's hook, called before a requeue: a fresh copy, which resumes from the folder's checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.folder, self.config, self.label, self.guide_from))


def job_log(folder: Path, job_id: str) -> Path:
    """The log file of task 0 of a job submitted into `folder` (stdout and stderr together)."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0).stdout


def squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """State and reason of each of this user's jobs that squeue knows ("12", "12_3" for array tasks)."""
    if not job_ids:
        return {}
    command = ["squeue", "-h", "-r", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%r"]
    for attempt in range(3):  # a busy controller may time out once
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            break
        time.sleep(2 * (attempt + 1))
    else:
        raise OSError(f"squeue failed ({done.stderr.strip()[:200]}); is the SLURM controller reachable?")
    states = {}
    for line in done.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        states[job.strip()] = (state.strip().split()[0] if state.strip() else "", reason.strip())
    return {job: states[job] for job in job_ids if job in states}


class JobRecord:
    """`OUT/slurm/jobs.json`: the job id and log of each run submitted, keyed by `ARM/seedN`, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jobs: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                self.jobs = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); remove it to submit every unfinished run again") from None

    def set(self, key: str, job_id: str, log: Path) -> None:
        self.jobs[key] = {"job_id": job_id, "log": str(log), "submitted": time.time()}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.jobs, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _result(folder: Path) -> RunResult:
    from untrainable.experiment import _read_json
    from untrainable.trainer import RunResult

    return RunResult(folder, _read_json(folder / "history.json"), _read_json(folder / "result.json"))


def run_on_slurm(
    tasks: list[tuple[Arm, int]], out: Path, settings: SlurmSettings, log: Callable[[str], None], detach: bool = False
) -> dict[tuple[str, int], RunResult]:
    """Run each (arm, seed) as a SLURM job and wait for all; finished runs are reused, recorded jobs re-attached.

    Independent runs go in one job array; an arm guided by another arm's
    weights is submitted once that run is done (never if it failed). Prints
    a line at each change of the counts. Raises StudyFailed after the other
    runs ended when any failed, Detached with `detach` once submitted.
    """
    require_slurm()
    import submitit

    from untrainable.experiment import _arm_config, arm_folder

    slurm_folder = out / "slurm"
    with writer_lock(slurm_folder):  # one runner submits for a study folder at a time
        record = JobRecord(slurm_folder / "jobs.json")
        executor = submitit.SlurmExecutor(folder=slurm_folder / "logs", max_num_timeout=settings.max_requeues)
        executor.update_parameters(**settings.executor_parameters())
        key = {(arm.name, seed): f"{arm.name}/seed{seed}" for arm, seed in tasks}
        arms = {arm.name: arm for arm, _ in tasks}
        done: dict[tuple[str, int], RunResult] = {}
        failed: dict[tuple[str, int], tuple[str, str, str]] = {}  # (job id, state, log)
        attached: dict[tuple[str, int], str] = {}  # job id
        waiting = []
        for arm, seed in tasks:
            if (arm_folder(arm, seed, out) / "result.json").exists():
                done[arm.name, seed] = _result(arm_folder(arm, seed, out))
            else:
                waiting.append((arm, seed))
        known = squeue_states([record.jobs[key[a.name, s]]["job_id"] for a, s in waiting if key[a.name, s] in record.jobs])
        for arm, seed in list(waiting):
            entry = record.jobs.get(key[arm.name, seed])
            if entry and entry["job_id"] in known and known[entry["job_id"]][0] in ACTIVE:
                attached[arm.name, seed] = entry["job_id"]
                waiting.remove((arm, seed))
        if attached:
            log(f"slurm: re-attached to {len(attached)} job(s): {' '.join(sorted(attached.values()))}")
        if done:
            log(f"slurm: {len(done)} run(s) done earlier, reused")

        def submit() -> None:
            ready = [(a, s) for a, s in waiting if a.guide_from is None or (a.guide_from, s) in done]
            blocked = [(a, s) for a, s in waiting if a.guide_from is not None and (a.guide_from, s) in failed]
            for arm, seed in blocked:
                waiting.remove((arm, seed))
                failed[arm.name, seed] = ("-", f"not run: its guide {arm.guide_from} seed {seed} failed", "-")
            if not ready:
                return
            started = time.monotonic()
            jobs_of = []
            with executor.batch():  # one job array
                for arm, seed in ready:
                    config = _arm_config(arm, seed, out)
                    job_run = RunJob(str(arm_folder(arm, seed, out)), config.to_dict(), f"{arm.name} seed {seed}", arm.guide_from)
                    jobs_of.append(((arm, seed), executor.submit(job_run)))
            for (arm, seed), job in jobs_of:
                waiting.remove((arm, seed))
                attached[arm.name, seed] = job.job_id
                record.set(key[arm.name, seed], job.job_id, job_log(slurm_folder / "logs", job.job_id))
            ids = " ".join(job.job_id for _, job in jobs_of)
            log(f"slurm: submitted {len(jobs_of)} run(s) in {time.monotonic() - started:.1f} s: {ids}")

        try:
            last = None
            bar = _bar(len(tasks), len(done))
            while True:
                submit()
                if detach or not (attached or waiting):
                    break
                states = squeue_states(list(attached.values()))
                counts: dict[str, list[str]] = {"pending": [], "running": []}
                for task, job_id in list(attached.items()):
                    state = states.get(job_id, ("", ""))[0]
                    folder = arm_folder(arms[task[0]], task[1], out)
                    if state in ACTIVE:
                        counts[ACTIVE[state]].append(job_id)
                    elif (folder / "result.json").exists():
                        done[task] = _result(folder)
                        del attached[task]
                    else:
                        failed[task] = (job_id, state or "VANISHED", record.jobs[key[task]]["log"])
                        del attached[task]
                line = (
                    f"slurm: {len(counts['pending'])} pending, {len(counts['running'])} running, {len(done)} done, "
                    f"{len(failed)} failed, {len(waiting)} waiting for their guide"
                )
                if line != last:
                    jobs = "; ".join(f"{k} {' '.join(v)}" for k, v in counts.items() if v)
                    log(line + (f" (jobs: {jobs})" if jobs else ""))
                    last = line
                bar.update(len(done) + len(failed) - bar.n)
                if attached:
                    time.sleep(settings.poll_s)
            bar.close()
        except KeyboardInterrupt:
            log(
                f"slurm: runner stopped; {len(attached)} job(s) keep running under SLURM "
                f"({' '.join(attached.values())}); run the same command again to re-attach"
            )
            raise
    if detach and (attached or waiting):
        raise Detached(
            f"{len(attached)} run(s) submitted or running ({' '.join(attached.values())}), {len(done)} done"
            + (f", {len(waiting)} waiting for their guide (submitted by a later run of the same command)" if waiting else "")
            + f"; run the same command again to collect the table (job ids in {record.path})"
        )
    if failed:
        raise StudyFailed(out, [(f"{name} seed {seed}", *failed[name, seed]) for name, seed in key if (name, seed) in failed])
    return done


def _bar(total: int, initial: int) -> Any:
    """A progress bar of finished runs on a terminal; a no-op otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="run", disable=not sys.stderr.isatty(), leave=False)


def format_failures(error: StudyFailed) -> str:
    """The failed rows as a Markdown table: run, job, state, log."""
    lines = ["| run | job | state | log |", "|---|---|---|---|"]
    lines += [f"| {label} | {job} | {state} | {path} |" for label, job, state, path in error.rows]
    return "\n".join(lines)
