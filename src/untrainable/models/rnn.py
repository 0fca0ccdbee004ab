"""Recurrent networks over token sequences: vanilla tanh RNN and LSTM.

Hookable paths: `embed` (B, T, embed_dim), `layers.{i}` (one recurrent layer
each; its output is the tuple `(sequence, state)` where the sequence is
(B, T, hidden), or a PackedSequence when `pack=True`), `head`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from untrainable.models.registry import register_model

PAD = 0


def sequence_lengths(x: Tensor) -> Tensor:
    """Length of each right-padded token sequence: one past its last non-pad token.

    x: (B, T) int64 token ids -> (B,) int64, 0 for an all-pad row.
    """
    positions = torch.arange(1, x.shape[1] + 1, device=x.device)
    return ((x != PAD) * positions).amax(dim=1)


class RecurrentNet(nn.Module):
    """Token embedding, a stack of recurrent layers, a linear read-out.

    The stack is a ModuleList of single-layer `nn.RNN`/`nn.LSTM` modules rather
    than one multi-layer module, so that every layer has its own path
    (`layers.0`, `layers.1`, ...) for guidance hooks to attach to.

    Padding is trailing, so a left-to-right recurrence never lets it reach a
    real position. `pack=True` additionally skips the padded steps (a
    PackedSequence flows between layers); pad positions then hold the head's
    bias.
    """

    def __init__(
        self,
        cell: type[nn.RNNBase],
        vocab_size: int,
        num_classes: int,
        embed_dim: int,
        hidden: int,
        layers: int,
        pooled: bool,
        pack: bool,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.pooled = pooled
        self.pack = pack
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.layers = nn.ModuleList(
            cell(embed_dim if i == 0 else hidden, hidden, batch_first=True) for i in range(layers)
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits from right-padded tokens.

        x: (B, T) int64 -> (B, T, num_classes), or (B, num_classes) when pooled.
        """
        lengths = sequence_lengths(x)
        h = self.embed(x)
        if self.pack:
            # pack_padded_sequence rejects empty sequences; an all-pad row is
            # run for one step and its outputs are never scored.
            h = pack_padded_sequence(h, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        for layer in self.layers:
            h, _ = layer(h)
        if self.pack:
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        if self.pooled:
            last = (lengths - 1).clamp(min=0)
            h = h[torch.arange(x.shape[0], device=x.device), last]
        return self.head(h)


@register_model("rnn")
def rnn(
    vocab_size: int = 16,
    num_classes: int = 16,
    embed_dim: int = 64,
    hidden: int = 128,
    layers: int = 2,
    pooled: bool = False,
    pack: bool = False,
) -> RecurrentNet:
    """Stacked vanilla tanh RNN over tokens (`pooled` reads the last non-pad position)."""
    return RecurrentNet(nn.RNN, vocab_size, num_classes, embed_dim, hidden, layers, pooled, pack)


@register_model("lstm")
def lstm(
    vocab_size: int = 16,
    num_classes: int = 16,
    embed_dim: int = 64,
    hidden: int = 128,
    layers: int = 2,
    pooled: bool = False,
    pack: bool = False,
) -> RecurrentNet:
    """Stacked LSTM over tokens (`pooled` reads the last non-pad position)."""
    return RecurrentNet(nn.LSTM, vocab_size, num_classes, embed_dim, hidden, layers, pooled, pack)
