"""Models by import path (`package.module:callable`): built, guided, trained from the CLI, refused clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from untrainable.build import build_data, build_model
from untrainable.cli import main
from untrainable.config import ConfigError, DataSpec, ModelSpec

HERE = Path(__file__).parent
DATA = '[data]\nname = "mnist1d"\nargs = { num_samples = 400, val_size = 50 }\nbatch_size = 50\n'
TRAIN = "[train]\nepochs = 2\nprogress = false\n"


@pytest.fixture(scope="module")
def data():
    return build_data(DataSpec("mnist1d", {"num_samples": 400, "val_size": 50}))


def test_a_torch_constructor_builds_with_its_args_and_the_seed(data):
    spec = ModelSpec("torch.nn:Linear", {"in_features": 40, "out_features": 10})
    a, b = build_model(spec, data, seed=3), build_model(spec, data, seed=3)
    assert isinstance(a, torch.nn.Linear) and a.weight.shape == (10, 40)
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, build_model(spec, data, seed=4).weight)


def test_a_dotted_attribute_after_the_colon(data):
    model = build_model(ModelSpec("importable_models:Factory.small"), data, seed=0)
    assert model[0].out_features == 8


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("no_such_package.models:x", {}, r"model.name: module 'no_such_package.models' does not import"),
        ("torch.nn:NoSuchLayer", {}, r"model.name: 'torch.nn' has no attribute 'NoSuchLayer'"),
        ("torch:float32", {}, r"model.name: 'torch:float32' is a dtype, not a callable"),
        (
            "importable_models:not_a_model",
            {},
            r"model.name: 'importable_models:not_a_model' returned a list, not a torch.nn.Module",
        ),
        ("torch.nn:Linear", {"in_features": 40, "colour": 1}, r"model.args.colour: not an argument of Linear"),
        (
            "torch.nn:Linear",
            {"in_features": 7, "out_features": 10},
            r"model.args: a 'torch.nn:Linear' model does not run on the data",
        ),
    ],
)
def test_import_errors_are_one_clear_error_naming_the_field(data, name, args, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelSpec(name, args), data, seed=0)


@pytest.mark.parametrize("name", ["torch.nn:", ":Linear", "torch nn:Linear", "torch.nn:Lin-ear"])
def test_a_malformed_import_path_is_refused_when_the_config_is_read(name):
    with pytest.raises(ConfigError, match="is not an import path"):
        ModelSpec(name).validate("guide")


def test_weights_load_into_an_imported_model_from_pt_and_safetensors(data, tmp_path):
    from untrainable.checkpoint import save_safetensors

    source = build_model(ModelSpec("importable_models:mlp"), data, seed=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    save_safetensors(source.state_dict(), tmp_path / "w.safetensors")
    for path in ("w.pt", "w.safetensors"):
        model = build_model(ModelSpec("importable_models:mlp", checkpoint=str(tmp_path / path)), data, seed=0)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    wider = ModelSpec("importable_models:mlp", {"width": 16}, checkpoint=str(tmp_path / "w.pt"))
    with pytest.raises(ConfigError, match=r"shapes \(file vs model\): 0.weight \(32, 40\) vs \(16, 40\)"):
        build_model(wider, data, seed=0)


def test_a_config_of_torch_nn_constructors_trains_from_the_cli(tmp_path, capsys, monkeypatch):
    config = tmp_path / "linear.toml"
    model = '[model]\nname = "torch.nn:Linear"\nargs = { in_features = 40, out_features = 10 }\n'
    config.write_text('name = "linear"\n' + model + DATA + "[optim]\nlr = 0.01\n" + TRAIN)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["train_loss"] < 0.95 * history[0]["train_loss"]  # it learns
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["name"] == "torch.nn:Linear"


@pytest.mark.slow
def test_an_imported_target_guided_by_an_imported_guide_in_a_subprocess(tmp_path):
    target = '[model]\nname = "importable_models:mlp"\nargs = { width = 32 }\n'
    guide = '[guide]\nname = "importable_models:mlp"\nargs = { width = 16 }\nseed = 1\n'
    guidance = '[guidance]\ntarget_layers = ["1", "3"]\nguide_layers = ["1", "3"]\n'
    (tmp_path / "run.toml").write_text('name = "imported"\n' + target + DATA + guide + guidance + TRAIN)
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "untrainable", "train", "--config", "run.toml", "--out", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("similarity/3<-3") for r in records for key in r)


def test_the_torchvision_config_names_its_guide_by_import_path_and_says_what_it_needs():
    from importlib import resources

    from untrainable.config import load_config

    path = Path(str(resources.files("untrainable") / "configs" / "paper_deep_fcn_torchvision.toml"))
    config = load_config(path)  # validated without importing torchvision
    assert config.guide.name == "torchvision.models:resnet18"
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "untrainable train --config src/untrainable/configs/paper_deep_fcn_torchvision.toml" in header
    assert "CUDA build of torch with torchvision" in header and "--set guide.checkpoint=" in header


def _config_naming(tmp_path, name):
    config = tmp_path / "user.toml"
    config.write_text(f'name = "user"\n[model]\nname = "{name}"\n' + DATA + TRAIN)
    return ["train", "--config", str(config), "--out", str(tmp_path / "run")]


@pytest.mark.parametrize(
    ("source", "raised"),
    [
        ("import math\nraise RuntimeError('no GPU found at import')\n", "RuntimeError at {file}:2: no GPU found at import"),
        ("def build(:\n    pass\n", "SyntaxError at {file}:1: "),
    ],
    ids=["runtime-error", "syntax-error"],
)
def test_a_module_that_fails_on_import_is_one_line_naming_the_field_and_the_module(
    tmp_path, capsys, monkeypatch, source, raised
):
    module = f"user_module_{len(source)}"  # a name no other test imports
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(_config_naming(tmp_path, f"{module}:build")) == 2
    err = capsys.readouterr().err
    file = tmp_path / f"{module}.py"
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"model.name: importing module '{module}' ({file}) raised " in err
    assert raised.format(file=file) in err and "fix that module" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_bug_inside_the_users_constructor_shows_their_traceback_after_a_line_naming_the_callable(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "user_buggy.py").write_text(
        "from torch import nn\n\n\ndef build(width: int = 8):\n    layers = [nn.Linear(40, width)]\n"
        "    return nn.Sequential(*layers, nn.Linear(width, 10), extra)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(_config_naming(tmp_path, "user_buggy:build")) == 2
    first, *rest = capsys.readouterr().err.splitlines()
    assert first.startswith("untrainable train: error: model.name: 'user_buggy:build' raised NameError inside")
    assert "not in a config value" in first and "model.args" not in first
    traceback_text = "\n".join(rest)
    assert rest[0] == "Traceback (most recent call last):"
    assert f'File "{tmp_path / "user_buggy.py"}", line 6, in build' in traceback_text
    assert rest[-1] == "NameError: name 'extra' is not defined"
    assert "untrainable" not in traceback_text.replace("user_buggy", "")  # their frames only, none of ours


def test_arguments_a_callable_without_a_signature_refuses_still_name_model_args(data):
    with pytest.raises(ConfigError, match=r"^model.args: relu\(\): argument 'input' must be Tensor, not int$"):
        build_model(ModelSpec("torch:relu", {"input": 1}), data, seed=0)


def test_a_changed_resume_of_a_config_read_from_its_run_folder_is_not_told_to_train_that_config(tmp_path, capsys):
    """A run folder's config.json may name code to import: no refusal advises training it as a config file."""
    config = tmp_path / "linear.toml"
    model = '[model]\nname = "torch.nn:Linear"\nargs = { in_features = 40, out_features = 10 }\n'
    config.write_text('name = "linear"\n' + model + DATA + "[train]\nmax_steps = 2\nprogress = false\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run)]) == 0
    capsys.readouterr()
    changed = ["train", "--config", str(run / "config.json"), "--out", str(run), "--resume", "--set", "optim.lr=0.5"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "differs in optim.lr" in err and "train.max_steps, train.progress may change" in err
    assert "config.json or" not in err and "--config" not in err


def test_train_help_says_that_a_config_naming_an_import_path_runs_that_code(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a model named by import path (package.module:callable) runs that code" in text
    docs = " ".join((HERE.parent / "docs" / "models.md").read_text().split())
    assert "A config that names an import path runs that code" in docs and "as Hydra's `_target_` does" in docs
