"""Every shipped config loads, validates, says how to run it, and names layers its models have."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from untrainable.build import build_guidance, build_guides, build_model
from untrainable.capture import resolve_layers
from untrainable.config import RunConfig, load_config, shipped_config
from untrainable.data import load_data

CONFIG_DIR = Path(str(resources.files("untrainable") / "configs"))
CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))
# The paper-scale configs name the user's data and guide weights and build models of up to 1.3 billion
# parameters: tests/test_paper_configs.py loads, builds and runs them with those supplied and sizes shrunk.
# Search spaces and enqueued points for `untrainable tune` (space_*.toml, enqueue_*.toml) are no run configs:
# tests/test_tune.py and tests/test_tune_search.py check them.
RUNNABLE = [path for path in CONFIGS if not path.name.startswith(("paper_", "space_", "enqueue_"))]


def test_configs_are_shipped():
    names = {path.name for path in CONFIGS}
    assert "mnist1d.toml" in names
    assert {"vision_deep_fcn.toml", "vision_deep_fcn_vit.toml", "vision_wide_fcn.toml", "vision_convnet.toml"} <= names


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.validate() is config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_header_gives_the_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("untrainable " in line and path.name in line for line in header), (
        f"{path.name}: no run command in its header"
    )


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_config_layers_exist(path):
    config = load_config(path)
    data = load_data(config.data.name, **config.data.args)
    target = build_model(config.model, data, seed=0)
    assert resolve_layers(target, config.guidance.target_layers)
    if config.guide is not None:
        guide = build_model(config.guide, data, seed=0)
        assert resolve_layers(guide, config.guidance.guide_layers)
    if config.guides:  # each entry's layers and pairs, checked by the builder that names the entry
        guidance = build_guidance(config, target, build_guides(config, data))
        assert [g.name for g in guidance.guides] == [spec.label for spec in config.guides if spec.pulls]


def test_a_config_with_two_guides_is_shipped():
    assert any(load_config(path).guides for path in RUNNABLE)


def test_a_field_missing_from_a_saved_config_counts_as_its_default():
    from untrainable.config import config_differences

    config = shipped_config("rescue_deep_fcn")
    saved = json.loads(json.dumps(config.to_dict()))
    del saved["guidance"]["alpha_max"]  # a file written before the field existed
    assert config_differences(saved, config) == []
    changed = config.with_section("guidance", alpha_max=5.0)
    assert config_differences(saved, changed) == ["guidance.alpha_max"]
    saved["guidance"]["alpha"] = 3.0
    assert config_differences(saved, config) == ["guidance.alpha"]


def _guided(**guidance) -> RunConfig:
    from untrainable.config import from_dict

    return from_dict(
        RunConfig,
        {
            "model": {"name": "fcn", "args": {"depth": 2, "width": 8}},
            "data": {"name": "mnist1d", "args": {"num_samples": 200, "val_size": 20}},
            "guide": {"name": "fcn", "args": {"depth": 2, "width": 8}},
            "guidance": guidance,
        },
    )


def test_gram_dtype_from_the_config_reaches_guidance():
    import torch

    from untrainable.build import build_guidance
    from untrainable.models import create_model

    def guidance_of(config):
        target, guide = (create_model("fcn", input_shape=(40,), depth=2, width=8) for _ in range(2))
        return build_guidance(config, target, guide)

    assert guidance_of(_guided(gram_dtype="bfloat16")).gram_dtype == torch.bfloat16
    assert guidance_of(_guided()).gram_dtype in (None, torch.float32)  # the default: float32 products
    with pytest.raises(ValueError, match=r"guidance.gram_dtype: 'float16' is not one of float32, bfloat16"):
        _guided(gram_dtype="float16")


def test_a_field_missing_from_an_older_config_json_is_its_default():
    import json

    from untrainable.config import config_differences

    saved = json.loads(json.dumps(_guided().to_dict()))
    del saved["guidance"]["gram_dtype"]  # written before the field existed
    assert config_differences(saved, _guided()) == []
    assert config_differences(saved, _guided(gram_dtype="bfloat16")) == ["guidance.gram_dtype"]


def test_the_shipped_hand_grid_lies_in_the_shipped_rescue_spaces():
    """Every point of enqueue_rescue_grid.toml is a trial of its arm's space (none dropped, none refused)."""
    from untrainable.compare import unguided
    from untrainable.space import enqueued_points, load_points, load_space

    guided = load_config(CONFIG_DIR / "rescue_deep_fcn.toml", {"optim.fused": False})
    space = load_space(CONFIG_DIR / "space_rescue.toml")
    full = space.with_extra(load_space(CONFIG_DIR / "space_rescue_guided.toml"))
    points = load_points(CONFIG_DIR / "enqueue_rescue_grid.toml")
    for arm, config, arm_space in (("alone", unguided(guided), space), ("guided", guided, full)):
        mine = [p for _, p in points if p.get("arm", arm) == arm]
        trials = enqueued_points(config, arm_space, points, arm)
        assert len(trials) >= len(mine) >= 1, arm  # the config's own values first, then every point of the arm
