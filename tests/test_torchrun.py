"""`torchrun -m untrainable train` for real: two CPU processes (gloo), rank-0 outputs, resume under DDP."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from untrainable.checkpoint import load_weights

CONFIG = """
[model]
name = "fcn"
args = { depth = 2, width = 32, batch_norm = false }
[data]
name = "mnist1d"
args = { num_samples = 800, val_size = 100 }
batch_size = 40
train_eval_size = 100
[guide]
name = "cnn1d"
args = { channels = 4 }
[guidance]
alpha = 1.0
[optim]
lr = 0.003
[train]
epochs = 2
progress = false
checkpoint_every = 3
"""


def torchrun(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "untrainable",
        "train",
        *args,
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one_unbroken_run(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    torchrun(tmp_path, "--config", "run.toml", "--out", "full")
    full = tmp_path / "full"
    result = json.loads((full / "result.json").read_text())
    # 540 training examples (640 less 100 for validation), 2 ranks x batch 40: 6 steps an epoch.
    assert result["steps"] == 12
    steps = [
        json.loads(line)["step"] for line in (full / "metrics.jsonl").read_text().splitlines() if '"kind"' not in line
    ]
    assert steps == list(range(1, 13)), "one record per step: only rank 0 writes"

    # Stop after 8 steps (in the middle of the second epoch), then resume under torchrun.
    torchrun(tmp_path, "--config", "run.toml", "--out", "resumed", "--set", "train.max_steps=8")
    torchrun(tmp_path, "--config", "run.toml", "--out", "resumed", "--resume")
    resumed = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert resumed["steps"] == 12
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("kind") == "resume"] == [8], "the second run continued from step 8"
    w_full, w_resumed = load_weights(full / "model.pt"), load_weights(tmp_path / "resumed" / "model.pt")
    for key in w_full:
        assert torch.allclose(w_full[key], w_resumed[key], atol=1e-6), key


HANGING_RANK = """
import signal, sys, time
from untrainable import cli, trainer

original = trainer.train_step

def hang_on_rank_1(parts, batch, step, **kwargs):
    if parts.dist_info.rank == 1 and step == 2:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as stuck in native code: torchrun's SIGTERM ends it
        time.sleep(120)  # alive but stuck: rank 0 waits in the gradient all-reduce
    return original(parts, batch, step, **kwargs)

trainer.train_step = hang_on_rank_1
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_hung_rank_stops_the_other_with_one_line_after_the_timeout(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG + "timeout_s = 3\n")
    (tmp_path / "hang.py").write_text(HANGING_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "hang.py"]
    started = time.monotonic()
    done = subprocess.run(
        [*command, "train", "--config", "run.toml", "--out", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 100  # the hang lasts 120 s: the time-out ended it
    lines = [line for line in done.stderr.splitlines() if "did not answer within train.timeout_s" in line]
    assert lines and lines[0].startswith("untrainable train (rank 0): error:"), done.stderr[-3000:]
