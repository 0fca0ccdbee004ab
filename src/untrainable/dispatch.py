"""Handing a study's work to an executor: which one (`executor_for`), and the loop that `run` and `tune` share (`run_all`).

`run_all` submits what may start (a guided run once the run of its guide
succeeded), polls until every item ended and returns what succeeded and what
failed. A later runner on the same folder re-attaches to the items still
queued or running and reuses those already done. A new scheduler is a new
`Executor` (`untrainable.executor`) in a file of its own, named here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from untrainable.executor import Ended, Executor, Outcome, Work

if TYPE_CHECKING:
    from untrainable.cluster import SlurmSettings


def executor_for(
    folder: Path, jobs: int = 1, cluster: SlurmSettings | None = None, log: Callable[[str], None] = print
) -> Executor:
    """The executor of a study folder: SLURM jobs with `cluster` (recorded in `folder/slurm/`), else `jobs` local processes.

    One job runs in this very process, one item after another.
    """
    if cluster is not None:
        from untrainable.slurm import SlurmExecutor

        return SlurmExecutor(folder / "slurm", cluster, log)
    from untrainable.local_executor import LocalExecutor

    return LocalExecutor(jobs, log)


def run_all(
    executor: Executor,
    works: list[Work],
    done: Callable[[str], bool],
    log: Callable[[str], None] = print,
    noun: str = "run(s)",
    detach: bool = False,
    status: Callable[[], str] | None = None,
    succeeded: Callable[[Ended], bool] | None = None,
    reused: str | None = "done earlier, reusing it",
) -> Outcome:
    """Run `works` on `executor` until each has ended (with `detach`: until each that may start was submitted).

    An item is reused when `done(key)` says so (and no earlier runner's
    item is still live under its key); an item that comes after one that
    failed is not run. `succeeded` judges an ended item (default: it ended
    cleanly). `status` adds to the line printed at each change of the counts
    (and may draw a bar); `reused` is what a reused item's line says (None:
    no line). Ctrl-C or SIGTERM goes to the executor's `interrupted`, then up.
    """
    judge = succeeded or (lambda ended: ended.ok)
    outcome = Outcome()
    keys = _checked_keys(works)
    labels = {work.key: work.label for work in works}
    outcome.live = executor.attach(works)
    if outcome.live:
        log(f"{executor.kind}: re-attached to {len(outcome.live)} {noun}: {' '.join(sorted(outcome.live.values()))}")
    waiting = [work for work in works if work.key not in outcome.live and not done(work.key)]
    outcome.succeeded = [work.key for work in works if work.key not in outcome.live and done(work.key)]
    for key in outcome.succeeded if reused else ():
        log(f"[{labels[key]}] {reused}")
    failed_keys: set[str] = set()
    last = None
    try:
        while True:
            for work in [w for w in waiting if w.after in failed_keys]:
                waiting.remove(work)
                before = str(work.after)
                state = f"not run: it comes after {labels.get(before, before)}, which failed"
                outcome.failed.append(Ended(work.key, False, state))
                failed_keys.add(work.key)
            ready = [w for w in waiting if w.after is None or w.after in outcome.succeeded][: executor.room()]
            if ready:
                outcome.live.update(_submit(executor, ready, log, noun))
                waiting = [work for work in waiting if work not in ready]
            if detach or not (outcome.live or waiting):
                break
            states, ended = executor.poll()
            for item in ended:
                outcome.live.pop(item.key, None)
                if judge(item):
                    outcome.succeeded.append(item.key)
                else:
                    outcome.failed.append(item)
                    failed_keys.add(item.key)
            line = _counts(executor.kind, states, outcome, len(waiting)) + (f"; {status()}" if status else "")
            if executor.counts and line != last:
                log(line + _jobs(states, outcome.live))
                last = line
            if outcome.live:
                executor.pause()
    except KeyboardInterrupt:
        executor.interrupted(log)
        raise
    outcome.waiting = [work.key for work in waiting]
    order = {key: n for n, key in enumerate(keys)}
    outcome.failed.sort(key=lambda item: order[item.key])
    return outcome


def _checked_keys(works: list[Work]) -> list[str]:
    """The items' keys, refused when two are alike or an item comes after a key not among them."""
    keys = [work.key for work in works]
    if len(set(keys)) != len(keys):
        raise ValueError(f"work keys must be unique, got {keys}")
    unknown = [work.after for work in works if work.after is not None and work.after not in keys]
    if unknown:
        raise ValueError(f"work items come after keys that are not among them: {unknown}; valid keys: {keys}")
    return keys


def _submit(executor: Executor, ready: list[Work], log: Callable[[str], None], noun: str) -> dict[str, str]:
    """Start `ready` on the executor, with a line where it prints counts; key -> handle."""
    started = time.monotonic()
    handles = executor.submit(ready)
    if executor.counts:
        seconds = time.monotonic() - started
        log(f"{executor.kind}: submitted {len(ready)} {noun} in {seconds:.1f} s: " + " ".join(handles[w.key] for w in ready))
    return handles


def _counts(kind: str, states: dict[str, str], outcome: Outcome, waiting: int) -> str:
    """"slurm: 1 pending, 2 running, 3 done, 0 failed, 1 waiting"."""
    live = list(states.values())
    return (
        f"{kind}: {live.count('pending')} pending, {live.count('running')} running, {len(outcome.succeeded)} done, "
        f"{len(outcome.failed)} failed" + (f", {waiting} waiting" if waiting else "")
    )


def _jobs(states: dict[str, str], handles: dict[str, str]) -> str:
    """" (jobs: pending 12_1; running 12_0)", or nothing when no item is live."""
    jobs = "; ".join(
        f"{state} {' '.join(h for key, h in handles.items() if states.get(key) == state)}"
        for state in ("pending", "running")
        if state in states.values()
    )
    return f" (jobs: {jobs})" if jobs else ""
