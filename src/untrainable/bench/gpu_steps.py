"""What each step of the GPU check is given (`Check`: folder, device, sizes, budgets) and gives back (`StepResult`).

`gpu_check` runs the steps and `gpu_report` writes their summary; both import these from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGETS = {  # seconds on one GPU; the rescue's two arms share theirs (they run at once)
    "environment": 10,
    "gpu-tests": 60,
    "bench": 75,
    "paper-deep-fcn": 35,
    "paper-wide-fcn": 50,
    "paper-plain50": 45,
    "rescue": 195,
}
TINY_BUDGETS = {name: 60 for name in BUDGETS} | {"rescue": 90}  # a guard against hangs; the dry run needs far less


@dataclass
class StepResult:
    """One step's outcome: `status` is ok, failed or skipped; `summary` is its line's key numbers."""

    number: str
    name: str
    status: str
    seconds: float
    budget_s: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"gpu-check {self.number:<3} {self.name:<15} {self.status:<8} {self.seconds:6.1f} s  {self.summary}"


@dataclass
class Check:
    """What every step needs: the output folder, the device, the sizes, the environment of its processes."""

    out: Path
    device: str
    tiny: bool
    threads: int | None
    tests: Path | None
    env: dict[str, str]
    command: str = "python -m untrainable.bench.gpu_check"

    def budget(self, name: str) -> float:
        return (TINY_BUDGETS if self.tiny else BUDGETS)[name]

    def log(self, name: str) -> Path:
        path = self.out / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.out)) if path.is_relative_to(self.out) else str(path)
