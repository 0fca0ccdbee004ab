"""The executor seam: `run_all` over any Executor, the local executor's processes, and a third scheduler in a few lines."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from untrainable.dispatch import run_all
from untrainable.executor import Ended, Executor, Work
from untrainable.local_executor import LocalExecutor


class ThreadExecutor(Executor):
    """A third scheduler, whole: each item a thread. What a new executor needs is this much and nothing else."""

    kind = "threads"

    def __init__(self, earlier: dict[str, threading.Thread] | None = None) -> None:
        self.threads: dict[str, threading.Thread] = {}
        self.errors: dict[str, str] = {}
        self.earlier = earlier or {}
        self.pauses = 0

    def attach(self, works: list[Work]) -> dict[str, str]:
        self.threads.update({w.key: t for w in works if (t := self.earlier.get(w.key)) and t.is_alive()})
        return {key: thread.name for key, thread in self.threads.items()}

    def submit(self, works: list[Work]) -> dict[str, str]:
        for work in works:
            self.threads[work.key] = threading.Thread(target=self._run, args=(work,), name=f"thread-{work.key}")
            self.threads[work.key].start()
        return {work.key: self.threads[work.key].name for work in works}

    def _run(self, work: Work) -> None:
        try:
            work.call()
        except Exception as err:
            self.errors[work.key] = str(err)

    def poll(self) -> tuple[dict[str, str], list[Ended]]:
        ended = [
            Ended(key, key not in self.errors, self.errors.get(key, "COMPLETED"), thread.name)
            for key, thread in list(self.threads.items())
            if not thread.is_alive()
        ]
        for item in ended:
            del self.threads[item.key]
        return {key: "running" for key in self.threads}, ended

    def pause(self) -> None:
        self.pauses += 1
        time.sleep(0.01)


class Mark:
    """A work item's call: writes FOLDER/KEY (what a run's result.json is to a run), or fails."""

    def __init__(self, folder: Path, key: str, fail: bool = False, seconds: float = 0.0) -> None:
        self.folder, self.key, self.fail, self.seconds = folder, key, fail, seconds

    def __call__(self) -> None:
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError(f"{self.key} broke")
        (self.folder / self.key).write_text(str(time.monotonic()))


def works(folder: Path, fail: tuple[str, ...] = ()) -> list[Work]:
    """Two guides and their guided runs (b0 after a0, b1 after a1)."""
    keys = {"a0": None, "a1": None, "b0": "a0", "b1": "a1"}
    return [Work(k, f"run {k}", Mark(folder, k, k in fail, 0.05), after=after) for k, after in keys.items()]


def test_a_third_scheduler_runs_a_study_each_item_after_the_one_it_needs(tmp_path):
    lines: list[str] = []
    outcome = run_all(ThreadExecutor(), works(tmp_path), lambda key: (tmp_path / key).exists(), lines.append)
    assert sorted(outcome.succeeded) == ["a0", "a1", "b0", "b1"] and not outcome.failed
    for guide, guided in (("a0", "b0"), ("a1", "b1")):
        assert float((tmp_path / guide).read_text()) < float((tmp_path / guided).read_text())
    assert lines[0].startswith("threads: submitted 2 run(s)") and "4 done, 0 failed" in lines[-1], lines


def test_an_item_after_a_failed_one_is_not_run_and_every_other_runs_to_its_end(tmp_path):
    outcome = run_all(ThreadExecutor(), works(tmp_path, fail=("a0",)), lambda key: (tmp_path / key).exists(), print)
    assert sorted(outcome.succeeded) == ["a1", "b1"]
    failed = [(e.key, e.state) for e in outcome.failed]
    assert failed == [("a0", "a0 broke"), ("b0", "not run: it comes after run a0, which failed")]
    assert not (tmp_path / "b0").exists()


def test_done_items_are_reused_and_live_ones_reattached_never_started_twice(tmp_path):
    (tmp_path / "a0").write_text("0")  # done by an earlier runner
    slow = threading.Thread(target=Mark(tmp_path, "a1", seconds=0.3), name="earlier-a1")
    slow.start()  # still running from an earlier runner
    executor = ThreadExecutor(earlier={"a1": slow})
    lines: list[str] = []
    outcome = run_all(executor, works(tmp_path), lambda key: (tmp_path / key).exists(), lines.append)
    assert sorted(outcome.succeeded) == ["a0", "a1", "b0", "b1"]
    assert lines[:2] == ["threads: re-attached to 1 run(s): earlier-a1", "[run a0] done earlier, reusing it"]
    assert (tmp_path / "a0").read_text() == "0"  # not run again
    assert float((tmp_path / "a1").read_text()) < float((tmp_path / "b1").read_text())


def test_detach_submits_what_may_start_and_leaves_the_rest_waiting(tmp_path):
    outcome = run_all(ThreadExecutor(), works(tmp_path), lambda key: False, print, detach=True)
    assert sorted(outcome.live) == ["a0", "a1"] and outcome.waiting == ["b0", "b1"] and not outcome.succeeded


def test_a_stopped_runner_lets_the_executor_see_to_its_live_items(tmp_path):
    seen: list[str] = []

    class Stopped(ThreadExecutor):
        def pause(self) -> None:
            raise KeyboardInterrupt("Ctrl-C")

        def interrupted(self, log) -> None:
            seen.append(f"interrupted with {len(self.threads)} live")

    with pytest.raises(KeyboardInterrupt):
        run_all(Stopped(), works(tmp_path), lambda key: False, print)
    assert len(seen) == 1 and seen[0].startswith("interrupted with "), seen


def test_keys_must_be_unique_and_name_the_items_they_come_after(tmp_path):
    twice = [Work("a", "a", Mark(tmp_path, "a")), Work("a", "a again", Mark(tmp_path, "a"))]
    with pytest.raises(ValueError, match="unique"):
        run_all(ThreadExecutor(), twice, lambda key: False, print)
    orphan = [Work("a", "a", Mark(tmp_path, "a")), Work("b", "b", Mark(tmp_path, "b"), after="c")]
    with pytest.raises(ValueError, match=r"come after keys that are not among them: \['c'\]"):
        run_all(ThreadExecutor(), orphan, lambda key: False, print)


def test_one_local_job_runs_each_item_here_in_turn_and_its_error_comes_up_as_it_is(tmp_path):
    order: list[str] = []

    def item(key: str, fail: bool = False):
        def call() -> None:
            order.append(key)
            if fail:
                raise ValueError(f"{key}: a config error")

        return call

    with LocalExecutor(1) as executor:
        outcome = run_all(executor, [Work("x", "x", item("x")), Work("y", "y", item("y"), after="x")], lambda k: False)
    assert order == ["x", "y"] and outcome.succeeded == ["x", "y"]
    with LocalExecutor(1) as executor, pytest.raises(ValueError, match="x: a config error"):
        run_all(executor, [Work("x", "x", item("x", fail=True))], lambda k: False)


def _sleep_then_exit(seconds: float, code: int) -> None:
    time.sleep(seconds)
    if code:
        raise SystemExit(code)


def _fail() -> None:
    raise ValueError("a value  on\ntwo lines")


@pytest.mark.slow
def test_local_processes_report_a_clean_end_a_failure_in_one_line_and_a_kill(tmp_path, capfd):
    items = [
        Work("ok", "fine", _Call(_sleep_then_exit, 0.0, 0)),
        Work("bad", "broken", _Call(_fail)),
        Work("killed", "doomed", _Call(_sleep_then_exit, 60.0, 0)),
    ]
    with LocalExecutor(3, log=lambda line: None) as executor:
        handles = executor.submit(items)
        pid = int(handles["killed"].split()[1])
        deadline = time.monotonic() + 60
        ended: dict[str, Ended] = {}
        while len(ended) < 2 and time.monotonic() < deadline:
            executor.pause()
            ended.update({e.key: e for e in executor.poll()[1]})
        os.kill(pid, signal.SIGKILL)
        while len(ended) < 3 and time.monotonic() < deadline:
            executor.pause()
            ended.update({e.key: e for e in executor.poll()[1]})
    assert ended["ok"].ok and ended["ok"].state == "COMPLETED"
    assert not ended["bad"].ok and ended["bad"].state == "FAILED (exit 1)"
    assert not ended["killed"].ok and ended["killed"].state == "killed by signal 9"
    out = capfd.readouterr().out
    assert "[broken] error: a value on two lines\n" in out and "Traceback" not in out, out


class _Call:
    """A picklable call of a module-level function with arguments (what a spawned process can be handed)."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __call__(self) -> None:
        self.function(*self.args)


