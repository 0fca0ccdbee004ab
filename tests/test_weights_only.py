"""Checkpoints are data: a file that would run code when unpickled is refused before anything in it runs."""

import hashlib
import pickle

import pytest

from untrainable.checkpoint import CheckpointError, load_checkpoint, load_weights
from untrainable.cli import main

MODEL = '[model]\nname = "fcn"\nargs = { depth = 2, width = 16 }\n'
DATA = '[data]\nname = "mnist1d"\nargs = { num_samples = 400, val_size = 50 }\nbatch_size = 64\n'
TRAIN = "[train]\nepochs = 1\nmax_steps = 2\nprogress = false\n"


class Evil:
    """Unpickling calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_checkpoint(path, marker):
    """A file with the tool's own header and a valid sha256 of a payload that runs code."""
    payload = pickle.dumps({"model": Evil(marker)})
    path.write_bytes(b"UNTRAINABLE-CKPT-1\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    return path


def test_a_checkpoint_that_runs_code_is_refused_by_path_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    assert pickle.loads(pickle.dumps(Evil(marker))) and marker.exists()  # the payload does run when unpickled
    marker.unlink()
    path = evil_checkpoint(tmp_path / "evil.pt", marker)
    for load in (load_checkpoint, load_weights):
        with pytest.raises(CheckpointError, match="evil.pt holds objects other than weights"):
            load(path)
    assert not marker.exists()


def test_the_cli_refuses_it_as_a_guide_in_one_line_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = evil_checkpoint(tmp_path / "evil.pt", marker)
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + f'[guide]\nname = "cnn1d"\ncheckpoint = "{path}"\n' + TRAIN)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "evil.pt" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["layers", "fcn", "cnn1d", "--guide-checkpoint", str(path)]) == 2
    assert "evil.pt" in capsys.readouterr().err
    assert not marker.exists()
