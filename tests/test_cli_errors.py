"""User errors reach the command line as one line on stderr (exit 2); --debug shows the traceback."""

import warnings

import pytest
import torch

from untrainable.checkpoint import save_checkpoint
from untrainable.cli import main
from untrainable.models import create_model

MODEL = '[model]\nname = "fcn"\nargs = { depth = 2, width = 16 }\n'
DATA = '[data]\nname = "mnist1d"\nargs = { num_samples = 400, val_size = 50 }\nbatch_size = 64\n'
TRAIN = "[train]\nepochs = 1\nmax_steps = 2\nprogress = false\n"


def _error(capsys, *argv: str) -> str:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_malformed_toml_and_json_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model\nname = "fcn"\n')
    assert "bad.toml" in _error(capsys, "--config", str(bad))
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    assert "bad.json" in _error(capsys, "--config", str(bad))


def test_unknown_model_or_data_argument_names_its_field_and_the_accepted_ones(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(MODEL.replace("depth", "depthh") + DATA + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "a"))
    assert "model.args.depthh" in err and "depth" in err.split("accepted")[1]
    config.write_text(MODEL + DATA.replace("num_samples", "num_sample") + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "b"))
    assert "data.args.num_sample" in err and "num_samples" in err


def test_guide_checkpoint_that_is_not_a_checkpoint(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + f'[guide]\nname = "fcn"\ncheckpoint = "{garbage}"\n' + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "run"))
    assert "guide.checkpoint" in err and "garbage.pt" in err and "weights_only" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_guide_checkpoint_of_another_architecture(tmp_path, capsys):
    cnn = create_model("cnn1d", input_shape=(40,), num_classes=10, channels=4)
    ours = tmp_path / "model.pt"
    save_checkpoint({"model": cnn.state_dict(), "config": {"model": {"name": "cnn1d"}}}, ours)
    plain = tmp_path / "plain.pt"
    torch.save(cnn.state_dict(), plain)
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + f'[guide]\nname = "fcn"\ncheckpoint = "{ours}"\n' + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "a"))
    assert "guide.checkpoint" in err and "'cnn1d'" in err
    config.write_text(MODEL + DATA + f'[guide]\nname = "fcn"\ncheckpoint = "{plain}"\n' + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "b"))
    assert "guide.checkpoint" in err and "plain.pt" in err and "missing keys" in err


def test_resume_with_a_different_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + TRAIN)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    capsys.readouterr()
    err = _error(capsys, "--config", str(config), "--out", str(out), "--resume", "--set", "optim.lr=0.5")
    assert "optim.lr" in err


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ValueError):
        main(["--debug", "train", "--config", str(bad)])
    with pytest.raises(ValueError):
        main(["train", "--config", str(bad), "--debug"])
    monkeypatch.setenv("UNTRAINABLE_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["train", "--config", str(bad)])


def test_only_rank_zero_prints(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_binary_file_for_text_data_is_one_clear_line(tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[model]\nname = "rnn"\n[data]\nname = "text_file"\nargs = {{ path = "{binary}" }}\n[train]\ntask = "lm"\n'
    )
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "run"))
    assert "weights.bin" in err and "not UTF-8 text" in err


def test_a_repeated_pair_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "run.toml"
    pairs = '[guidance]\npairs = [["layers.0.linear", "blocks.0.conv"], ["layers.0.linear", "blocks.0.conv", 2.0]]\n'
    config.write_text(MODEL + DATA + '[guide]\nname = "cnn1d"\n' + pairs + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "run"))
    assert "guidance.pairs[1]" in err and "given twice" in err


def test_malformed_override_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + TRAIN)
    assert "KEY=VALUE" in _error(capsys, "--config", str(config), "--set", "train.epochs")


def test_input_shape_that_does_not_fit_the_data_is_one_line_before_training(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(MODEL.replace("width = 16", "width = 16, input_shape = [30]") + DATA + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "a"))
    assert "model.args" in err and "(40,)" in err and "(30,)" in err, err
    assert not (tmp_path / "a" / "config.json").exists()  # refused before the run folder is written
    config.write_text(MODEL + DATA + '[guide]\nname = "fcn"\nargs = { input_shape = [30] }\n' + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "b"))
    assert "guide.args" in err and "(40,)" in err, err


def test_a_layer_that_does_not_run_is_one_line(tmp_path, capsys, monkeypatch):
    from untrainable.models.fcn import FCN

    def skip_second_block(self, x):
        return self.head(self.layers[0](x.flatten(1)))

    monkeypatch.setattr(FCN, "forward", skip_second_block)
    config = tmp_path / "run.toml"
    layers = '[guidance]\ntarget_layers = ["layers.1.linear"]\nguide_layers = ["layers.0.linear"]\n'
    config.write_text(MODEL + DATA + '[guide]\nname = "fcn"\n' + layers + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "run"))
    assert "layers.1.linear" in err and "did not run" in err, err


