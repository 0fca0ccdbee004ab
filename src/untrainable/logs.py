"""A run's step records: metrics.jsonl and TensorBoard (rank 0), and progress lines for log files."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from untrainable.checkpoint import temporary_files, write_atomic


class MetricsLog:
    """Rank-0 sinks for step records: `metrics.jsonl` (one JSON object per line) and TensorBoard events.

    Resuming from step `resume_step` drops the records written after it
    (those steps run again), rewriting the file atomically. A torn last line, which a killed process
    leaves, is set aside in `metrics.jsonl.torn` and reported, not fatal.
    """

    def __init__(self, folder: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        for leftover in temporary_files(self.path):  # of a rewrite killed before its rename
            leftover.unlink(missing_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line, record in _records(self.path) if record.get("step", 0) <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))  # a kill leaves the old log whole
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # an empty log (a run with records is refused before this)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.file = open(self.path, "a")

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = int(record["step"])
        for key, value in record.items():
            if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


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
