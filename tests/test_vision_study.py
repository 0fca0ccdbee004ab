"""The vision study: its analysis functions on hand-made cases, its arms, and `untrainable run vision --quick`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from untrainable.analysis import error_consistency_summary, layer_names, similarity_matrix
from untrainable.models import create_model
from untrainable.similarity import get_similarity


def _write_run(folder, predictions):
    folder.mkdir(parents=True)
    np.save(folder / "test_predictions.npy", np.asarray(predictions, dtype=np.int64))
    return folder


def test_error_consistency_summary_hand_example(tmp_path):
    # Labels all 0; a prediction of 0 is right, 1 is wrong.
    labels = np.zeros(10, dtype=np.int64)
    a = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]  # right on 7 of 10
    b = [0, 0, 0, 0, 0, 1, 1, 0, 1, 1]  # right on 6 of 10
    # Seed 0: c_obs = 7/10 (both right on 5, both wrong on 2),
    # c_exp = 0.7 * 0.6 + 0.3 * 0.4 = 0.54, kappa = 0.16 / 0.46.
    # Seed 1: the two make the same errors, kappa = 1.
    runs = {
        "a": [_write_run(tmp_path / "a0", a), _write_run(tmp_path / "a1", a)],
        "b": [_write_run(tmp_path / "b0", b), _write_run(tmp_path / "b1", a)],
    }
    summary = error_consistency_summary(runs, labels)
    kappa0 = 0.16 / 0.46
    assert summary["names"] == ["a", "b"]
    assert summary["seeds"] == 2
    assert summary["per_seed"][0][0][1] == pytest.approx(kappa0)
    assert summary["per_seed"][1][0][1] == pytest.approx(1.0)
    assert summary["mean"][0][1] == pytest.approx((kappa0 + 1.0) / 2)
    assert summary["mean"][1][0] == pytest.approx((kappa0 + 1.0) / 2)
    assert summary["std"][0][1] == pytest.approx((1.0 - kappa0) / math.sqrt(2))
    assert summary["mean"][0][0] == summary["mean"][1][1] == 1.0
    assert summary["accuracy"] == {"a": pytest.approx(0.7), "b": pytest.approx(0.65)}
    json.dumps(summary)  # written as JSON by the study


def test_error_consistency_summary_rejects_bad_input(tmp_path):
    labels = np.zeros(4, dtype=np.int64)
    one = _write_run(tmp_path / "one", [0, 0, 1, 1])
    with pytest.raises(ValueError, match="same, non-zero number of runs"):
        error_consistency_summary({"a": [one], "b": [one, one]}, labels)
    with pytest.raises(ValueError, match="do not match labels"):
        error_consistency_summary({"a": [one]}, np.zeros(5, dtype=np.int64))
    with pytest.raises(FileNotFoundError, match="test_predictions.npy"):
        error_consistency_summary({"a": [tmp_path / "missing"]}, labels)


def test_similarity_matrix_shape_guide_by_target():
    torch.manual_seed(0)
    target = create_model("deep_fcn", input_shape=(1, 28, 28), depth=5, width=32)
    guide = create_model("resnet18", input_shape=(1, 28, 28), width=4)
    x = torch.randn(40, 1, 28, 28)
    matrix = similarity_matrix(target, guide, x, ["layers.*.linear"], ["layer*.*"])
    assert matrix.shape == (8, 5)  # 8 ResNet-18 blocks by 5 FCN layers
    assert np.all((matrix >= -1e-9) & (matrix <= 1 + 1e-9))
    assert layer_names(guide, ["layer*.*"])[0] == "layer1.0"
    # The models are left as they were: training mode, no hooks.
    assert target.training and guide.training
    assert not any(m._forward_hooks for m in target.modules())


def test_similarity_matrix_model_against_itself_is_one_on_matched_layers():
    torch.manual_seed(0)
    model = create_model("deep_fcn", input_shape=(1, 28, 28), depth=4, width=32)
    x = torch.randn(50, 1, 28, 28)
    layers = ["layers.*.act"]
    matrix = similarity_matrix(model, model, x, layers, layers)
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-9)


def test_similarity_matrix_cka_shortcut_matches_the_similarity_function():
    torch.manual_seed(0)
    target = create_model("deep_fcn", input_shape=(1, 28, 28), depth=3, width=16)
    guide = create_model("vit_tiny", input_shape=(1, 28, 28), dim=16, depth=2, heads=2)
    x = torch.randn(30, 1, 28, 28)
    fast = similarity_matrix(target, guide, x, ["layers.*.linear"], ["blocks.*"], similarity="cka")
    slow = similarity_matrix(target, guide, x, ["layers.*.linear"], ["blocks.*"], similarity=get_similarity("cka"))
    np.testing.assert_allclose(fast, slow, atol=1e-6)


def test_vision_study_has_the_issues_arms():
    import untrainable.recipes  # noqa: F401  (registration)
    from untrainable.experiment import EXPERIMENTS

    fcn, convnet = EXPERIMENTS.create("vision", quick=False)
    arms = {arm.name: arm for arm in fcn.arms}
    assert {
        "resnet18", "vit", "deep-fcn", "deep-fcn+untrained-resnet18", "deep-fcn+trained-resnet18",
        "deep-fcn+trained-resnet18-first150", "deep-fcn+trained-vit",
        "wide-fcn", "wide-fcn+trained-resnet18", "wide-fcn+untrained-resnet18",
    } == set(arms)  # fmt: skip
    assert arms["deep-fcn+trained-resnet18"].guide_from == "resnet18"
    assert arms["deep-fcn+trained-vit"].guide_from == "vit"
    assert arms["deep-fcn+untrained-resnet18"].guide_from is None
    first = arms["deep-fcn+trained-resnet18-first150"].config.guidance
    assert (first.schedule, first.steps) == ("first_steps", 150)
    assert {arm.name for arm in convnet.arms} == {
        "resnet50",
        "plain34",
        "plain34+trained-resnet50",
        "plain34+untrained-resnet50",
    }
    assert len(fcn.seeds) >= 3 and len(convnet.seeds) >= 3
    assert fcn.after is not None and convnet.after is not None


@pytest.mark.slow
def test_run_vision_quick_writes_tables(tmp_path, capsys):
    from untrainable.cli import main

    assert main(["run", "vision", "--quick", "--out", str(tmp_path)]) == 0
    fcn, convnet = tmp_path / "vision-fcn-quick", tmp_path / "vision-convnet-quick"
    for folder in (fcn, convnet):
        assert (folder / "table.md").exists()
        table = json.loads((folder / "table.json").read_text())
        assert table["rows"] and all(math.isfinite(row["test_accuracy"][0]) for row in table["rows"])
        for name in ("curves.png", "loss_curves.png", "layer_similarity_start.png", "layer_similarity_end.png"):
            assert (folder / name).stat().st_size > 0
    consistency = json.loads((fcn / "error_consistency.json").read_text())
    assert consistency["names"] == ["deep-fcn", "deep-fcn+trained-resnet18", "deep-fcn+trained-vit", "resnet18", "vit"]
    assert np.allclose(np.diag(consistency["mean"]), 1.0)
    assert (fcn / "deep-fcn" / "seed0" / "test_predictions.npy").exists()
    assert "vision-convnet-quick" in capsys.readouterr().out


@pytest.mark.slow
def test_canvas_study_sets_the_wide_fcn_on_a_larger_image(tmp_path):
    from untrainable.experiment import run_experiment
    from untrainable.recipes import vision

    experiment = vision.canvas_experiment(quick=True)
    arms = {arm.name: arm for arm in experiment.arms}
    assert list(arms) == ["resnet18", "wide-fcn", "wide-fcn+trained-resnet18", "wide-fcn+untrained-resnet18"]
    assert arms["wide-fcn+trained-resnet18"].guide_from == "resnet18" and experiment.baseline == "wide-fcn"
    assert {arm.config.data.args["canvas"] for arm in arms.values()} == {vision.CANVAS}
    table = run_experiment(experiment, tmp_path, log=lambda _: None)
    config = json.loads((tmp_path / "wide-fcn" / "seed0" / "config.json").read_text())
    assert config["data"]["args"]["canvas"] == vision.CANVAS
    from untrainable.checkpoint import load_weights

    weights = load_weights(tmp_path / "wide-fcn" / "seed0" / "model.pt")
    first = next(v for k, v in weights.items() if k.endswith("linear.weight"))
    assert first.shape[1] == vision.CANVAS * vision.CANVAS  # the FCN sees the whole canvas
    assert all(row["per_seed_best"][0] is not None for row in table["rows"])
