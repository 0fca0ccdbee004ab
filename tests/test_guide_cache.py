"""The guide cache on disk: reopened by a resumed run, and a damaged one named in a warning and rebuilt."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from untrainable.guide_cache import GuideCache

SIZE = 8


def guide(calls):
    """A stand-in guide: (batch, 3) -> two layers' activations, counting the rows it runs on."""

    def run(x):
        calls.append(x.shape[0])
        return {"a": x * 2, "b": x.sum(1, keepdim=True)}

    return run


def fill(folder):
    """A disk cache of SIZE examples, every one seen once; returns the inputs."""
    x = torch.arange(SIZE * 3, dtype=torch.float32).view(SIZE, 3)
    GuideCache(SIZE, "disk", folder).activations(torch.arange(SIZE), x, guide([]))
    return x


def reopen(folder, x):
    """A new process's cache over the same folder: (activations of every example, rows the guide ran on)."""
    calls = []
    acts = GuideCache(SIZE, "disk", folder).activations(torch.arange(SIZE), x, guide(calls))
    return acts, sum(calls)


def test_a_resumed_run_reopens_the_cache_and_runs_the_guide_on_nothing(tmp_path):
    x = fill(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acts, ran = reopen(tmp_path / "cache", x)
    assert ran == 0 and torch.equal(acts["a"], x * 2)


def _torn(manifest, text):
    return text[: len(text) // 2]


DAMAGES = {
    "torn": _torn,
    "empty": lambda m, t: "",
    "a-list": lambda m, t: "[]",
    "size-text": lambda m, t: json.dumps(m | {"size": "8"}),
    "layers-a-number": lambda m, t: json.dumps(m | {"layers": 5}),
    "a-layer-without-file": lambda m, t: json.dumps(m | {"layers": [{"name": "a", "shape": [8, 3], "dtype": "<f4"}]}),
    "a-file-outside": lambda m, t: json.dumps(m | {"layers": [dict(m["layers"][0], file="../../etc.npy")]}),
    "a-shape-that-does-not-match": lambda m, t: json.dumps(m | {"layers": [dict(m["layers"][0], shape=[8, 4])]}),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_manifest_is_named_and_the_cache_rebuilt(tmp_path, damage):
    x = fill(tmp_path / "cache")
    path = tmp_path / "cache" / "manifest.json"
    text = path.read_text()
    path.write_text(DAMAGES[damage](json.loads(text), text))
    with pytest.warns(UserWarning) as caught:
        acts, ran = reopen(tmp_path / "cache", x)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"the guide cache {path} is damaged: ") and message.endswith("; rebuilding it")
    assert "\n" not in message
    assert ran == SIZE and torch.equal(acts["a"], x * 2)  # the guide ran again on every example
    assert json.loads(path.read_text()) == json.loads(text)  # and the cache was written anew
    assert reopen(tmp_path / "cache", x)[1] == 0


def test_a_cache_file_that_does_not_match_its_manifest_is_named(tmp_path):
    x = fill(tmp_path / "cache")
    np.save(tmp_path / "cache" / "filled.npy", np.zeros(SIZE - 1, dtype=np.bool_))  # another size
    with pytest.warns(UserWarning, match=r"damaged: filled.npy holds \|b1 \(7,\), expected \|b1 \(8,\)"):
        assert reopen(tmp_path / "cache", x)[1] == SIZE


def test_the_manifest_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import os

    def killed(*args):
        raise KeyboardInterrupt("killed while renaming")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        fill(tmp_path / "cache")
    monkeypatch.undo()
    assert not (tmp_path / "cache" / "manifest.json").exists()  # never half of one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no manifest: a cache never finished, rebuilt without a word
        assert reopen(tmp_path / "cache", torch.arange(SIZE * 3, dtype=torch.float32).view(SIZE, 3))[1] == SIZE
