"""Time embeddings for integer steps t in 1..T (torch only)."""
from __future__ import annotations

import math

import torch
from torch import nn

EMBEDDINGS = ("sinusoidal", "onehot", "learned")


class SinusoidalEmbedding(nn.Module):
    """The Transformer sinusoidal embedding of t used by DDPM: [sin(t f_i), cos(t f_i)],
    f_i = 10000^(-i / (dim/2))."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal embedding dimension must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(self.freqs.dtype)[..., None] * self.freqs  # (..., dim/2)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class OneHotEmbedding(nn.Module):
    """t one-hot over 0..T, through a linear layer (equivalent to a learned table, kept separate so
    the two can be compared as the tutorials do)."""

    def __init__(self, num_timesteps: int, dim: int):
        super().__init__()
        self.num_classes = num_timesteps + 1
        self.linear = nn.Linear(self.num_classes, dim)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(t.long(), self.num_classes).to(self.linear.weight.dtype)
        return self.linear(onehot)


class LearnedEmbedding(nn.Module):
    """A learned vector per step (``nn.Embedding`` over 0..T)."""

    def __init__(self, num_timesteps: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(num_timesteps + 1, dim)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.table(t.long())


def make_embedding(name: str, num_timesteps: int, dim: int) -> nn.Module:
    if name not in EMBEDDINGS:
        raise ValueError(f"unknown time embedding {name!r}; valid: {', '.join(EMBEDDINGS)}")
    if name == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if name == "onehot":
        return OneHotEmbedding(num_timesteps, dim)
    return LearnedEmbedding(num_timesteps, dim)
