"""Guidance inside PyTorch Lightning: a LightningModule that owns a target and a `Guidance` toward a frozen guide.

    python examples/lightning_guidance.py --max-steps 200 --accelerator cpu --devices 1
    python examples/lightning_guidance.py --max-steps 200 --accelerator cpu --devices 2 --strategy ddp

The whole integration is three lines of `training_step`: run `self.guidance(x)`,
add `out.guidance_loss` to the task loss, log. Under Lightning's DDP the CKA is
computed on the global batch: `gather_for_similarity` all-gathers through the
default `torch.distributed` group, the one Lightning initialises, and is the
identity in a single process. DDP wraps this LightningModule, not the target,
so the forward hooks Guidance put on the target fire as they would unwrapped.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from untrainable import Guidance
from untrainable.data import load_data
from untrainable.distributed import gather_for_similarity
from untrainable.models import create_model


class GuidedClassifier(L.LightningModule):
    """An MNIST-1D classifier (the target) trained on its task plus guidance toward a frozen guide."""

    def __init__(self, alpha: float = 1.0, lr: float = 1e-3, depth: int = 4, width: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        target = create_model("fcn", input_shape=(40,), depth=depth, width=width)
        # An untrained guide pulls too (the paper's point); for a trained one,
        # guide.load_state_dict(torch.load(PATH, weights_only=True)) here.
        guide = create_model("cnn1d", input_shape=(40,), channels=16, batch_norm=True)
        # Guidance freezes the guide (eval, no gradients, no_grad) and keeps it
        # in eval whatever Lightning's .train() calls do.
        self.guidance = Guidance(target, guide, alpha=alpha, gather=gather_for_similarity)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> dict[str, Any]:
        x, y = batch
        out = self.guidance(x)
        task_loss = F.cross_entropy(out.output, y)
        step = {
            "loss": task_loss + out.guidance_loss,
            "task_loss": task_loss.detach(),
            "guidance_loss": out.guidance_loss.detach(),
            "alpha": out.alpha,
            **{f"similarity/{key}": value for key, value in out.similarities.items()},
        }
        # Task loss is this rank's batch (sync_dist=True averages it over ranks,
        # at a collective per step); guidance loss and similarities are already global.
        self.log_dict({k: v for k, v in step.items() if k != "loss"}, batch_size=len(x))
        self.log("loss", step["loss"].detach(), prog_bar=True, batch_size=len(x))
        return step

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.guidance.target(x)  # the target alone: guidance is a training-time term
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True, batch_size=len(x))
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean(), sync_dist=True, batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The target's parameters only: the guide is never handed to the optimiser.
        return torch.optim.Adam(self.guidance.target.parameters(), lr=self.hparams.lr)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-samples", type=int, default=4000, help="MNIST-1D examples generated")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lightning_logs", help="Lightning's default_root_dir")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """Train the guided classifier as the command line says; the fitted Trainer."""
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    data = load_data("mnist1d", num_samples=args.num_samples)
    model = GuidedClassifier(alpha=args.alpha, lr=args.lr)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        default_root_dir=args.out,
        callbacks=list(callbacks),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    # Lightning shards each loader over DDP processes (a DistributedSampler).
    train = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(data.val, batch_size=256)
    trainer.fit(model, train, val)
    return trainer


if __name__ == "__main__":
    main()
