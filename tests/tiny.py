"""The suite's smallest run config: FCN depth 2 width 32, 600 MNIST-1D samples, 5 steps."""

from __future__ import annotations

from untrainable.config import RunConfig, from_dict


def tiny_config(**train) -> RunConfig:
    """A run of 5 steps on 600 MNIST-1D samples; `train` overrides fields of the train section."""
    return from_dict(
        RunConfig,
        {
            "name": "tiny",
            "model": {"name": "fcn", "args": {"depth": 2, "width": 32}},
            "data": {"name": "mnist1d", "args": {"num_samples": 600, "val_size": 60}, "batch_size": 50},
            "train": {"epochs": 1, "max_steps": 5, "progress": False, **train},
        },
    )


# A guided twin of the same size as a TOML file (`untrainable tune` reads files); EPOCHS is replaced by the caller.
TINY_GUIDED_TOML = """
name = "tiny-guided"
[model]
name = "fcn"
args = { depth = 2, width = 32, batch_norm = true, dropout = 0.0 }
[data]
name = "mnist1d"
args = { num_samples = 600, val_size = 100, seed = 42 }
batch_size = 64
train_eval_size = 50
[guide]
name = "cnn1d"
args = { channels = 8, depth = 2, kernel = 5 }
[guidance]
target_layers = ["layers.*.linear"]
guide_layers = ["blocks.*.conv"]
[optim]
lr = 1e-3
[train]
epochs = EPOCHS
progress = false
"""
