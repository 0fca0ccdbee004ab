"""Runs examples/lightning_guidance.py with a callback that saves what each rank logged: the DDP test's subprocess.

    python tests/lightning_run.py RECORD_DIR EXAMPLE_ARGS...

Lightning's DDP launcher starts the other ranks by re-running this command line.
"""

import importlib.util
import sys
from pathlib import Path

import lightning as L
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_guidance.py"


def load_example():
    """The example as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lightning_guidance", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder(L.Callback):
    """Keeps each step's logged scalars, the first batch and the weights before the first step and after the last."""

    def __init__(self, out: Path | None = None) -> None:
        self.out, self.steps, self.first = out, [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.first = {"batch": [t.clone() for t in batch], "state": _copy(pl_module.state_dict())}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in outputs.items()})

    def on_train_end(self, trainer, pl_module):
        self.last = _copy(pl_module.state_dict())
        if self.out is not None:
            record = {"steps": self.steps, "first": self.first, "last": self.last}
            torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def _copy(state):
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    load_example().main(sys.argv[2:], callbacks=[Recorder(out)])
