"""Where a study's work runs: the executor interface (submit, poll, re-attach, stop) and what it speaks of.

A work item is a picklable call whose outcome is written to disk (a run
folder, a tuning study), never returned: an executor starts it somewhere and
says when it ended and how. Two executors implement the interface:
`local_executor.LocalExecutor` (this process, or processes on this machine)
and `slurm.SlurmExecutor` (SLURM jobs through submitit); `dispatch` picks
one for a study and drives it. Executors know nothing of experiments or
tuning: they are handed work items.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from untrainable.errors import StudyError

__all__ = ["Detached", "Ended", "Executor", "Outcome", "StudyFailed", "Work"]


@dataclass(frozen=True)
class Work:
    """One item: `call()` runs it where the executor puts it; its return value is not used.

    `key` is unique in the executor's folder and the same for every runner
    ("ARM/seedN", "worker-K"): how a later runner re-attaches. `after` is the
    key of the item that must succeed first (the run a guided run takes its
    guide from).
    """

    key: str
    label: str  # in lines and errors: "fcn seed 0", "tuning worker 0"
    call: Callable[[], Any]  # picklable, for the executors that run it in another process
    after: str | None = None


@dataclass(frozen=True)
class Ended:
    """How an item ended: `ok` when it exited cleanly; its state, its job or process id, and where its lines went."""

    key: str
    ok: bool
    state: str  # "COMPLETED", "FAILED", "CANCELLED", "killed by signal 9", "VANISHED", "not run: ..."
    handle: str = "-"
    log: str = "-"  # "-": the runner's own terminal


@dataclass
class Outcome:
    """What `run_all` leaves: keys that succeeded, items that failed, and with `detach` the items still live."""

    succeeded: list[str] = field(default_factory=list)
    failed: list[Ended] = field(default_factory=list)
    live: dict[str, str] = field(default_factory=dict)  # key -> handle
    waiting: list[str] = field(default_factory=list)  # keys waiting for the item they come after


class Detached(Exception):
    """`--detach`: the work was submitted (or is running); the same command later collects it."""


class StudyFailed(StudyError):
    """Some work failed; `rows` gives (label, job or process id, state, log) for each, after every other item ended."""

    def __init__(self, out: Path, rows: list[tuple[str, str, str, str]], what: str = "run(s)", hint: str = "") -> None:
        self.rows = rows

        def where(log: str) -> str:
            return "" if log == "-" else f", log {log}"

        super().__init__(
            f"{len(rows)} {what} of {out} failed: " + "; ".join(f"{r[0]}: {r[2]}{where(r[3])}" for r in rows) + hint
        )


def format_failures(error: StudyFailed) -> str:
    """The failed rows as a Markdown table: item, job, state, log."""
    lines = ["| run | job | state | log |", "|---|---|---|---|"]
    lines += [f"| {label} | {job} | {state} | {path} |" for label, job, state, path in error.rows]
    return "\n".join(lines)


class Executor(ABC):
    """Starts work items and reports on them; entered as a context manager around one runner's work.

    `kind` names it in lines ("local", "slurm"); `counts` says whether
    `run_all` prints a line at each change of the counts (pointless where the
    items print their own lines to the same terminal).
    """

    kind = "executor"
    counts = True

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Let go of what the executor holds (a lock, processes)."""

    def attach(self, works: list[Work]) -> dict[str, str]:
        """The items an earlier runner started that are still queued or running: key -> handle (default: none)."""
        return {}

    def room(self) -> int:
        """How many more items may start now (default: as many as there are)."""
        return 1 << 30

    @abstractmethod
    def submit(self, works: list[Work]) -> dict[str, str]:
        """Start `works` (at most `room()`); key -> handle (job id, process id)."""

    @abstractmethod
    def poll(self) -> tuple[dict[str, str], list[Ended]]:
        """(key -> "pending" or "running" for each live item, the items that ended since the last poll)."""

    @abstractmethod
    def pause(self) -> None:
        """Wait a while before the next poll (at most until an item ends, where that can be seen)."""

    def interrupted(self, log: Callable[[str], None]) -> None:
        """The runner was stopped (Ctrl-C, SIGTERM): see to the live items (stop them, or say they keep running)."""