STUDY = """
import signal, sys
from untrainable.config import DataSpec, ModelSpec, RunConfig, TrainSpec
from untrainable.executor import StudyFailed
from untrainable.experiment import Arm, Experiment, run_experiment

def config(width):
    return RunConfig(
        model=ModelSpec("fcn", {{"depth": 2, "width": width}}),
        data=DataSpec("mnist1d", {{"num_samples": 400, "val_size": 50}}, batch_size=10),
        train=TrainSpec(epochs={epochs}, progress=False, checkpoint_every=20),
    )

if __name__ == "__main__":
    arms = [Arm("a", config(16)), Arm("b", config({width_b}))]
    try:
        run_experiment(Experiment("two", "", arms, seeds=(0,)), sys.argv[1], jobs=2, log=lambda line: print(line, flush=True))
    except KeyboardInterrupt as stop:
        print(f"stopped: {{stop}}", flush=True)
        sys.exit(128 + getattr(stop, "signum", signal.SIGINT))
    except StudyFailed as failed:
        print(f"failed: {{failed}}", flush=True)
        sys.exit(2)
"""


def _study(tmp_path: Path, epochs: int, width_b: object) -> Path:
    script = tmp_path / "study.py"
    script.write_text(STUDY.format(epochs=epochs, width_b=width_b))
    return script


