"""Time embeddings shared by the networks."""

from __future__ import annotations

import math

import torch
from torch import nn

from scoresde._typing import Tensor
from scoresde._validation import check_choice, check_positive_int


def _check_even_dim(dim: int) -> int:
    """The embeddings are [sin, cos] pairs, so an odd dim could not be honoured."""
    dim = check_positive_int("dim", dim, minimum=2)
    if dim % 2:
        raise ValueError(f"dim must be an even int >= 2 (sin/cos pairs), got {dim!r}")
    return dim


class FourierTimeEmbedding(nn.Module):
    """Random Fourier features of t (Tancik et al. 2020; Song et al.'s NCSN++):
    [sin(2 pi W t), cos(2 pi W t)] with fixed W ~ N(0, scale^2). t `[B]` -> `[B, dim]`.
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        dim = _check_even_dim(dim)
        g = torch.Generator().manual_seed(seed)
        # Drawn on the generator's device (the CPU) whatever the default device: under
        # `with torch.device("meta")` (the checkpoint readers' shape check) a seeded randn on
        # meta imports ~800 modules (dynamo), one of which keeps the process group of a
        # torchrun worker alive after destroy_process_group: its gloo threads then race the
        # interpreter's exit (rare SIGABRT, "terminate called without an active exception").
        self.register_buffer("W", torch.randn(dim // 2, generator=g, device=g.device) * scale)

    def forward(self, t: Tensor) -> Tensor:
        proj = 2 * math.pi * t[:, None] * self.W[None].to(t.dtype)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer/DDPM positional embedding of `t * max_positions` (t in [0, 1] -> step).
    t `[B]` -> `[B, dim]`.
    """

    def __init__(self, dim: int, max_positions: float = 1000.0) -> None:
        super().__init__()
        dim = _check_even_dim(dim)
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs)
        self.max_positions = max_positions

    def forward(self, t: Tensor) -> Tensor:
        args = (t * self.max_positions)[:, None] * self.freqs[None].to(t.dtype)
        return torch.cat([args.sin(), args.cos()], dim=-1)


def make_time_embedding(kind: str, dim: int) -> nn.Module:
    """`"fourier"` or `"sinusoidal"`."""
    check_choice("time_embedding", kind, ("fourier", "sinusoidal"))
    return FourierTimeEmbedding(dim) if kind == "fourier" else SinusoidalTimeEmbedding(dim)


def add_label_embedding(
    emb: Tensor, y: Tensor | None, label_embed: nn.Embedding | None, num_classes: int | None
) -> Tensor:
    """Add a class embedding to the time embedding `emb` `[B, E]`.

    Label `num_classes` (or y=None) is the unconditional "null" class that classifier-free
    guidance trains with label dropout; a network without classes refuses labels.
    """
    if num_classes is None or label_embed is None:
        if y is not None:
            raise ValueError("y was given but the network has num_classes=None")
        return emb
    if y is None:
        y = torch.full((emb.shape[0],), num_classes, device=emb.device, dtype=torch.long)
    return emb + label_embed(y)
