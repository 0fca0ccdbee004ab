"""The paper-scale configs: full-size models built from shapes alone, a few bf16 steps of each with sizes shrunk.

They name the user's data (`data.args.root` or `path`) and, for trained
guides, the weights of another config's run. Here the data is a tiny
generated ImageNet-style folder of 224 x 224 images or a small text file;
only widths and the batch are shrunk for the steps (ResNet-18 and the depths
stay as shipped); the guide configs are trained first and their model.pt
passed on, as the headers say.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode

from untrainable.bench.paper_estimates import OpCost, estimate, format_table, paper_config
from untrainable.build import build_guidance, build_model
from untrainable.checkpoint import load_weights
from untrainable.config import ConfigError, RunConfig, load_config
from untrainable.trainer import train

CONFIG_DIR = Path(str(resources.files("untrainable") / "configs"))
GUIDE_RUNS = {"paper_resnet18": ["paper_deep_fcn_trained", "paper_wide_fcn"], "paper_resnet50": ["paper_plain50"]}
GUIDE_RUNS["paper_transformer_lm"] = ["paper_rnn_lm"]
TRAINED = {name: guide for guide, names in GUIDE_RUNS.items() for name in names}
PAPER = ["paper_deep_fcn", *GUIDE_RUNS, *TRAINED]
TEXT = ("paper_transformer_lm", "paper_rnn_lm")

# Widths shrunk for the steps on a CPU, by model name; everything else stays as shipped.
SHRUNK = {
    "deep_fcn": {"first_width": 64, "width": 32},
    "wide_fcn": {"width": 64},
    "resnet50": {"width": 16},
    "plain50": {"width": 16},
    "causal_transformer": {"dim": 32, "heads": 4},
    "rnn": {"embed_dim": 16, "hidden": 32},
}


def test_the_paper_configs_are_shipped():
    # paper_deep_fcn_torchvision needs torchvision (no CPU build here): tests/test_imported_models.py reads it.
    assert sorted(path.stem for path in CONFIG_DIR.glob("paper_*.toml")) == sorted(
        [*PAPER, "paper_deep_fcn_torchvision"]
    )


@pytest.mark.parametrize("name", PAPER)
def test_header_gives_the_command_the_placeholder_and_torchrun(name):
    header = "\n".join(line for line in (CONFIG_DIR / f"{name}.toml").read_text().splitlines() if line.startswith("#"))
    key = "data.args.path" if name in TEXT else "data.args.root"
    assert f"untrainable train --config src/untrainable/configs/{name}.toml" in header
    assert f"--set {key}=" in header, "the header says how to give the data"
    assert "torchrun" in header and '"Paper-scale runs"' in header


@pytest.mark.parametrize("name", PAPER)
def test_paper_training_settings(name):
    config = paper_config(name)
    assert (config.data.batch_size, config.optim.name, config.optim.lr, config.train.epochs) == (64, "adam", 1e-3, 10)
    assert config.train.precision == "bf16" and config.optim.fused
    assert config.guidance.cache == "none", "augmented or not, nothing per rank is kept on disk"
    if name not in TEXT:
        assert config.data.name == "image_folder" and config.data.args["image_size"] == 224
        assert config.data.num_workers > 0


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_guide_is_the_guide_configs_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ folder here: the guide has not been trained
    with pytest.raises(ConfigError, match="guide.checkpoint"):
        load_config(CONFIG_DIR / f"{name}.toml")
    config, guide_run = paper_config(name), paper_config(TRAINED[name])
    raw = (CONFIG_DIR / f"{name}.toml").read_text()
    checkpoint = re.search(r'^checkpoint = "(.+)"', raw, flags=re.M).group(1)
    out = re.search(r"--out (\S+)", (CONFIG_DIR / f"{TRAINED[name]}.toml").read_text()).group(1)
    assert checkpoint == f"{out}/model.pt", "the guide's run writes the file this config reads"
    assert (config.guide.name, config.guide.args) == (guide_run.model.name, guide_run.model.args)
    # The loader's workers follow each config's step time; the data itself is the same.
    same_loader = dataclasses.replace(config.data, num_workers=guide_run.data.num_workers)
    assert same_loader == guide_run.data, "the guide learns the same data (and, for text, the same vocabulary)"


def _fake_models(config: RunConfig, data_shape: tuple[int, ...], classes: int):
    from untrainable.data import DataSplits

    data = DataSplits([], [], [], input_shape=data_shape, num_classes=classes, meta={"vocab_size": classes})
    with FakeTensorMode():
        target = build_model(config.model, data, seed=0)
        guide = build_model(config.guide, data, seed=1) if config.guide else None
        guidance = build_guidance(config, target, guide) if guide is not None else None
    return target, guide, guidance


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _linear(n_in: int, n_out: int, norm: bool = True) -> int:
    return n_in * n_out + n_out + (2 * n_out if norm else 0)


PIXELS = 3 * 224 * 224
RESNET18, RESNET50 = 11_689_512, 25_557_032  # torchvision's counts for the same layers (ResNet-50 v1.5)
# Plain-50 lacks the four projection shortcuts (1x1 conv and BatchNorm) of ResNet-50.
PLAIN50 = RESNET50 - sum(i * o + 2 * o for i, o in [(64, 256), (256, 512), (512, 1024), (1024, 2048)])
DEEP_FCN = _linear(PIXELS, 2048) + _linear(2048, 1024) + 46 * _linear(1024, 1024) + _linear(1024, 1000, False)
WIDE_FCN = _linear(PIXELS, 8192) + 2 * _linear(8192, 8192) + _linear(8192, 1000, False)
VOCAB = 256
TRANSFORMER = VOCAB * 512 + 256 * 512 + 6 * (12 * 512 * 512 + 13 * 512) + 2 * 512 + _linear(512, VOCAB, False)
RNN = VOCAB * 512 + (512 + 1024) * 1024 + 2 * 2 * 1024 * 1024 + 3 * 2 * 1024 + _linear(1024, VOCAB, False)
FULL_SIZE = {  # target params, guide params, guidance pairs (one per guide layer)
    "paper_resnet18": (RESNET18, 0, 0),
    "paper_deep_fcn": (DEEP_FCN, RESNET18, 8),
    "paper_deep_fcn_trained": (DEEP_FCN, RESNET18, 8),
    "paper_wide_fcn": (WIDE_FCN, RESNET18, 8),
    "paper_resnet50": (RESNET50, 0, 0),
    "paper_plain50": (PLAIN50, RESNET50, 16),
    "paper_transformer_lm": (TRANSFORMER, 0, 0),
    "paper_rnn_lm": (RNN, TRANSFORMER, 6),
}


@pytest.mark.parametrize("name", PAPER)
def test_full_size_models_are_built_from_shapes(name):
    """Each config's models at full size, as fake tensors (no memory): parameter counts and pairs by hand."""
    config = paper_config(name)
    shape = (256,) if name in TEXT else (3, 224, 224)
    target, guide, guidance = _fake_models(config, shape, VOCAB if name in TEXT else 1000)
    counts = (_count(target), _count(guide) if guide else 0, len(guidance.pairs) if guidance else 0)
    assert counts == FULL_SIZE[name]