@pytest.mark.parametrize("flag", ["--data-args", "--target-args", "--guide-args"])
def test_bad_json_in_a_layers_flag_names_the_flag(capsys, flag):
    assert main(["layers", "fcn", "fcn", flag, "{depth: 2}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert flag in err and "JSON object" in err, err
    assert main(["layers", "fcn", "fcn", flag, "[2]"]) == 2
    assert flag in capsys.readouterr().err


def _warn_then_fail(error: Exception):
    def command(args):
        warnings.warn("an unreadable image skipped", stacklevel=2)
        raise error

    return command


def test_warnings_print_on_rank_zero_only(capsys, monkeypatch):
    import untrainable.cli

    monkeypatch.setattr(untrainable.cli, "cmd_list", _warn_then_fail(OSError("disk gone")))
    with pytest.warns(UserWarning, match="unreadable image"):
        assert main(["list"]) == 2
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["list"]) == 2
    assert not seen, [str(w.message) for w in seen]


def test_an_error_of_another_rank_alone_prints_there_with_its_rank(capsys, monkeypatch):
    import untrainable.cli
    from untrainable.config import ConfigError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(untrainable.cli, "cmd_list", _warn_then_fail(OSError("disk gone")))
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 1" in err and "disk gone" in err, err
    # A config error is the same on every rank: rank 0 prints it.
    monkeypatch.setattr(untrainable.cli, "cmd_list", _warn_then_fail(ConfigError("model.args: bad")))
    assert main(["list"]) == 2
    assert capsys.readouterr().err == ""


def test_an_argument_of_the_wrong_type_names_its_field_value_and_type(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(MODEL.replace("depth = 2", 'depth = "two"') + DATA + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "a"))
    assert "model.args.depth" in err and "'two'" in err and "int" in err, err
    assert "accepted" in err and "width" in err.split("accepted")[1], err
    config.write_text(MODEL + DATA.replace("val_size = 50", "val_size = [50]") + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "b"))
    assert "data.args.val_size" in err and "[50]" in err and "int" in err, err
    config.write_text(MODEL.replace("width = 16", 'width = 16, input_shape = ["forty"]') + DATA + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "c"))
    assert "model.args.input_shape" in err and "tuple[int, ...]" in err, err


def test_arguments_of_the_right_type_pass_the_check():
    from pathlib import Path

    from untrainable.build import check_args

    def builder(depth: int, rate: float = 0.1, shape: tuple[int, ...] = (3,), root: str = ".", flag: bool = True):
        return None

    check_args("model", builder, {"depth": 2, "rate": 1, "shape": [1, 2], "root": Path("x"), "flag": False})
    with pytest.raises(ValueError, match=r"model.args.flag: 1 is not bool"):
        check_args("model", builder, {"flag": 1})
    with pytest.raises(ValueError, match=r"model.args.depth: True is not int"):
        check_args("model", builder, {"depth": True})


def test_layers_on_a_batch_too_small_for_the_similarity_is_refused_with_the_minimum(capsys):
    assert main(["layers", "fcn", "cnn1d", "--data-args", '{"num_samples": 200, "val_size": 20}', "--batch", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 3" in err and "1.0000" not in err, err


def test_an_empty_out_or_an_out_that_is_a_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + TRAIN)
    monkeypatch.chdir(tmp_path)  # an ignored --out '' would train into runs/NAME here
    err = _error(capsys, "--config", str(config), "--out", "")
    assert "--out is empty" in err and not (tmp_path / "runs").exists()
    file = tmp_path / "a-file"
    file.write_text("x")
    for out in (file, file / "below"):
        err = _error(capsys, "--config", str(config), "--out", str(out))
        assert f"{file} is a file, not a folder" in err and "Errno" not in err
    assert main(["run", "mnist1d", "--quick", "--out", str(file)]) == 2
    assert f"{file} is a file, not a folder" in capsys.readouterr().err


def test_an_error_in_a_set_value_names_the_set_flag_not_the_config_file(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "a"), "--set", "train.epochs=-1")
    assert err.startswith("untrainable train: error: --set train.epochs=-1: train.epochs:") and "run.toml" not in err
    err = _error(capsys, "--config", str(config), "--set", "train.epochs.x=1")
    assert "--set train.epochs.x:" in err and "run.toml" not in err


def test_too_few_mnist1d_samples_name_the_argument(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(MODEL + DATA + TRAIN)
    err = _error(capsys, "--config", str(config), "--out", str(tmp_path / "a"), "--set", "data.args.num_samples=0")
    assert "data.args: num_samples must be an integer >= 10" in err and "stack" not in err


def test_layers_errors_name_flags_that_exist(tmp_path, capsys):
    argv = ["layers", "fcn", "fcn", "--batch", "8"]
    assert main([*argv, "--guide-args", '{"nope": 1}']) == 2
    err = capsys.readouterr().err
    assert "--guide-args nope: not an argument of fcn" in err and "--guide.args" not in err
    missing = tmp_path / "missing.pt"
    assert main([*argv, "--guide-checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--guide-checkpoint: {missing} does not exist" in err and "FileNotFoundError" not in err


def test_bench_out_naming_a_file_is_refused_before_the_benchmark_runs(tmp_path, capsys, monkeypatch):
    import untrainable.bench

    def no_bench(**kwargs):
        raise AssertionError("the benchmark ran before --out was checked")

    monkeypatch.setattr(untrainable.bench, "run_bench", no_bench)
    file = tmp_path / "results"
    file.write_text("x")
    assert main(["bench", "--quick", "--out", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"{file} is a file, not a folder" in err and err.count("\n") == 1
