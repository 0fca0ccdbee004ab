"""The SLURM executor: work items as jobs through submitit, requeued at time limits, re-attached by a later runner.

What a job wrote is the truth, not the scheduler's accounting (there may be
no `sacct`): a run's `result.json`, a study's finished trials. The executor
records each job's id by its item's key in `FOLDER/jobs.json` (`OUT/slurm/`
for a study's runs, `STUDY/slurm/` for a tuning study's workers); a second
runner on the same folder re-attaches to the jobs `squeue` still lists
(`executor.run_all` then reuses what is done and submits only the rest).
"""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

from untrainable.cluster import SlurmSettings, require_slurm
from untrainable.errors import ConfigError
from untrainable.executor import Ended, Executor, Work
from untrainable.runs import writer_lock

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


# squeue reasons of a pending job that will not start as asked until someone changes the job or the cluster.
NEVER_STARTS = (
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "PartitionDown",
    "PartitionInactive",
    "ReqNodeNotAvail",
    "Nodes required for job are DOWN",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "AccountNotAllowed",
    "QOSMaxCpuPerJobLimit",
    "QOSMaxGRESPerJob",
    "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit",
)


class SubmissionFailed(OSError):
    """sbatch refused a submission; the message is sbatch's own, in one line."""


class JobStuck(ConfigError):
    """A job pends, longer than slurm.stuck_after_s, for a reason that will not pass by itself."""


@dataclass
class _Job:
    """What a SLURM job runs: a work item's call; a requeued job (the fresh copy `checkpoint` gives) calls it again.

    Every task of the job calls it (several tasks: one DDP run, torch.distributed
    set up from SLURM's variables). The call holds no training state: it
    continues from what it wrote to disk, as `untrainable train --resume` does.
    """

    call: Callable[[], Any]
    label: str

    def __call__(self) -> Any:
        import torch

        from untrainable import distributed
        from untrainable.trainer import TrainingInterrupted

        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        distributed.export_slurm_env()
        # submitit's handler for the signal before the time limit: it calls `checkpoint` and requeues (rank 0 only).
        requeue = signal.getsignal(signal.SIGUSR2)
        try:
            return self.call()
        except TrainingInterrupted as stop:
            if os.environ.get("RANK", "0") == "0":
                print(f"[{self.label}] {stop}", flush=True)
            _stopped(stop.signum, requeue)

    def checkpoint(self) -> Any:
        """submitit's hook, called before a requeue: a fresh copy, which continues from disk."""
        import submitit

        return submitit.helpers.DelayedSubmission(_Job(self.call, self.label))


def _stopped(signum: int, requeue: Any) -> NoReturn:
    """A job's work stopped with a checkpoint on disk: requeue before a time limit, else end.

    Before a time limit (SIGUSR2), submitit's handler `requeue` requeues
    (bounded by slurm.max_requeues); on SIGTERM (preemption, `scontrol
    requeue`, `scancel`) SLURM decides. Never a result: never reported done.
    """
    if signum == signal.SIGUSR2 and callable(requeue):
        requeue(signal.SIGUSR2, None)  # exits after requeueing; raises when out of requeues
    sys.exit(-1)


def slurm_executor(folder: Path, settings: SlurmSettings) -> Any:
    """submitit's executor for jobs logging into `folder`, with the settings' sbatch parameters."""
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    executor.update_parameters(**settings.executor_parameters())
    return executor


