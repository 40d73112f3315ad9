"""MLP denoisers for vector data: net(x_t, t) -> prediction (torch only)."""
from __future__ import annotations

import torch
from torch import nn

from .embeddings import make_embedding


class MLPDenoiser(nn.Module):
    """An MLP on [x_t, embed(t)] with SiLU activations.

    ``out_multiplier`` is 2 when the variance is learned: the output then has 2 D features, the
    mean part first (what ``ReverseProcess`` splits). The last layer starts at zero so an eps
    network starts at the prior's guess eps = 0.
    """

    def __init__(self, dim: int, num_timesteps: int, *, hidden: int = 128, depth: int = 3,
                 embedding: str = "sinusoidal", embedding_dim: int = 32, out_multiplier: int = 1):
        super().__init__()
        self.embed = make_embedding(embedding, num_timesteps, embedding_dim)
        layers: list[nn.Module] = []
        width = dim + embedding_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, dim * out_multiplier)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([xt, self.embed(t).to(xt.dtype)], dim=-1)  # (B, D + E)
        return self.head(self.body(h))


class MeanVarianceNets(nn.Module):
    """Separate mean and variance networks, as in the 1D tutorial: returns the pair
    ``(mean_net(x_t, t), variance_net(x_t, t))`` for a learned-variance ``ReverseProcess``."""

    def __init__(self, mean_net: nn.Module, variance_net: nn.Module):
        super().__init__()
        self.mean_net, self.variance_net = mean_net, variance_net

    def forward(self, xt: torch.Tensor, t: torch.Tensor):
        return self.mean_net(xt, t), self.variance_net(xt, t)
