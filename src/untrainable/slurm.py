"""Studies as SLURM jobs through submitit: each arm x seed a job, requeued at time limits, re-attached by a later runner.

The run folder is the truth, not the scheduler's accounting (there may be no
`sacct`): `result.json` says a run is done. The runner records each job's id
in `OUT/slurm/jobs.json`; a second runner on the same folder re-attaches to
the jobs `squeue` still lists, reuses finished runs and resubmits only runs
whose job failed or vanished. A tuning study's workers (`tune_on_slurm`) are
jobs the same way: K jobs pulling trials from the study, recorded in
`STUDY/slurm/jobs.json`.
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
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from untrainable.cluster import SlurmSettings, require_slurm
from untrainable.errors import ConfigError
from untrainable.runs import writer_lock

if TYPE_CHECKING:
    from untrainable.arms import Arm
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


class Detached(Exception):
    """`--detach`: the runs were submitted (or are running); the same command later collects them."""


class StudyFailed(Exception):
    """Some runs failed; `rows` gives (label, job id, state, log path) for each, after every other run ended."""

    def __init__(self, out: Path, rows: list[tuple[str, str, str, str]], what: str = "run(s)", hint: str = "") -> None:
        self.rows = rows
        super().__init__(
            f"{len(rows)} {what} of {out} failed: " + "; ".join(f"{r[0]}: {r[2]}, log {r[3]}" for r in rows) + hint
        )


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
        from untrainable.arms import run_folder
        from untrainable.config import RunConfig, from_dict
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
            run_folder(
                Path(self.folder), from_dict(RunConfig, self.config), self.label, self.guide_from, log, {}, False
            )
        except TrainingInterrupted as stop:
            log(f"[{self.label}] {stop}")
            _stopped(stop.signum, requeue)
        return self.folder

    def checkpoint(self) -> Any:
        """submitit's hook, called before a requeue: a fresh copy, which resumes from the folder's checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.folder, self.config, self.label, self.guide_from))


def _stopped(signum: int, requeue: Any) -> NoReturn:
    """A job's run stopped with the checkpoint of its last step on disk: requeue before a time limit, else end.

    Before a time limit (SIGUSR2), submitit's handler `requeue` requeues
    (bounded by slurm.max_requeues); on SIGTERM (preemption, `scontrol
    requeue`, `scancel`) SLURM decides. Never a result: never reported done.
    """
    if signum == signal.SIGUSR2 and callable(requeue):
        requeue(signal.SIGUSR2, None)  # exits after requeueing; raises when out of requeues
    sys.exit(-1)


