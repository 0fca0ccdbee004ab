"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28-sized images.

Hookable module paths: `patch_embed` (B, D, H/p, W/p), `blocks.{i}` (B, T, D),
`blocks.{i}.attn` (B, T, D), `blocks.{i}.mlp` (B, T, D), `norm` (B, T, D) and
the head `head` (B, num_classes), with T = 1 + (H/p)(W/p) tokens (class token
first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from untrainable.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        # (B, T, 3D) -> 3 x (B, heads, T, D/heads)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Token-wise two-layer GELU network: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, max(1, round(dim * mlp_ratio)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patchify, add a class token and positions, run blocks, classify the class token.

    (B, C, H, W) -> logits (B, num_classes).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ):
        super().__init__()
        channels, height, width = input_shape
        num_patches = (height // patch_size) * (width // patch_size)
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model("vit_tiny")
def vit_tiny(
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    patch_size: int = 4,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> nn.Module:
    """Small ViT: conv patch embedding, class token, learned positions, pre-norm blocks."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}")
    if patch_size < 1 or input_shape[1] % patch_size or input_shape[2] % patch_size:
        raise ValueError(f"patch_size must be >= 1 and divide height and width {input_shape[1:]}, got {patch_size}")
    sizes = {"num_classes": num_classes, "dim": dim, "depth": depth, "heads": heads}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
    return VisionTransformer(input_shape, num_classes, patch_size, dim, depth, heads, mlp_ratio)
