"""Kill -9 and resume, corrupted checkpoints, NaN and inf: a run never silently goes wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from untrainable.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, load_weights
from untrainable.config import RunConfig, from_dict
from untrainable.data.registry import DataSplits
from untrainable.trainer import NonFiniteError, TrainingInterrupted, train

CONFIG = {
    "name": "crash",
    "model": {"name": "fcn", "args": {"depth": 3, "width": 128, "batch_norm": True, "dropout": 0.1}},
    "data": {
        "name": "mnist1d",
        "args": {"num_samples": 2000, "val_size": 100, "seed": 42},
        "batch_size": 16,
        "train_eval_size": 50,
    },
    "guide": {"name": "cnn1d", "args": {"channels": 8, "depth": 2, "kernel": 5}, "seed": 1000},
    "guidance": {"target_layers": ["layers.*.linear"], "guide_layers": ["blocks.*.conv"]},
    "train": {"epochs": 2, "seed": 0, "progress": False, "checkpoint_every": 7},
}


def _start(config_path: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    command = [sys.executable, "-m", "untrainable", "train", "--config", str(config_path), "--out", str(out)]
    return subprocess.Popen(
        command + (["--resume"] if resume else []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _last_step(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _wait(run: subprocess.Popen, folder: Path, past_step: int | None = None, stall_s: float = 600.0) -> None:
    """Wait until `run` logs a step after `past_step`, or (without one) exits with 0.

    No deadline on the wait as a whole: a slow or busy machine only takes
    longer. The test fails when the run exits early or with an error, or as a
    hang guard, when its logged step has not moved for `stall_s` seconds.
    """
    last, moved = -1, time.monotonic()
    while True:
        step = _last_step(folder)
        if past_step is not None and step > past_step:
            return
        code = run.poll()
        if code is not None:
            errors = run.stderr.read().decode()
            assert past_step is None, f"the run exited ({code}) at step {step}, before step {past_step + 1}: {errors}"
            assert code == 0, errors
            return
        if step != last:
            last, moved = step, time.monotonic()
        assert time.monotonic() - moved < stall_s, (
            f"the run did not progress: still at step {step} after {stall_s:.0f} s"
        )
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path):
    config_path = tmp_path / "crash.json"
    config_path.write_text(json.dumps(CONFIG))
    reference = _start(config_path, tmp_path / "reference")
    killed_run = _start(config_path, tmp_path / "killed")
    _wait(killed_run, tmp_path / "killed", past_step=30)  # two checkpoints written, mid first epoch (~112 steps)
    os.kill(killed_run.pid, signal.SIGKILL)
    killed_run.wait()
    assert not (tmp_path / "killed" / "model.pt").exists()
    assert CheckpointManager(tmp_path / "killed" / "checkpoints").paths()
    resumed = _start(config_path, tmp_path / "killed", resume=True)
    _wait(resumed, tmp_path / "killed")
    _wait(reference, tmp_path / "reference")
    expected = load_weights(tmp_path / "reference" / "model.pt")
    got = load_weights(tmp_path / "killed" / "model.pt")
    for name, value in expected.items():
        assert torch.allclose(got[name].float(), value.float(), atol=1e-6, rtol=0), name
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "kind" not in r]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats or skips steps after the resume"
    assert [r for r in records if r.get("kind") == "resume"], "the second run continued from a checkpoint"


def _small_config(**train: object) -> RunConfig:
    data = dict(CONFIG, train={**CONFIG["train"], "epochs": 1, **train})
    data["data"] = dict(CONFIG["data"], args={"num_samples": 400, "val_size": 40, "seed": 42})
    data["model"] = {"name": "fcn", "args": {"depth": 2, "width": 16, "batch_norm": False}}
    return from_dict(RunConfig, data)


def test_corrupted_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    train(_small_config(max_steps=10, checkpoint_every=3), tmp_path)
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    older, newest = manager.paths()
    assert [p.name for p in manager.paths()] == [older.name, newest.name]  # only the last 2 are kept
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        state, path = manager.load_latest()
    assert path == older and state["step"] == 9
    assert manager.paths() == [older] and newest.with_name(newest.name + ".corrupt").exists()
    # A flipped byte is caught by the checksum too.
    data = bytearray(older.read_bytes())
    data[-10] ^= 0xFF
    older.write_bytes(bytes(data))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint"):
        manager.load_latest()


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path):
    config = _small_config(max_steps=9, checkpoint_every=3)
    train(config, tmp_path)
    newest = CheckpointManager(tmp_path / "checkpoints").paths()[-1]
    newest.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        result = train(_small_config(max_steps=12, checkpoint_every=3), tmp_path, resume=True)
    assert result.final["steps"] == 12


def test_resume_with_no_loadable_checkpoint_refuses_every_time_and_keeps_the_logs(tmp_path):
    train(_small_config(max_steps=6, checkpoint_every=3), tmp_path)
    for path in CheckpointManager(tmp_path / "checkpoints").paths():
        path.write_bytes(b"garbage")
    metrics = (tmp_path / "metrics.jsonl").read_text()
    for _ in range(2):  # the first attempt sets the files aside as *.corrupt; the second must still refuse
        with (
            warnings.catch_warnings(),
            pytest.raises(CheckpointError, match="no checkpoint that loads|no checkpoint in"),
        ):
            warnings.simplefilter("ignore")
            train(_small_config(max_steps=9, checkpoint_every=3), tmp_path, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_leftover_temporary_checkpoint_files_are_removed(tmp_path):
    train(_small_config(max_steps=3, checkpoint_every=3), tmp_path)
    leftover = tmp_path / "checkpoints" / ".step-000000006.pt.tmp-12345"
    leftover.write_bytes(b"half written")
    train(_small_config(max_steps=6, checkpoint_every=3), tmp_path, resume=True)
    assert not leftover.exists()


def test_a_killed_write_of_model_pt_leaves_nothing_behind_at_the_next_start(tmp_path):
    ours = [tmp_path / ".model.pt.tmp-4242", tmp_path / "checkpoints" / ".step-000000003.pt.tmp-77"]
    ours += [tmp_path / ".history.json.tmp-1", tmp_path / ".meta.json.tmp-9"]  # written atomically as well
    others = [tmp_path / ".model.pt.tmp-notes", tmp_path / "model.pt.tmp-4242", tmp_path / ".notes.json.tmp-1"]
    for path in ours + others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    train(_small_config(max_steps=3, checkpoint_every=3), tmp_path)
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in others)  # only the temporary names our atomic writes use
    (tmp_path / ".model.pt.tmp-4243").write_bytes(b"half written")
    train(_small_config(max_steps=6, checkpoint_every=3), tmp_path, resume=True)
    assert not (tmp_path / ".model.pt.tmp-4243").exists()


def _splits(x_train: torch.Tensor) -> DataSplits:
    y = torch.zeros(len(x_train), dtype=torch.long)
    test = TensorDataset(torch.randn(8, 40), torch.zeros(8, dtype=torch.long))
    return DataSplits(TensorDataset(x_train, y), test, test, (40,), 10)


def test_nan_input_stops_the_run_naming_step_and_term(tmp_path):
    x = torch.randn(64, 40)
    x[37, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step \d+: input is not finite"):
        train(_small_config(checkpoint_every=1), tmp_path, data=_splits(x))
    for path in CheckpointManager(tmp_path / "checkpoints").paths():  # the last good ones stay loadable
        assert torch.isfinite(load_checkpoint(path)["model"]["head.weight"]).all()


def test_inf_loss_stops_the_run_naming_the_term(tmp_path):
    x = torch.full((64, 40), 3e38)  # finite inputs whose forward overflows
    with pytest.raises(NonFiniteError, match=r"step 1: (task_loss|guidance_loss)\b.* is not finite"):
        train(_small_config(), tmp_path, data=_splits(x))


class _SignalAt(torch.utils.data.Dataset):
    """A data set that sends this process `signum` when example number `at` is fetched."""

    def __init__(self, base, at: int, signum: int):
        self.base, self.at, self.signum, self.fetched = base, at, signum, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched == self.at:
            os.kill(os.getpid(), self.signum)
        return self.base[i]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_writes_a_checkpoint_of_the_last_step_then_resume_finishes(tmp_path, signum):
    x = torch.randn(64, 40)
    splits = _splits(x)
    splits.train = _SignalAt(splits.train, at=16 + 5, signum=signum)  # while the 2nd batch (of 16) is read
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(_small_config(), tmp_path, data=splits)
    newest = CheckpointManager(tmp_path / "checkpoints").paths()[-1]
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert load_checkpoint(newest)["step"] == logged[-1] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    result = train(_small_config(), tmp_path, resume=True, data=_splits(x))
    assert result.final["steps"] == 4  # one epoch of 64 / 16


def test_the_finite_check_reads_a_finite_batch_once_and_still_finds_every_non_finite_value(monkeypatch):
    from untrainable import distributed, step

    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    big = torch.randn(64, 1000)
    elementwise = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda v: elementwise.append(v.numel()) or isfinite(v))
    step.check_finite(1, info, input=big)
    assert max(elementwise) == 1, "a finite batch needs only its sum checked, not every element"
    monkeypatch.setattr(torch, "isfinite", isfinite)
    step.check_finite(1, info, input=torch.full((64, 40), 3e38))  # finite, though its sum overflows
    step.check_finite(1, info, input=torch.full((8,), 60000.0, dtype=torch.float16))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[5, 7] = bad
        with pytest.raises(NonFiniteError, match="input is not finite"):
            step.check_finite(1, info, input=x)
    x = big.clone()
    x[0, 0], x[1, 1] = float("inf"), -float("inf")  # their sum is NaN, still not finite
    with pytest.raises(NonFiniteError):
        step.check_finite(1, info, input=x)