@dataclass
class TuneJob:
    """What a tuning worker job runs: `tune.work` on a study folder; a requeued job joins the study again.

    It holds no trial: a trial its job stopped (signal, time limit) is marked
    failed, and the next worker to ask retries it from its checkpoints.
    """

    study_dir: str
    storage_url: str | None
    study_name: str
    worker: int  # its sampler's seed offset

    def __call__(self) -> int:
        import torch

        from untrainable.trainer import TrainingInterrupted
        from untrainable.tune import work

        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: between trials it requeues at once
        try:
            ran = work(self.study_dir, self.storage_url, self.study_name, self.worker)
        except TrainingInterrupted as stop:
            print(f"[{self.study_name}] worker {self.worker}: {stop}", flush=True)
            _stopped(stop.signum, requeue)
        print(f"{ran} trial(s) run by this worker; the study in {self.study_dir} is done", flush=True)
        return ran

    def checkpoint(self) -> Any:
        """submitit's hook, called before a requeue: a fresh copy, which joins the study again."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            TuneJob(self.study_dir, self.storage_url, self.study_name, self.worker)
        )


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


def _result(folder: Path) -> RunResult:
    from untrainable.arms import read_json
    from untrainable.trainer import RunResult

    return RunResult(folder, read_json(folder / "history.json"), read_json(folder / "result.json"))


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
    with writer_lock(out / "slurm"):  # one runner submits for a study folder at a time
        runner = _Runner(tasks, out, settings, log)
        try:
            runner.wait(detach)
        except KeyboardInterrupt:
            jobs = " ".join(runner.attached.values())
            log(
                f"slurm: runner stopped; {len(runner.attached)} job(s) keep running ({jobs}); run the same command to re-attach"
            )
            raise
    if detach and (runner.attached or runner.waiting):
        raise Detached(
            f"{len(runner.attached)} run(s) submitted or running ({' '.join(runner.attached.values())}), "
            f"{len(runner.done)} done"
            + (f", {len(runner.waiting)} waiting for their guide (submitted by a later run)" if runner.waiting else "")
            + f"; run the same command again to collect the table (job ids in {runner.record.path})"
        )
    if runner.failed:
        rows = [
            (f"{name} seed {seed}", *runner.failed[name, seed])
            for name, seed in runner.key
            if (name, seed) in runner.failed
        ]
        raise StudyFailed(out, rows)
    return runner.done


class _Runner:
    """The state of one study's runs: done (run folders), attached (job ids), waiting (for a guide), failed."""

    def __init__(self, tasks: list[tuple[Arm, int]], out: Path, settings: SlurmSettings, log: Callable[[str], None]):
        from untrainable.arms import arm_folder

        self.tasks, self.out, self.settings, self.log = tasks, out, settings, log
        self.record = JobRecord(out / "slurm" / "jobs.json")
        self.executor = slurm_executor(out / "slurm" / "logs", settings)
        self.key = {(arm.name, seed): f"{arm.name}/seed{seed}" for arm, seed in tasks}
        self.folder = {(arm.name, seed): arm_folder(arm, seed, out) for arm, seed in tasks}
        self.done: dict[tuple[str, int], RunResult] = {}
        self.failed: dict[tuple[str, int], tuple[str, str, str]] = {}  # (job id, state, log)
        self.attached: dict[tuple[str, int], str] = {}  # job id
        self.waiting: list[tuple[Arm, int]] = []
        self.stuck = StuckWatch(settings)
        recorded = {task: entry["job_id"] for task, k in self.key.items() if (entry := self.record.jobs.get(k))}
        known = squeue_states(list(recorded.values()))
        for job in recorded.values():
            if known.get(job, ("",))[0] not in ACTIVE:  # ended while no runner watched it
                drop_pickles(out / "slurm" / "logs", job)
        for arm, seed in tasks:
            task = (arm.name, seed)
            if task in recorded and known.get(recorded[task], ("",))[0] in ACTIVE:  # ending: its pickles go after
                self.attached[task] = recorded[task]
            elif (self.folder[task] / "result.json").exists():
                self.done[task] = _result(self.folder[task])
            else:
                self.waiting.append((arm, seed))
        if self.attached:
            log(f"slurm: re-attached to {len(self.attached)} job(s): {' '.join(sorted(self.attached.values()))}")
        if self.done:
            log(f"slurm: {len(self.done)} run(s) done earlier, reused")

    def submit(self) -> None:
        """Submit, as one job array, every waiting run whose guide is done; give up those whose guide failed."""
        from untrainable.arms import arm_config

        for arm, seed in [
            (a, s) for a, s in self.waiting if a.guide_from is not None and (a.guide_from, s) in self.failed
        ]:
            self.waiting.remove((arm, seed))
            self.failed[arm.name, seed] = ("-", f"not run: its guide {arm.guide_from} seed {seed} failed", "-")
        ready = [(a, s) for a, s in self.waiting if a.guide_from is None or (a.guide_from, s) in self.done]
        if not ready:
            return
        started = time.monotonic()
        calls = [
            RunJob(
                str(self.folder[a.name, s]), arm_config(a, s, self.out).to_dict(), f"{a.name} seed {s}", a.guide_from
            )
            for a, s in ready
        ]
        submitted = list(zip(ready, submit_jobs(self.executor, calls, self.out / "slurm" / "logs")))
        for (arm, seed), job in submitted:
            self.waiting.remove((arm, seed))
            self.attached[arm.name, seed] = job.job_id
            self.record.set(self.key[arm.name, seed], job.job_id, job_log(self.out / "slurm" / "logs", job.job_id))
        ids = " ".join(job.job_id for _, job in submitted)
        self.log(f"slurm: submitted {len(submitted)} run(s) in {time.monotonic() - started:.1f} s: {ids}")

    def poll(self) -> dict[str, list[str]]:
        """Move ended jobs to done (their folder holds result.json) or failed; the job ids pending and running."""
        states = squeue_states(list(self.attached.values()))
        self.stuck.check(states, {job: f"{name} seed {seed}" for (name, seed), job in self.attached.items()})
        counts: dict[str, list[str]] = {"pending": [], "running": []}
        for task, job_id in list(self.attached.items()):
            state = states.get(job_id, ("", ""))[0]
            if state in ACTIVE:
                counts[ACTIVE[state]].append(job_id)
                continue
            del self.attached[task]
            drop_pickles(self.out / "slurm" / "logs", job_id)
            if (self.folder[task] / "result.json").exists():
                self.done[task] = _result(self.folder[task])
            else:
                self.failed[task] = (job_id, state or "VANISHED", self.record.jobs[self.key[task]]["log"])
        return counts

    def wait(self, detach: bool) -> None:
        """Submit what can run, then poll until every run is done or failed (with `detach`: submit only)."""
        last = None
        bar = _bar(len(self.tasks), len(self.done))
        while True:
            self.submit()
            if detach or not (self.attached or self.waiting):
                break
            counts = self.poll()
            line = (
                f"slurm: {len(counts['pending'])} pending, {len(counts['running'])} running, {len(self.done)} done, "
                f"{len(self.failed)} failed, {len(self.waiting)} waiting for their guide"
            )
            if line != last:
                jobs = "; ".join(f"{k} {' '.join(v)}" for k, v in counts.items() if v)
                self.log(line + (f" (jobs: {jobs})" if jobs else ""))
                last = line
            bar.update(len(self.done) + len(self.failed) - bar.n)
            if self.attached:
                time.sleep(self.settings.poll_s)
        bar.close()


