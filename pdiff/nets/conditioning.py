r"""Class labels for a conditional denoiser ``net(x_t, t, y)``, seen through the two-argument
``net(x_t, t)`` that ``ReverseProcess`` calls.

- ``LabelledNet``: the trainer sets ``labels`` (one per example, the null label where dropped for
  classifier-free guidance) before each loss; ``None`` means the null label for every example.
- ``GuidedNet``: classifier-free guidance (Ho & Salimans 2022, eq. 6) at sampling time,

      eps~(x_t, t, y) = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null),

  applied to the mean channels (eps, x_0 or the posterior mean, whichever the network predicts);
  a learned variance is taken from the conditional output, as GLIDE does. w = 0 is the plain
  conditional model. Both outputs come from one network call on the doubled batch.
"""
from __future__ import annotations

import torch
from torch import nn


class LabelledNet(nn.Module):
    """``net(x_t, t, labels)`` with ``labels`` an attribute (None: the net's null label)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.labels: torch.Tensor | None = None

    def forward(self, xt: torch.Tensor, t: torch.Tensor):
        if self.labels is None:
            return self.net(xt, t)
        if self.labels.shape[0] != xt.shape[0]:
            raise ValueError(f"{self.labels.shape[0]} labels for a batch of {xt.shape[0]}")
        return self.net(xt, t, self.labels)


class GuidedNet(nn.Module):
    """Classifier-free guidance of the class-conditional ``net`` towards ``labels`` (B,) with
    scale ``guidance`` >= 0; ``null_label`` is the net's "no label" index."""

    def __init__(self, net: nn.Module, labels: torch.Tensor, guidance: float, null_label: int):
        super().__init__()
        if guidance < 0:
            raise ValueError(f"the guidance scale must be >= 0 (0: no guidance), got {guidance}")
        self.net, self.guidance, self.null_label = net, float(guidance), null_label
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long), persistent=False)

    def _labels(self, batch: int, device) -> torch.Tensor:
        y = self.labels.to(device)
        if y.dim() == 0:
            return y.expand(batch)
        if y.shape[0] != batch:
            raise ValueError(f"{y.shape[0]} labels for a batch of {batch}")
        return y

    def forward(self, xt: torch.Tensor, t: torch.Tensor):
        B, C = xt.shape[0], xt.shape[1]
        y = self._labels(B, xt.device)
        if self.guidance == 0:
            return self.net(xt, t, y)
        null = torch.full_like(y, self.null_label)
        out = self.net(torch.cat([xt, xt]), torch.cat([t.expand(B), t.expand(B)]), torch.cat([y, null]))
        cond, uncond = out[:B], out[B:]  # (B, C * out_multiplier, ...)
        w = self.guidance
        mean = (1 + w) * cond[:, :C] - w * uncond[:, :C]
        return torch.cat([mean, cond[:, C:]], dim=1)
