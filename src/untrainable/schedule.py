"""How the guidance weight alpha changes over training steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "first_steps", "linear", "cosine")


@dataclass(frozen=True)
class AlphaSchedule:
    """alpha as a function of the training step.

    - `constant`: alpha at every step.
    - `first_steps`: alpha for the first `steps` steps, then 0 ("guidance as
      initialisation": the guide is disconnected after that).
    - `linear` / `cosine`: decay from alpha to 0 over `steps` steps, 0 after.
    """

    alpha: float = 1.0
    kind: str = "constant"
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind {self.kind!r} is not one of {', '.join(SCHEDULES)}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.kind != "constant" and (self.steps is None or self.steps < 1):
            raise ValueError(f"schedule {self.kind!r} needs steps >= 1, got {self.steps}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.alpha
        assert self.steps is not None
        if step >= self.steps:
            return 0.0
        if self.kind == "first_steps":
            return self.alpha
        progress = step / self.steps
        if self.kind == "linear":
            return self.alpha * (1.0 - progress)
        return self.alpha * 0.5 * (1.0 + math.cos(math.pi * progress))
