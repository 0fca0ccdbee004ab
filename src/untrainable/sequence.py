"""Compare (batch, time, features) activations: flattened, token by token, or tokens as samples."""

from __future__ import annotations

import torch
from torch import Tensor

from untrainable.similarity import Similarity

SEQUENCE_MODES = ("flatten", "tokenwise", "tokens")


def sequence_similarity(
    similarity: Similarity,
    x: Tensor,
    y: Tensor,
    mode: str = "flatten",
    mask: Tensor | None = None,
    min_rows: int = 4,
) -> Tensor:
    """Similarity of two sequence activations under a padding mask.

    Args:
        similarity: an (n, d1), (n, d2) -> scalar measure.
        x: (batch, time, d1) activations.  y: (batch, time', d2).
        mode:
            - `flatten`: each example is one sample of time * d features
              (padded positions zeroed in both, so an all-padded position drops out);
            - `tokenwise`: the mean over positions t of the similarity of
              x[:, t] and y[:, t] over the examples valid at t (the paper's
              token-wise option); positions with fewer than `min_rows` valid
              examples are skipped;
            - `tokens`: every valid (example, position) is one sample.
        mask: (batch, time) bool, True on real tokens. None means all valid.
    Returns:
        scalar similarity.
    """
    if mode not in SEQUENCE_MODES:
        raise ValueError(f"sequence mode {mode!r} is not one of {', '.join(SEQUENCE_MODES)}")
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(
            f"sequence similarity needs (batch, time, features) inputs, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if mask is not None:
        mask = mask.to(device=x.device, dtype=torch.bool)
        # A packed RNN's output stops at the batch's longest row; the positions
        # after it are padding, so fill them in as zeros.
        x, y = pad_time(x, mask.shape[1]), pad_time(y, mask.shape[1])
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match activations {tuple(x.shape[:2])}")
    if mode != "flatten" and x.shape[1] != y.shape[1]:
        raise ValueError(f"mode {mode!r} needs equal lengths in time, got {x.shape[1]} and {y.shape[1]}")
    if mode == "flatten":
        if mask is not None:
            x = x * mask[:, : x.shape[1], None]
            y = y * mask[:, : y.shape[1], None]
        return similarity(x.flatten(1), y.flatten(1))
    if mode == "tokens":
        if mask is None:
            return similarity(x.flatten(0, 1), y.flatten(0, 1))
        return similarity(x[mask], y[mask])
    values = []
    for t in range(x.shape[1]):
        rows = slice(None) if mask is None else mask[:, t]
        xt, yt = x[rows, t], y[rows, t]
        if xt.shape[0] >= min_rows:
            values.append(similarity(xt, yt))
    if not values:
        raise ValueError(f"no position has {min_rows} or more valid examples for token-wise similarity")
    return torch.stack(values).mean()


def pad_time(x: Tensor, length: int) -> Tensor:
    """(batch, time, d) zero-padded at the end to `length` positions when shorter."""
    if x.shape[1] >= length:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]))
