"""Pre-norm Transformers over token sequences: a causal decoder and a padded encoder.

Hookable paths: `embed` and `pos` (token and learned position embeddings),
`blocks.{i}` (B, T, dim) residual stream after block i, `blocks.{i}.attn`
(B, T, dim), `blocks.{i}.mlp` (B, T, dim), `norm`, `head`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from untrainable.models.registry import register_model

PAD = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention returning a plain (B, T, dim) tensor."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x: (B, T, dim); keep: (B, T) bool, False for keys to ignore -> (B, T, dim)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm residual block: attention then a 4x-wide GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x: (B, T, dim); keep: (B, T) bool key mask or None -> (B, T, dim)."""
        x = x + self.drop(self.attn(self.norm1(x), keep))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token and position embeddings, pre-norm blocks, final norm, linear read-out.

    `causal=True` is a decoder: each position attends to itself and the past
    and gets its own logits. `causal=False` is an encoder for right-padded
    sequences: attention ignores pad keys and the read-out is the mean over
    non-pad positions, so extra trailing padding leaves the logits unchanged.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        max_len: int,
        dropout: float,
        causal: bool,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.causal = causal
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T) int64 -> (B, T, num_classes) if causal else (B, num_classes)."""
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        h = self.drop(self.embed(x) + self.pos(torch.arange(t, device=x.device)))
        real = x != PAD
        # An all-pad row would mask every key and turn softmax into NaN; let it
        # attend everywhere instead (its pooled features are zeroed below).
        keep = None if self.causal else real | ~real.any(dim=1, keepdim=True)
        for block in self.blocks:
            h = block(h, keep)
        h = self.norm(h)
        if not self.causal:
            weights = real.unsqueeze(-1).to(h.dtype)
            h = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(h)


@register_model("causal_transformer")
def causal_transformer(
    vocab_size: int = 16,
    num_classes: int = 16,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    max_len: int = 512,
    dropout: float = 0.0,
) -> Transformer:
    """Decoder-only Transformer with per-position logits (copy-paste, language modelling)."""
    return Transformer(vocab_size, num_classes, dim, depth, heads, max_len, dropout, causal=True)


@register_model("transformer_encoder")
def transformer_encoder(
    vocab_size: int = 4,
    num_classes: int = 2,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    max_len: int = 128,
    dropout: float = 0.0,
) -> Transformer:
    """Bidirectional Transformer mean-pooled over non-pad tokens (parity)."""
    return Transformer(vocab_size, num_classes, dim, depth, heads, max_len, dropout, causal=False)
