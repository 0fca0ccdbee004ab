"""Pairing guide layers with target layers."""

import pytest

from untrainable.pairing import Pair, check_pairs, make_pair, spread_index, spread_pairs


def test_spread_follows_formula():
    # round(i * (m - 1) / (n - 1)), halves up: n = 3 guide layers over m = 6 target layers
    # i=0 -> 0, i=1 -> round(2.5) = 3, i=2 -> 5
    assert [spread_index(i, 3, 6) for i in range(3)] == [0, 3, 5]
    # n = 5 over m = 3: 0, round(0.5)=1, 1, round(1.5)=2, 2
    assert [spread_index(i, 5, 3) for i in range(5)] == [0, 1, 1, 2, 2]
    assert [spread_index(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]
    assert spread_index(0, 1, 7) == 0


def test_many_to_one_keeps_every_pair():
    pairs = spread_pairs(["t0", "t1"], ["g0", "g1", "g2", "g3"])
    assert [(p.target, p.guide) for p in pairs] == [("t0", "g0"), ("t0", "g1"), ("t1", "g2"), ("t1", "g3")]
    assert len({p.key for p in pairs}) == 4


def test_explicit_pairs_and_weights():
    assert make_pair(("a", "b")) == Pair("a", "b", 1.0)
    assert make_pair(["a", "b", 0.5]) == Pair("a", "b", 0.5)
    assert make_pair({"target": "a", "guide": "b", "weight": 2}) == Pair("a", "b", 2.0)
    with pytest.raises(ValueError):
        make_pair(("a",))
    with pytest.raises(ValueError, match="weight"):
        Pair("a", "b", -1.0)


def test_check_pairs_lists_valid_layers():
    with pytest.raises(KeyError, match=r"not one of \['t0', 't1'\]"):
        check_pairs([Pair("t9", "g0")], ["t0", "t1"], ["g0"])
    with pytest.raises(ValueError, match="given twice"):
        check_pairs([Pair("t0", "g0"), Pair("t0", "g0", 2.0)], ["t0"], ["g0"])


def test_pair_names_drop_wrapper_prefixes():
    assert make_pair(("module.layers.0", "_orig_mod.blocks.1")) == Pair("layers.0", "blocks.1")
