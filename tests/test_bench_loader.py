"""The loader measurement (`python -m untrainable.bench.loader`) runs end to end on a tiny tree."""

import json

import numpy as np
import pytest
from PIL import Image

from untrainable.bench.loader import main, photo, workers_needed


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
        + "--images 80 --large-images 48 --classes 2 --batches 2 --repeats 1".split()
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