@pytest.mark.slow
def test_sigterm_stops_every_local_process_after_a_checkpoint_and_the_same_command_resumes_them(tmp_path):
    import json
    import subprocess
    import sys

    script, out = _study(tmp_path, epochs=4, width_b=16), tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runner = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, env=env)
    checkpoints = [out / arm / "seed0" / "checkpoints" for arm in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all(list(folder.glob("step-*.pt")) for folder in checkpoints):
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()[0]
        time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)
    printed = runner.communicate(timeout=120)[0]
    assert runner.returncode == 143 and "stopped: stopped by signal 15" in printed, printed
    stopped = [folder.parent for folder in checkpoints if not (folder.parent / "result.json").exists()]
    assert stopped, "SIGTERM came after both runs ended"  # both, unless one was much faster than the other
    again = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    for folder in checkpoints:
        records = [json.loads(line) for line in (folder.parent / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "kind" not in r]
        total = json.loads((folder.parent / "result.json").read_text())["steps"]
        assert steps == list(range(1, total + 1)), "each step logged once"
        assert any(r.get("kind") == "resume" for r in records) == (folder.parent in stopped)


@pytest.mark.slow
def test_a_local_run_that_fails_is_one_line_and_a_failed_row_once_the_other_has_ended(tmp_path):
    import subprocess
    import sys

    script = _study(tmp_path, epochs=1, width_b='"wide"')  # b's width is not a number: its run fails when built
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("[b seed 0] error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "failed: 1 run(s) of" in done.stdout and "b seed 0: FAILED (exit 1)" in done.stdout
    assert (tmp_path / "out" / "a" / "seed0" / "result.json").exists()  # the other run went on to its end
