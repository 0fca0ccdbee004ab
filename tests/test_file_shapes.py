"""Files that parse but have the wrong shape are refused in one line naming them, before anything uses them."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from untrainable import trainer
from untrainable.checkpoint import load_weights
from untrainable.cli import main
from untrainable.config import RunConfig, from_dict


def _tiny() -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "name": "tiny",
            "model": {"name": "fcn", "args": {"depth": 2, "width": 32}},
            "data": {"name": "mnist1d", "args": {"num_samples": 600, "val_size": 60}, "batch_size": 50},
            "train": {"epochs": 1, "max_steps": 5, "progress": False},
        },
    )


def _one_line(capsys, argv: list[str]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _ours(path: Path, payload: bytes) -> None:
    """A file with the checkpoint header and a valid checksum of `payload`."""
    path.write_bytes(b"UNTRAINABLE-CKPT-1\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


PAYLOADS = {
    "a cut torch zip": lambda: _saved({"model": {"w": torch.zeros(100)}, "step": 5})[:300],
    "a tensor": lambda: _saved(torch.zeros(3)),
    "a model and nothing else": lambda: _saved({"model": {}}),
    "an empty dict": lambda: _saved({}),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run (its one checkpoint at step 5) and its config file."""
    folder = tmp_path_factory.mktemp("shapes")
    trainer.train(_tiny(), folder / "run")
    config = folder / "tiny.json"
    config.write_text(json.dumps(_tiny().to_dict()))
    return folder / "run", config


@pytest.mark.parametrize("case", list(PAYLOADS))
def test_a_checkpoint_with_a_valid_header_and_a_payload_of_the_wrong_shape_is_refused_naming_it(
    finished, tmp_path, capsys, case
):
    source, config = finished
    (checkpoint,) = (source / "checkpoints").glob("step-*.pt")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_bytes((source / "config.json").read_bytes())
    bad = run / "checkpoints" / checkpoint.name
    _ours(bad, PAYLOADS[case]())
    err = _one_line(capsys, ["train", "--config", str(config), "--out", str(run), "--resume"])
    assert str(bad) in err, err


@pytest.mark.parametrize("metadata", ["[1, 2]", '{"model": "x"}', "{not json"])
def test_safetensors_whose_config_metadata_has_the_wrong_shape_is_refused_naming_it(tmp_path, capsys, metadata):
    weights = {"w": torch.zeros(2)}
    path = tmp_path / "guide.safetensors"
    path.write_bytes(safetensors.torch.save(weights, metadata={"untrainable_config": metadata}))
    err = _one_line(capsys, ["layers", "fcn", "fcn", "--guide-checkpoint", str(path), "--batch", "8"])
    assert str(path) in err and "untrainable_config" in err


def test_integer_weights_for_float_parameters_are_refused_naming_the_file_and_tensor(finished, tmp_path, capsys):
    source, _ = finished
    state = {k: v.to(torch.int64) for k, v in load_weights(source / "model.pt").items()}
    path = tmp_path / "ints.safetensors"
    path.write_bytes(safetensors.torch.save(state))
    argv = ["layers", "fcn", "fcn", "--guide-args", '{"depth": 2, "width": 32}', "--batch", "8"]
    err = _one_line(capsys, [*argv, "--guide-checkpoint", str(path), "--data-args", '{"num_samples": 600, "val_size": 60}'])
    assert str(path) in err and "torch.int64 vs torch.float32" in err, err


def test_a_state_dict_holding_other_values_is_refused_naming_the_entry(tmp_path, capsys):
    path = tmp_path / "odd.pt"
    torch.save({"layers.0.linear.weight": [1, 2, 3]}, path)
    err = _one_line(capsys, ["layers", "fcn", "fcn", "--guide-checkpoint", str(path), "--batch", "8"])
    assert str(path) in err and "'layers.0.linear.weight' is a list, not a tensor" in err
