"""A residual MLP score network for flat data `[B, dim]` (or `[B, *D]` with prod(D) = dim)."""

from __future__ import annotations

import torch
from torch import nn

from scoresde._typing import Tensor
from scoresde._validation import broadcast_time, check_positive_int
from scoresde.nets.embedding import add_label_embedding, make_time_embedding


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(self.act(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.act(z))


class MLPScoreNet(nn.Module):
    """net(x `[B, *D]`, t `[B]`, y `[B]` optional) -> `[B, *D]`.

    A residual MLP with a time embedding added in every block. The defaults
    (width 256, 4 blocks, Fourier time features) learn the 2-D toy sets in a few thousand
    steps. With `num_classes`, labels y are embedded too; label `num_classes` (or y=None)
    is the unconditional "null" class used by classifier-free guidance.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        num_blocks: int = 4,
        time_embedding: str = "fourier",
        embed_dim: int = 128,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        hidden = check_positive_int("hidden", hidden)
        num_blocks = check_positive_int("num_blocks", num_blocks)
        embed_dim = check_positive_int("embed_dim", embed_dim, minimum=2)
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sin/cos pairs), got {embed_dim!r}")
        self.num_classes = (
            None if num_classes is None else check_positive_int("num_classes", num_classes)
        )
        self.time_embed = nn.Sequential(
            make_time_embedding(time_embedding, embed_dim),
            nn.Linear(embed_dim, embed_dim),
            nn.SiLU(),
            nn.Linear(embed_dim, embed_dim),
        )
        if self.num_classes is not None:
            self.label_embed = nn.Embedding(self.num_classes + 1, embed_dim)
        self.inp = nn.Linear(self.dim, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, embed_dim) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(
                f"x must have {self.dim} features per sample, got shape {tuple(x.shape)}"
            )
        t = broadcast_time(t, flat)
        emb = self.time_embed(t)
        emb = add_label_embedding(emb, y, getattr(self, "label_embed", None), self.num_classes)
        h = self.inp(flat)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, params={sum(p.numel() for p in self.parameters())}"


def num_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