def submit_jobs(executor: Any, calls: list[Any], folder: Path) -> list[Any]:
    """Submit `calls` as one job array into `folder` (the executor's); the jobs, or SubmissionFailed.

    When sbatch refuses (a partition that does not exist, a controller out of
    reach), SubmissionFailed carries sbatch's own message in one line and the
    job pickles written for the submission are removed: nothing was submitted.
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    def written() -> set[Path]:
        return set(folder.glob("*.pkl")) | set(folder.glob(".submission_file_*.sh")) if folder.is_dir() else set()

    before = written()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's message: it goes in ours instead
            with executor.batch():
                jobs = [executor.submit(call) for call in calls]
    except (FailedJobError, FailedSubmissionError) as err:
        for path in written() - before:
            path.unlink(missing_ok=True)
        said = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or "no message"
        raise SubmissionFailed(
            f"sbatch refused the job(s): {said}; nothing was submitted: check the [slurm] settings (partition, "
            "account, qos, time, the resources asked) and that the cluster answers (sinfo), then run the same command"
        ) from err
    return jobs


def drop_pickles(folder: Path, job_id: str) -> None:
    """Remove submitit's pickles of an ended job (its call, its tasks' results): files that run code when loaded.

    A job still queued or running needs its call's pickle (a requeued job
    loads it again); once it ended nothing reads them: untrainable takes
    results from run folders and studies, never from these files.
    """
    from submitit.core.utils import JobPaths

    JobPaths(folder, job_id=job_id).submitted_pickle.unlink(missing_ok=True)
    for path in folder.glob(f"{job_id}_*_result.pkl"):
        path.unlink(missing_ok=True)


class StuckWatch:
    """Raises JobStuck once a job has pended `settings.stuck_after_s` for a reason of NEVER_STARTS (0: never)."""

    def __init__(self, settings: SlurmSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self.since: dict[str, tuple[str, float]] = {}  # job id -> (reason, first seen)

    def check(self, states: dict[str, tuple[str, str]], labels: dict[str, str]) -> None:
        """`states`: job id -> (state, reason) from squeue; `labels`: job id -> what it runs."""
        now = self.clock()
        for job, label in labels.items():
            state, reason = states.get(job, ("", ""))
            if ACTIVE.get(state) != "pending" or not reason.startswith(NEVER_STARTS):
                self.since.pop(job, None)
                continue
            if self.since.get(job, ("",))[0] != reason:
                self.since[job] = (reason, now)
            waited = now - self.since[job][1]
            if self.settings.stuck_after_s and waited >= self.settings.stuck_after_s:
                raise JobStuck(
                    f"slurm: job {job} ({label}) has been pending for {waited:.0f} s with reason {reason}: it cannot "
                    f"start as asked ({self.settings.request()}); it stays queued: cancel it (scancel "
                    f"{job.split('_')[0]}), change the [slurm] settings or the cluster and run the same command "
                    "again, or give --stuck-after-s 0 to keep waiting"
                )


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
                raise ValueError(
                    f"{path} is not valid JSON ({err}); remove it to submit every unfinished run again"
                ) from None

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


class SlurmExecutor(Executor):
    """Work items as SLURM jobs (one job array per submission), recorded by key in `FOLDER/jobs.json`.

    Entered, it holds `FOLDER`'s lock: one runner submits for a folder at a
    time. A job squeue no longer lists has ended: COMPLETED is a clean end;
    any other state (or none, VANISHED) is not. Its pickles are then removed.
    """

    kind = "slurm"

    def __init__(self, folder: Path, settings: SlurmSettings, log: Callable[[str], None] = print) -> None:
        require_slurm()
        self.folder, self.settings, self.log = Path(folder), settings, log
        self.live: dict[str, str] = {}  # key -> job id
        self.labels: dict[str, str] = {}
        self.ending: set[str] = set()  # job ids seen ended once
        self.stuck = StuckWatch(settings)
        self.lock = contextlib.ExitStack()

    def __enter__(self) -> "SlurmExecutor":
        self.lock.enter_context(writer_lock(self.folder))
        self.record = JobRecord(self.folder / "jobs.json")
        self.executor = slurm_executor(self.folder / "logs", self.settings)
        return self

    def close(self) -> None:
        self.lock.close()

    def attach(self, works: list[Work]) -> dict[str, str]:
        self.labels.update({work.key: work.label for work in works})
        recorded = {w.key: self.record.jobs[w.key]["job_id"] for w in works if w.key in self.record.jobs}
        known = squeue_states(list(recorded.values()))
        for key, job in recorded.items():
            if known.get(job, ("",))[0] in ACTIVE:  # ending: its pickles go once it ended
                self.live[key] = job
            else:  # ended while no runner watched it
                drop_pickles(self.folder / "logs", job)
        return dict(self.live)

    def submit(self, works: list[Work]) -> dict[str, str]:
        logs = self.folder / "logs"
        jobs = submit_jobs(self.executor, [_Job(work.call, work.label) for work in works], logs)
        for work, job in zip(works, jobs):
            self.labels[work.key], self.live[work.key] = work.label, job.job_id
            self.record.set(work.key, job.job_id, job_log(logs, job.job_id))
        return {work.key: job.job_id for work, job in zip(works, jobs)}

    def poll(self) -> tuple[dict[str, str], list[Ended]]:
        states = squeue_states(list(self.live.values()))
        self.stuck.check(states, {job: self.labels[key] for key, job in self.live.items()})
        live, ended = {}, []
        for key, job in list(self.live.items()):
            state = states.get(job, ("", ""))[0]
            if state in ACTIVE:
                self.ending.discard(job)
                live[key] = ACTIVE[state]
                continue
            if job not in self.ending:  # an end is believed at the next poll (a requeue may pass through such states)
                self.ending.add(job)
                live[key] = "running"
                continue
            self.ending.discard(job)
            del self.live[key]
            drop_pickles(self.folder / "logs", job)
            ended.append(Ended(key, state == "COMPLETED", state or "VANISHED", job, self.record.jobs[key]["log"]))
        return live, ended

    def pause(self) -> None:
        time.sleep(self.settings.poll_s)

    def interrupted(self, log: Callable[[str], None]) -> None:
        jobs = " ".join(self.live.values())
        log(f"slurm: runner stopped; {len(self.live)} job(s) keep running ({jobs}); run the same command to re-attach")