def test_op_cost_counts_a_matrix_product():
    a, b = torch.randn(64, 300), torch.randn(300, 200)
    with OpCost() as cost:
        a @ b
        a.relu_()
    flops, moved = 2 * 64 * 300 * 200, 4 * (64 * 300 + 300 * 200 + 64 * 200)
    assert cost.ops == [(flops, moved), (0, 2 * 4 * 64 * 300)], "in place: read and written once each"
    assert cost.seconds(1e12, 1e9) == pytest.approx((moved + 2 * 4 * 64 * 300) / 1e9), "bound by memory"
    assert cost.seconds(1e6, 1e15) == pytest.approx(flops / 1e6), "bound by compute"


@pytest.fixture(scope="module")
def deep_fcn_estimate():
    return estimate(paper_config("paper_deep_fcn"))


def test_estimate_of_the_deep_fcn_counts_its_products(deep_fcn_estimate):
    """Linear layers: 2 n d_in d_out FLOPs forward, twice that back, but no input gradient for the first."""
    e = deep_fcn_estimate
    widths = [PIXELS, 2048] + [1024] * 47 + [1000]
    forward = sum(2 * 64 * a * b for a, b in zip(widths[:-1], widths[1:]))
    assert e.gflops["target"] * 1e9 == pytest.approx(3 * forward - 2 * 64 * PIXELS * 2048)
    assert e.gflops["guide"] == pytest.approx(2 * 64 * 1.814, rel=0.01)  # ResNet-18: 1.81 G multiply-adds an image
    assert e.gib["states"] == pytest.approx((16 * DEEP_FCN + 4 * RESNET18) / 2**30, rel=0.01)
    assert 0 < e.gib["kept"] < e.gib["states"]
    assert 0 < e.total_seconds("A100 SXM") and e.total_seconds("H100 SXM") < e.total_seconds("A100 SXM")
    assert "paper-deep-fcn-untrained-resnet18" in format_table([e])


