"""Diagonal Gaussians over events: the one building block of q and of p_theta's transitions."""
from __future__ import annotations

import torch
import pyro.distributions as dist


def diag_normal(loc: torch.Tensor, variance: torch.Tensor | None = None, *,
                log_variance: torch.Tensor | None = None, event_dims: int) -> dist.Independent:
    """N(loc, diag(variance)) with the last ``event_dims`` dimensions as its event.

    Give either ``variance`` or ``log_variance`` (which is exponentiated here, the stable way to
    carry a learned variance). ``batch_shape`` is ``loc.shape[:-event_dims]``.
    """
    if (variance is None) == (log_variance is None):
        raise ValueError("give exactly one of variance and log_variance")
    scale = variance.sqrt() if variance is not None else torch.exp(0.5 * log_variance)
    loc, scale = torch.broadcast_tensors(loc, scale)
    return dist.Normal(loc, scale).to_event(event_dims)


def standard_normal(like: torch.Tensor, event_dims: int) -> dist.Independent:
    """p(x_T) = N(0, I) with the batch and event shape of ``like``."""
    return dist.Normal(torch.zeros_like(like), torch.ones_like(like)).to_event(event_dims)
