"""`untrainable bench` refuses a device or thread count it cannot use: one line on stderr, exit 2, before any work."""

import pytest
import torch

from untrainable.cli import main


def _error(capsys, monkeypatch, *argv: str) -> str:
    """Run `untrainable bench ARGV`, which must fail before measuring anything; returns its one-line stderr."""

    def no_work(*args, **kwargs):
        raise AssertionError("the bench started measuring before its options were checked")

    monkeypatch.setattr("untrainable.bench.run._run", no_work)
    threads = torch.get_num_threads()
    assert main(["bench", *argv]) == 2
    assert torch.get_num_threads() == threads
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("untrainable bench: error: "), err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_to_use_the_cpu(capsys, monkeypatch, device):
    err = _error(capsys, monkeypatch, "--quick", "--device", device)
    assert f"--device {device}:" in err and "no CUDA" in err and torch.__version__ in err
    assert "--device cpu" in err


def test_cuda_index_past_the_devices_names_the_ones_there(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _error(capsys, monkeypatch, "--quick", "--device", "cuda:3")
    assert "--device cuda:3:" in err and "1 CUDA device" in err and "cuda:0" in err


def test_unknown_device_lists_the_accepted_ones(capsys, monkeypatch):
    err = _error(capsys, monkeypatch, "--quick", "--device", "gpu")
    assert "--device gpu:" in err and "auto, cpu, cuda or cuda:N" in err


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_below_one_is_refused(capsys, monkeypatch, threads):
    err = _error(capsys, monkeypatch, "--quick", "--device", "cpu", "--threads", threads)
    assert f"--threads {threads}:" in err and "1 or more" in err
