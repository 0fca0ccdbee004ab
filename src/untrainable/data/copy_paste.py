"""The copy-paste task: read a random symbol sequence, then write it out again.

As in "Training the Untrainable" (Subramaniam et al., 2024). A row is

    s_1 ... s_L  COPY  BLANK x L  END  PAD ...

and the model must emit s_i while reading the i-th BLANK. Only those L
positions are scored; every other target is -100 (PyTorch's ignore_index).
Rows are padded to T = 2 * max_len + 2.

Token ids: PAD = 0, symbols 1..vocab, then COPY, BLANK, END (`special_ids`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from untrainable.data.registry import DataSplits, register_dataset

PAD = 0
FIRST_SYMBOL = 1
IGNORE = -100


def special_ids(vocab: int) -> tuple[int, int, int]:
    """The (COPY, BLANK, END) ids, placed right after the symbols 1..vocab."""
    return vocab + 1, vocab + 2, vocab + 3


def vocab_size(vocab: int) -> int:
    """Number of token ids: PAD, the symbols, COPY, BLANK and END."""
    return vocab + 4


def make_copy_paste(
    n: int, min_len: int = 20, max_len: int = 40, vocab: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Draw `n` copy-paste rows with lengths L uniform in [min_len, max_len].

    Returns x: (n, T) int64 tokens and y: (n, T) int64 targets, T = 2 * max_len + 2;
    y holds the source symbols at the BLANK positions and -100 elsewhere.
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    copy, blank, end = special_ids(vocab)
    t = 2 * max_len + 2
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=(n, 1))
    symbols = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + vocab, size=(n, max_len))

    pos = np.arange(t)[None, :]
    source = pos < lengths
    blanks = (pos > lengths) & (pos <= 2 * lengths)
    x = np.full((n, t), PAD, dtype=np.int64)
    x[:, :max_len] = np.where(source[:, :max_len], symbols, PAD)
    x[pos == lengths] = copy
    x[blanks] = blank
    x[pos == 2 * lengths + 1] = end

    # The i-th BLANK sits at position L + 1 + i and asks for symbol i.
    y = np.full((n, t), IGNORE, dtype=np.int64)
    wanted = np.clip(pos - lengths - 1, 0, max_len - 1)
    y[blanks] = np.take_along_axis(symbols, wanted, axis=1)[blanks]
    return torch.from_numpy(x), torch.from_numpy(y)


@register_dataset("copy_paste")
def copy_paste(
    train_size: int = 10000,
    val_size: int = 1000,
    test_size: int = 1000,
    min_len: int = 20,
    max_len: int = 40,
    vocab: int = 10,
    seed: int = 0,
) -> DataSplits:
    """Copy-paste: reproduce a random symbol sequence after a COPY token."""
    # Independent streams per split, so no split is a prefix of another.
    seeds = np.random.SeedSequence(seed).generate_state(3)
    splits = [
        TensorDataset(*make_copy_paste(size, min_len, max_len, vocab, int(s)))
        for size, s in zip((train_size, val_size, test_size), seeds)
    ]
    copy, blank, end = special_ids(vocab)
    size = vocab_size(vocab)
    return DataSplits(
        train=splits[0],
        val=splits[1],
        test=splits[2],
        input_shape=(2 * max_len + 2,),
        num_classes=size,
        meta={
            "vocab_size": size,
            "pad_id": PAD,
            "symbol_ids": (FIRST_SYMBOL, FIRST_SYMBOL + vocab - 1),
            "copy_id": copy,
            "blank_id": blank,
            "end_id": end,
            "min_len": min_len,
            "max_len": max_len,
        },
    )
