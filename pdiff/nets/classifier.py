"""A small CNN image classifier whose penultimate layer gives features for sample metrics (torch
only). Used by ``pdiff.sample_quality`` in place of Inception for small datasets."""
from __future__ import annotations

import torch
from torch import nn


class FeatureNet(nn.Module):
    """conv3x3 -> two stride-2 conv3x3 -> adaptive average pool to 2x2 -> linear to
    ``feature_dim`` (the features) -> ReLU -> linear to ``num_classes`` logits.

    The features are the penultimate layer's pre-activations: a ReLU output would have dead,
    constant coordinates (singular covariances) and put every input that switches a unit off at
    the same value.

    Any number of channels and any image size >= 8 (8x8 goes to 2x2 before the pool; larger images
    are pooled down to it). No normalization layers, so train and eval mode compute the same
    thing and a batch's features do not depend on the rest of the batch. He initialization (zero
    biases) keeps the activations' scale through the ReLUs, so training starts at once.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 16,
                 feature_dim: int = 128, dtype: torch.dtype | None = None):
        super().__init__()
        kw = {"dtype": dtype}  # the weights are drawn in it: one seed, one network, any default
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, **kw), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, **kw), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, **kw), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (N, 4 width, 2, 2) -> (N, 16 width)
            nn.Linear(16 * width, feature_dim, **kw))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes, **kw))
        self.feature_dim = feature_dim
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, feature_dim) penultimate pre-activations."""
        if x.dim() != 4 or min(x.shape[-2:]) < 8:
            raise ValueError(f"expected images (N, C, H, W) with H, W >= 8, got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, num_classes) logits
