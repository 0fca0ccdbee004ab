"""The local executor: work items in this very process one after another, or in processes of this machine.

With one job, an item runs here when polled: its exceptions come up as they
are, and the trainer's own signal handling stops it after a checkpoint. With
K jobs, each item is a process of its own (spawned: fork would copy torch's
thread pools) with cores / K torch threads, at most K at once, like a job on
a cluster: its outcome is what it wrote to disk, its exit status says whether
it ended cleanly, and an error is one line of its own on the terminal.
Ctrl-C or SIGTERM stops every process after a checkpoint of its run (they
get SIGTERM), then the runner.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from typing import Any, Callable, Iterator

from untrainable.errors import CallableError
from untrainable.executor import Ended, Executor, Work


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LocalExecutor(Executor):
    """`jobs` = 1: items run in this process, in turn; `jobs` > 1: as that many processes at most."""

    kind = "local"
    counts = False  # the items print their own lines here

    def __init__(self, jobs: int = 1, log: Callable[[str], None] = print) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.jobs, self.log = jobs, log
        self.threads = max(1, cores() // jobs)
        self.queue: list[Work] = []  # jobs = 1: submitted, not yet run
        self.procs: dict[str, Any] = {}  # key -> multiprocessing.Process
        self.previous: dict[int, Any] = {}
        self.signum: int | None = None

    def __enter__(self) -> "LocalExecutor":
        if self.jobs > 1:
            self.log(f"{self.kind}: up to {self.jobs} processes of {self.threads} thread(s) each")
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self.previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        for proc in self.procs.values():  # after an error of the runner's own, or a second Ctrl-C
            proc.terminate()  # SIGTERM: the run stops after its step, with a checkpoint
        for proc in self.procs.values():
            proc.join(timeout=30)
            if proc.exitcode is None:  # stuck: it resumes from its last checkpoint
                proc.kill()
                proc.join()
        self.procs = {}

    def _stop(self, signum: int, frame: Any) -> None:
        self.signum = signum
        stopped = KeyboardInterrupt(f"stopped by signal {signum}; every process stopped after a checkpoint")
        stopped.signum = signum  # type: ignore[attr-defined]  # the exit status: 128 + signum
        raise stopped

    def room(self) -> int:
        return self.jobs - len(self.procs) - len(self.queue)

    def submit(self, works: list[Work]) -> dict[str, str]:
        if self.jobs == 1:
            self.queue.extend(works)
            return {work.key: "this process" for work in works}
        context = multiprocessing.get_context("spawn")
        with _quiet_resource_tracker():
            for work in works:
                proc = context.Process(target=_child, args=(work.call, work.label, self.threads), name=work.label)
                proc.start()
                self.procs[work.key] = proc
        return {work.key: f"pid {self.procs[work.key].pid}" for work in works}

    def poll(self) -> tuple[dict[str, str], list[Ended]]:
        if self.jobs == 1:
            if not self.queue:
                return {}, []
            work = self.queue.pop(0)
            work.call()
            return {w.key: "pending" for w in self.queue}, [Ended(work.key, True, "COMPLETED", "this process")]
        ended = []
        for key, proc in list(self.procs.items()):
            if proc.exitcode is None:
                continue
            del self.procs[key]
            code = proc.exitcode
            state = "COMPLETED" if code == 0 else f"killed by signal {-code}" if code < 0 else f"FAILED (exit {code})"
            ended.append(Ended(key, code == 0, state, f"pid {proc.pid}"))
        return {key: "running" for key in self.procs}, ended

    def pause(self) -> None:
        if self.procs:  # until a process ends, or a second (the caller's status line may change meanwhile)
            multiprocessing.connection.wait([proc.sentinel for proc in self.procs.values()], timeout=1.0)

    def interrupted(self, log: Callable[[str], None]) -> None:
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)  # the trainer stops after its next step, with a checkpoint
        for proc in self.procs.values():
            proc.join()
        self.procs = {}


def _child(call: Callable[[], Any], label: str, threads: int) -> None:
    """A process's item: an error is one line (the user's own code: with its traceback); the exit status says how."""
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner forwards a stop as SIGTERM; the run checkpoints
    try:
        call()
    except KeyboardInterrupt as stop:
        sys.exit(128 + getattr(stop, "signum", signal.SIGTERM))
    except Exception as err:
        if os.environ.get("UNTRAINABLE_DEBUG", "") not in ("", "0"):
            raise
        print(f"[{label}] error: {' '.join(str(err).split()) or type(err).__name__}", flush=True)
        if isinstance(err, CallableError):
            inner = err.error
            frames = inner.__traceback__.tb_next if inner.__traceback__ is not None else None
            traceback.print_exception(type(inner), inner, frames, file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def _quiet_resource_tracker() -> Iterator[None]:
    """Processes started here share multiprocessing's resource tracker (started with the first) without its warning.

    A process killed with kill -9 leaves its semaphores to the tracker, which
    frees them and warns in raw lines at exit; the process is reported in one line instead.
    """
    warn = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [warn, "ignore:resource_tracker:UserWarning"]))
    try:
        yield
    finally:
        if warn is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = warn