def tune_on_slurm(
    study_dir: Path,
    storage_url: str | None,
    study_name: str,
    workers: int,
    settings: SlurmSettings,
    log: Callable[[str], None],
    detach: bool = False,
) -> None:
    """Run a tuning study as `workers` SLURM jobs, each `tune.work` on the study; wait until every job ended.

    The study is the truth: its finished trials say when it is done. Job ids
    go to `STUDY/slurm/jobs.json` (`worker-K`); a second runner re-attaches
    to the jobs squeue still lists and, while the study is unfinished,
    submits the workers whose job ended. Prints a line at each change of the
    jobs' states or of the finished trials. Raises StudyFailed when every job
    ended and the study is not done, Detached with `detach` once submitted.
    """
    from untrainable.tune import counts, open_study, read_study

    require_slurm()
    if workers < 1:
        raise ConfigError(f"--workers: expected a number >= 1, got {workers}")
    if settings.nodes != 1 or settings.tasks != 1:
        raise ConfigError(
            f"slurm.nodes = {settings.nodes}, {settings.tasks} task(s) per node: a tuning worker is a job of one task "
            "(each trial trains in one process); give nodes = 1 and one task (at most one GPU), and --workers K"
        )
    trials = read_study(study_dir)[2].trials
    study = open_study(study_dir, storage_url, study_name)

    def finished() -> dict[str, int]:
        n = counts(study)
        return {**n, "finished": n["complete"] + n["pruned"]}

    folder = Path(study_dir) / "slurm"
    with writer_lock(folder):  # one runner submits for a study at a time
        record = JobRecord(folder / "jobs.json")
        keys = [f"worker-{k}" for k in range(workers)]
        recorded = {key: record.jobs[key]["job_id"] for key in keys if key in record.jobs}
        known = squeue_states(list(recorded.values()))
        attached = {key: job for key, job in recorded.items() if known.get(job, ("",))[0] in ACTIVE}
        for key in set(recorded) - set(attached):  # ended while no runner watched it
            drop_pickles(folder / "logs", recorded[key])
        if attached:
            log(f"slurm: re-attached to {len(attached)} tuning worker(s): {' '.join(sorted(attached.values()))}")
        missing = [key for key in keys if key not in attached]
        if missing and finished()["finished"] < trials:
            executor = slurm_executor(folder / "logs", settings)
            calls = [TuneJob(str(study_dir), storage_url, study_name, int(key.split("-")[1])) for key in missing]
            jobs = list(zip(missing, submit_jobs(executor, calls, folder / "logs")))
            for key, job in jobs:
                attached[key] = job.job_id
                record.set(key, job.job_id, job_log(folder / "logs", job.job_id))
            log(f"slurm: submitted {len(jobs)} tuning worker(s): {' '.join(job.job_id for _, job in jobs)}")
        if detach and attached:
            raise Detached(
                f"{len(attached)} tuning worker(s) submitted or running ({' '.join(attached.values())}); "
                f"run the same command again to collect the study (job ids in {record.path})"
            )
        ended = _wait_for_workers(attached, settings, finished, trials, log, folder / "logs")
    bad = [
        (f"tuning {key.replace('-', ' ')}", job, state, record.jobs[key]["log"])
        for key, (job, state) in ended.items()
        if state != "COMPLETED"
    ]
    if finished()["finished"] < trials:
        rows = bad or [(f"tuning {k.replace('-', ' ')}", j, s, record.jobs[k]["log"]) for k, (j, s) in ended.items()]
        raise StudyFailed(
            study_dir, rows, "tuning worker job(s)", "; the study is unfinished: run the same command to continue it"
        )
    for label, job, state, path in bad:
        log(f"slurm: {label} (job {job}) ended {state}, the study is done all the same; its log: {path}")


