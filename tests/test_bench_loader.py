"""The loader measurement (`python -m untrainable.bench.loader`) runs end to end on a tiny tree."""

import json

import numpy as np
import pytest
from PIL import Image

from untrainable.bench.loader import main, photo, workers_needed
from untrainable.bench.store_loader import cores_needed
from untrainable.bench.store_loader import main as store_main


def test_photo_has_the_size_asked_and_is_not_flat():
    image = photo(0, 50, 30)
    assert image.size == (50, 30) and image.mode == "RGB"
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 100


def test_workers_needed_rounds_up():
    assert workers_needed(250.0, [3000, 10000, 100]) == {"3000": 12, "10000": 40, "100": 1}


@pytest.mark.slow
def test_the_measurement_writes_its_numbers_and_command(tmp_path):
    main(
        ["--tree", str(tmp_path / "tree"), "--out", str(tmp_path / "out")]
        + "--images 80 --large-images 8 --classes 2 --batches 2 --repeats 1".split()
    )
    record = json.loads((tmp_path / "out" / "loader.json").read_text())
    assert record["command"].startswith("python -m untrainable.bench.loader")
    assert record["index"]["files"] == 80 and {"header_cold_s", "decode_cached_s"} <= set(record["index"])
    assert {(r["batches"], r["workers"], r["draft"]) for r in record["throughput"]} >= {
        ("train", 1, False),
        ("eval", 0, False),
    }
    assert all(r["images_per_s"] > 0 for r in record["throughput"])
    assert "| verify |" in (tmp_path / "out" / "loader.md").read_text()
    with Image.open(next((tmp_path / "tree" / "large").rglob("*.JPEG"))) as image:
        assert image.size in ((1600, 1200), (1200, 1600)) and image.format == "JPEG"


def test_cores_needed_are_the_workers_a_step_takes_plus_the_trainer():
    needed = cores_needed({"store": {"per_worker": 1000.0}})
    resnet = needed["paper-resnet18 (ResNet-18 alone)"]["store"]
    assert resnet == {"images_per_s": 16410, "workers": 17, "cores": 18}


@pytest.mark.slow
def test_the_store_measurement_writes_its_ratios_and_command(tmp_path):
    store_main(
        ["--tree", str(tmp_path / "tree"), "--out", str(tmp_path / "out")]
        + "--images 64 --classes 2 --batches 1 --repeats 1 --no-litdata".split()
    )
    record = json.loads((tmp_path / "out" / "store.json").read_text())
    assert record["command"].startswith("python -m untrainable.bench.store_loader")
    assert record["store_to_jpeg_ratio_per_worker"] > 0 and record["store_to_jpeg_ratio_per_core"] > 0
    assert set(record["rates"]) == {"jpeg_folder", "image_store"} and record["checks"]["store_equals_folder"]
    assert "| image_store |" in (tmp_path / "out" / "store.md").read_text()
