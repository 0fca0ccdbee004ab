"""A run's step records: metrics.jsonl and the trackers (rank 0), and progress lines for log files."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from untrainable.checkpoint import temporary_files, write_atomic

if TYPE_CHECKING:
    from untrainable.config import RunConfig
    from untrainable.trackers import MetricLogger


class MetricsLog:
    """Rank-0 sinks for step records: `metrics.jsonl` (one JSON object per line, always) and the config's trackers.

    Resuming from step `resume_step` drops the records written after it
    (those steps run again), rewriting the file atomically. A torn last line, which a killed process
    leaves, is set aside in `metrics.jsonl.torn` and reported, not fatal.
    The trackers (`logging.loggers`: TensorBoard, MLflow, W&B) get each record's numbers under the
    same names and step; their run ids go into meta.json, so that a resume continues their runs. A
    tracker that fails (a locked store, a full disk, a network error) is reported in one warning line
    and left out for the rest of the run: training goes on and metrics.jsonl stays complete.
    """

    def __init__(self, folder: Path, enabled: bool, resume_step: int | None, config: RunConfig | None = None) -> None:
        self.enabled, self.closed = enabled, False
        self.path = folder / "metrics.jsonl"
        self.trackers: dict[str, MetricLogger] = {}
        if not enabled:
            return
        for leftover in temporary_files(self.path):  # of a rewrite killed before its rename
            leftover.unlink(missing_ok=True)
        kept: list[tuple[str, dict[str, Any]]] = []
        if resume_step is not None and self.path.exists():
            kept = [(line, record) for line, record in _records(self.path) if record.get("step", 0) <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line, _ in kept))  # a kill leaves the old log whole
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # an empty log (a run with records is refused before this)
        self.file = open(self.path, "a")
        if config is not None:
            self._open_trackers(config, folder, resume_step)
            self._catch_up([record for _, record in kept])

    def _open_trackers(self, config: RunConfig, folder: Path, resume_step: int | None) -> None:
        from untrainable.trackers import open_trackers, run_params, tracker_ids

        meta_path = folder / "meta.json"
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        except (OSError, ValueError):
            meta = {}
        for name, tracker in open_trackers(config, folder, resume_step, meta.get("trackers") or {}).items():
            if isinstance(tracker, Exception):
                self._fault(name, tracker, "could not start")
            else:
                self.trackers[name] = tracker
        ids = tracker_ids(self.trackers)
        if ids and isinstance(meta, dict):
            write_atomic(meta_path, json.dumps({**meta, "trackers": ids}, indent=2) + "\n")
        self._each("log_config", run_params(config))

    def _catch_up(self, records: list[dict[str, Any]]) -> None:
        """Send a resumed run's earlier records to the trackers that lack them (those that say which steps they hold).

        A killed process may not have handed its last records to a tracker (W&B's
        service writes its file behind the run); the tracker skips what it holds.
        """
        behind = {name: tracker for name, tracker in self.trackers.items() if hasattr(tracker, "done")}
        for name, tracker in behind.items():
            try:
                for record in records:
                    payload = tracker_payload(record, record.get("kind", "train"))
                    if payload:
                        tracker.log_dict(payload, int(record["step"]))
            except Exception as err:  # noqa: BLE001
                del self.trackers[name]
                self._fault(name, err, "failed")

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        payload = tracker_payload(record, prefix)
        if payload and self.trackers:
            self._each("log_dict", payload, int(record["step"]))

    def close(self, final: dict[str, Any] | None = None) -> None:
        """Close every sink; `final` (result.json's values) is logged first as `result/...`, the runs marked finished."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        self.file.close()
        if final is not None:
            from untrainable.trackers import flatten

            values = {f"result/{k}": v for k, v in flatten(final, "/").items() if _is_number(v)}
            self._each("log_dict", values, int(final.get("steps", 0)))
        self._each("close", final is not None)

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001  (whatever a tracker raises, training goes on)
                del self.trackers[name]
                self._fault(name, err, "failed")

    @staticmethod
    def _fault(name: str, err: BaseException, what: str) -> None:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        if isinstance(err, ImportError):
            reason += "; install it: pip install mlflow-skinny wandb"
        print(
            f"warning: the {name} tracker {what} ({type(err).__name__}: {reason}); "
            "it is left out of this run, training goes on and metrics.jsonl stays complete",
            file=sys.stderr,
            flush=True,
        )


def tracker_payload(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """A metrics.jsonl record's numbers as trackers get them: the same names, bar `step` (their x axis) and `kind`.

    Step and epoch records keep their keys (an epoch record's `epoch`, the count of finished
    epochs, is left out: the step records carry `epoch`); other records' keys get their kind as a prefix.
    """
    skip = ("step", "kind", "epoch") if prefix == "epoch" else ("step", "kind")
    names = (lambda k: k) if prefix in ("train", "epoch") else (lambda k: f"{prefix}/{k}")
    return {names(k): float(v) for k, v in record.items() if k not in skip and _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The lines of a metrics.jsonl with their records; a torn last line goes to `NAME.torn`.

    Raises:
        ValueError: a line other than the last does not parse (the file was
            edited or damaged otherwise); it names the file and the line.
    """
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise json.JSONDecodeError("not a JSON object", line, 0)
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(
                    f"{path} line {number} is not a JSON record ({err.msg}); repair or remove that line, then --resume"
                ) from None
            torn = path.with_name(path.name + ".torn")
            with open(torn, "a") as f:
                f.write(line + "\n")
            warnings.warn(f"{path}: its last line was cut off (a killed write); set aside in {torn.name}", stacklevel=3)
            break
        parsed.append((line, record))
    return parsed


class ProgressLines:
    """One line per epoch, and one every `every_s` seconds inside long epochs, for logs that are not a terminal.

    A progress bar shows nothing useful in a file (a cluster job, nohup, CI);
    these lines name the step, the losses, alpha, the accuracies and the step rate.
    """

    def __init__(
        self,
        name: str,
        total_steps: int,
        enabled: bool,
        start_step: int = 0,
        every_s: float = 60.0,
        stream: TextIO | None = None,
    ) -> None:
        self.name, self.total_steps, self.every_s = name, total_steps, every_s
        self.enabled = enabled
        self.stream = stream
        self.last_time, self.last_step = time.monotonic(), start_step

    def step(self, record: dict[str, Any]) -> None:
        """Called after every step; prints when `every_s` seconds have passed since the last line."""
        if self.enabled and time.monotonic() - self.last_time >= self.every_s:
            self._print(record, {})

    def epoch(self, record: dict[str, Any], entry: dict[str, Any], epochs: int) -> None:
        """Called at the end of an epoch with the last step's record and the epoch's history entry."""
        if self.enabled:
            accuracies = {k: v for k, v in entry.items() if k.endswith(("_accuracy", "_loss")) and k != "train_loss"}
            self._print(record, {"epoch": f"{entry['epoch']}/{epochs}", **accuracies})

    def _print(self, record: dict[str, Any], extra: dict[str, Any]) -> None:
        now, step = time.monotonic(), int(record["step"])
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9) if step > self.last_step else None
        self.last_time, self.last_step = now, step
        cells = [f"step {step}/{self.total_steps}"] + [f"{k} {v}" for k, v in extra.items() if k == "epoch"]
        for key in ("loss", "task_loss", "guidance_loss", "alpha"):
            if isinstance(record.get(key), (int, float)):
                cells.append(f"{key} {record[key]:.4g}")
        cells += [f"{k} {v:.4f}" for k, v in extra.items() if k != "epoch" and isinstance(v, (int, float))]
        if rate is not None:
            cells.append(f"{rate:.1f} steps/s")
        print(f"{self.name}: " + ", ".join(cells), file=self.stream or sys.stderr, flush=True)