def _wait_for_workers(
    attached: dict[str, str],
    settings: SlurmSettings,
    finished: Callable[[], dict[str, int]],
    trials: int,
    log: Callable[[str], None],
    logs: Path,
) -> dict[str, tuple[str, str]]:
    """Poll squeue until every worker job in `attached` (key -> job id) ended; a line at each change. Returns key -> (job id, state)."""
    ended: dict[str, tuple[str, str]] = {}  # job id, state
    last = None
    stuck = StuckWatch(settings)
    while attached:
        states = squeue_states(list(attached.values()))
        stuck.check(states, {job: f"tuning {key.replace('-', ' ')}" for key, job in attached.items()})
        active: dict[str, list[str]] = {"pending": [], "running": []}
        for key, job in list(attached.items()):
            state = states.get(job, ("", ""))[0]
            if state in ACTIVE:
                active[ACTIVE[state]].append(job)
            else:
                ended[key] = (job, state or "VANISHED")
                del attached[key]
                drop_pickles(logs, job)
        n = finished()
        line = (
            f"slurm: {len(active['pending'])} pending, {len(active['running'])} running, {len(ended)} ended; "
            f"{n['finished']} of {trials} trials finished ({n['pruned']} pruned, {n['failed']} failed)"
        )
        if line != last:
            jobs_now = "; ".join(f"{k} {' '.join(v)}" for k, v in active.items() if v)
            log(line + (f" (jobs: {jobs_now})" if jobs_now else ""))
            last = line
        if attached:
            time.sleep(settings.poll_s)
    return ended


def _bar(total: int, initial: int) -> Any:
    """A progress bar of finished runs on a terminal; a no-op otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="run", disable=not sys.stderr.isatty(), leave=False)


def format_failures(error: StudyFailed) -> str:
    """The failed rows as a Markdown table: run, job, state, log."""
    lines = ["| run | job | state | log |", "|---|---|---|---|"]
    lines += [f"| {label} | {job} | {state} | {path} |" for label, job, state, path in error.rows]
    return "\n".join(lines)
