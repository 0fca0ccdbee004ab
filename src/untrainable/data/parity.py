"""Parity of variable-length bitstrings, with a longer held-out set for length generalisation.

Token ids: PAD = 0, bit 0 = 1, bit 1 = 2. A row is right-padded with PAD; its
label is the number of ones mod 2.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from untrainable.data.registry import DataSplits, register_dataset

PAD = 0
BIT0 = 1
BIT1 = 2
VOCAB_SIZE = 3


def make_parity(
    n: int, min_len: int = 2, max_len: int = 50, seed: int = 0, pad_to: int | None = None
) -> tuple[Tensor, Tensor]:
    """Draw `n` bitstrings with lengths uniform in [min_len, max_len] and their parities.

    Returns x: (n, pad_to or max_len) int64 tokens and y: (n,) int64 in {0, 1}.
    """
    width = max_len if pad_to is None else pad_to
    if not 1 <= min_len <= max_len <= width:
        raise ValueError(
            f"need 1 <= min_len <= max_len <= pad_to, got min_len={min_len}, max_len={max_len}, pad_to={pad_to}"
        )
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=(n, 1))
    bits = rng.integers(0, 2, size=(n, width))
    real = np.arange(width)[None, :] < lengths
    bits = bits * real
    x = np.where(real, BIT0 + bits, PAD).astype(np.int64)
    y = (bits.sum(axis=1) % 2).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@register_dataset("parity")
def parity(
    train_size: int = 10000,
    val_size: int = 1000,
    test_size: int = 1000,
    min_len: int = 2,
    max_len: int = 50,
    long_min: int = 51,
    long_max: int = 64,
    seed: int = 0,
) -> DataSplits:
    """Parity of bitstrings; `extra_test["long"]` holds unseen longer lengths.

    The long set has `test_size` rows. Short strings necessarily recur across
    splits (there are only 2**L of length L); the long set's lengths are never
    trained on as long as long_min > max_len.
    """
    if long_min > long_max or long_max < max_len:
        raise ValueError(
            f"need long_min <= long_max and long_max >= max_len, got long_min={long_min}, "
            f"long_max={long_max}, max_len={max_len}"
        )
    # Every split shares one width so a single model sees the long set unchanged.
    width = long_max
    train_seed, val_seed, test_seed, long_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(4))
    return DataSplits(
        train=TensorDataset(*make_parity(train_size, min_len, max_len, train_seed, width)),
        val=TensorDataset(*make_parity(val_size, min_len, max_len, val_seed, width)),
        test=TensorDataset(*make_parity(test_size, min_len, max_len, test_seed, width)),
        extra_test={"long": TensorDataset(*make_parity(test_size, long_min, long_max, long_seed, width))},
        input_shape=(width,),
        num_classes=2,
        meta={
            "vocab_size": VOCAB_SIZE,
            "pad_id": PAD,
            "bit_ids": (BIT0, BIT1),
            "train_lengths": (min_len, max_len),
            "long_lengths": (long_min, long_max),
        },
    )
