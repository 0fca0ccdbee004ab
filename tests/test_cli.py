"""The command line: list, run (quick MNIST-1D study), train, layers, errors, help."""

import json

import pytest

from untrainable.cli import main


def test_help_of_every_command(capsys):
    for command in ([], ["list"], ["run"], ["train"], ["layers"], ["tune"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
    assert "untrainable" in capsys.readouterr().out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mnist1d" in out and "deep_fcn" in out and "cka_unbiased" in out


def test_layers_prints_pairs_with_shapes_and_similarity(capsys):
    assert main(["layers", "fcn", "cnn1d", "--target-args", '{"depth": 6, "width": 32}', "--batch", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["target", "layer"]
    assert len(lines) == 1 + 3 + 2  # one row per guide layer, then a blank line and the measure's metadata
    assert "layers.0.linear" in lines[1] and "blocks.0.conv" in lines[1] and "(64, 32)" in lines[1]
    assert 0.0 <= float(lines[1].split()[-1]) <= 1.0
    assert lines[-1].startswith("cka: range [0, 1]; invariant to translation, rotation, isotropic scale")


def test_layers_wrong_name_lists_valid_ones(capsys):
    assert main(["layers", "fcn", "cnn1d", "--guide-layers", "blocks.7.conv"]) == 2
    assert "valid layers" in capsys.readouterr().err


def test_bad_config_value_names_field_and_allowed_values(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[model]\nname = "fcn"\n[data]\nname = "mnist1d"\n[optim]\nname = "adm"\n')
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "optim.name" in err and "adam, adamw, sgd" in err
    config.write_text('[model]\nname = "fcn"\n[data]\nname = "mnist1d"\nbatch_sise = 3\n')
    assert main(["train", "--config", str(config)]) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_train_from_config_with_overrides(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\nname = "fcn"\nargs = { depth = 2, width = 16 }\n'
        '[data]\nname = "mnist1d"\nargs = { num_samples = 400, val_size = 50 }\nbatch_size = 64\n'
        '[guide]\nname = "cnn1d"\nargs = { channels = 4 }\n'
        "[train]\nepochs = 1\nprogress = false\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--set", "optim.lr=0.01"]) == 0
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.01
    assert "test" in json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_run_mnist1d_quick_writes_its_table(tmp_path, capsys, monkeypatch):
    from untrainable.recipes import mnist1d

    # The command's whole path (arms, seeds, trained guide, table, curves) on less data for fewer epochs.
    monkeypatch.setattr(
        mnist1d,
        "_quick",
        lambda config: config.with_args("data", num_samples=600, val_size=100)
        .with_args("model", width=32)
        .with_section("train", epochs=3),
    )
    assert main(["run", "mnist1d", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fcn+trained-cnn" in out and "test accuracy" in out
    table = json.loads((tmp_path / "table.json").read_text())
    assert [row["arm"] for row in table["rows"]][:2] == ["cnn-guide", "fcn"]
    assert all(row["seeds"] == 3 for row in table["rows"])
    assert (tmp_path / "table.md").exists() and (tmp_path / "curves.png").stat().st_size > 10_000