def test_docs_show_what_the_estimates_command_prints(deep_fcn_estimate):
    page = (Path(__file__).resolve().parents[1] / "docs" / "paper-scale.md").read_text()
    section = page.split("## Paper-scale runs\n")[1].split("\n## ")[0]
    assert "python -m untrainable.bench.paper_estimates" in section and "**Estimated**" in section
    assert format_table([deep_fcn_estimate]).splitlines()[-1] in section
    assert all(f"{name}.toml" in section for name in PAPER)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """ImageNet's layout: train/<class>/ (6 images each) beside val/<class>/ (2 each), 224 x 224 PNGs."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for label in ("n01440764", "n01443537"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}_{i}.png")
    return root


@pytest.fixture(scope="module")
def text_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "guide", "pulls", "on", "a", "network", "that", "would", "not", "train", "alone"]
    text = " ".join(rng.choice(words, 2400)) + "\n"
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def shrunk(name: str, image_root: Path, text_path: Path, **overrides) -> RunConfig:
    """The shipped config with the test's data, a batch of 4, shrunk widths, and the given dotted overrides."""
    config = paper_config(name)
    data_key = ("data.args.path", str(text_path)) if name in TEXT else ("data.args.root", str(image_root))
    changes = {
        data_key[0]: data_key[1],
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.train_eval_size": 8,
        "train.max_steps": 2,
        "train.progress": False,
        "train.device": "cpu",
        **{f"model.args.{k}": v for k, v in SHRUNK.get(config.model.name, {}).items()},
    }
    if config.guide is not None:
        changes.update({f"guide.args.{k}": v for k, v in SHRUNK.get(config.guide.name, {}).items()})
        changes["guide.checkpoint"] = None
    changes.update(overrides)
    return load_config(CONFIG_DIR / f"{name}.toml", changes)


def steps_run(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "kind" not in r]


@pytest.fixture(scope="module")
def trained_guides(image_root, text_path, tmp_path_factory) -> dict[str, Path]:
    """A few steps of each guide config, shrunk like the targets that use it: its model.pt by config name."""
    weights = {}
    for name in GUIDE_RUNS:
        out = tmp_path_factory.mktemp(name)
        train(shrunk(name, image_root, text_path), out)
        weights[name] = out / "model.pt"
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GUIDE_RUNS))
def test_guide_configs_train_in_bf16(name, trained_guides):
    out = trained_guides[name].parent
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and all(math.isfinite(r["loss"]) for r in steps_run(out))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper_deep_fcn", *TRAINED])
def test_guided_configs_run_a_few_bf16_steps(name, image_root, text_path, trained_guides, tmp_path):
    overrides = {"guide.checkpoint": str(trained_guides[TRAINED[name]])} if name in TRAINED else {}
    config = shrunk(name, image_root, text_path, **overrides)
    assert config.train.precision == "bf16"
    result = train(config, tmp_path / "run")
    assert result.final["steps"] == 2
    records = steps_run(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    pairs = FULL_SIZE[name][2]
    assert all(math.isfinite(r["loss"]) and 0 < r["guidance_loss"] <= pairs for r in records), "1 - CKA per pair"
    if name in TRAINED:
        from untrainable.build import build_data

        guide = build_model(config.guide, build_data(config.data), seed=0)
        saved = load_weights(trained_guides[TRAINED[name]])
        assert all(torch.equal(value, saved[key]) for key, value in guide.state_dict().items())


@pytest.mark.slow
def test_deep_fcn_under_torchrun_in_bf16(image_root, tmp_path):
    """Two processes (gloo), the shipped config given only the data, a worker each and shrunk widths on the command line."""
    sets = {"data.args.root": str(image_root), "data.batch_size": 4, "data.num_workers": 1, "data.train_eval_size": 8}
    sets.update({"train.max_steps": 2, "train.progress": "false", "model.args.first_width": 64, "model.args.width": 32})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "untrainable"]
    command += ["train", "--config", str(CONFIG_DIR / "paper_deep_fcn.toml"), "--out", "run"]
    command += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    # This checkout's package, whichever one is installed.
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["precision"] == "bf16" and saved["guide"]["args"] == {"width": 64, "stem": "imagenet"}
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 2
    assert [r["step"] for r in steps_run(tmp_path / "run")] == [1, 2], "one record per step: only rank 0 writes"


def test_shrunk_configs_change_only_sizes_and_the_run(image_root, text_path):
    """What the steps above change: the data's location, the batch, widths and how long and where it runs."""
    for name in PAPER:
        shipped, small = dataclasses.asdict(paper_config(name)), dataclasses.asdict(shrunk(name, image_root, text_path))
        for section in ("guidance", "optim", "distill", "name"):
            assert small[section] == shipped[section], (name, section)
        assert small["train"]["precision"] == shipped["train"]["precision"] == "bf16"
        for part in ("model", "guide"):
            if shipped[part] is not None:
                assert set(small[part]["args"].items()) - set(shipped[part]["args"].items()) <= {
                    (k, v) for k, v in SHRUNK.get(shipped[part]["name"], {}).items()
                }
