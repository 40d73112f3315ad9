r"""Sample quality on classifier features: the Fréchet distance and precision/recall.

Both compare model samples with held-out images in the feature space of a classifier trained once
on the training split (``pdiff.feature_net``), the small-image analogue of FID on Inception
features (Heusel et al. 2017). The features the number was measured on are named with it
(``features``), since a Fréchet distance on one network is not comparable with one on another.

- ``frechet_distance``: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}), the 2-Wasserstein
  distance squared between the Gaussians with the two sets' means and covariances.
- ``precision_recall``: the k-NN manifold estimates of Kynkäänniemi et al. (2019): precision is
  the fraction of fake points inside the union of the balls around the real points reaching each
  one's k-th nearest real neighbour; recall the same with real and fake swapped.

Distances are taken ``chunk_size`` rows at a time, so memory grows as chunk_size x m, never
n x m: 10k x 10k points need about 80 MB at the default chunk.
"""
from __future__ import annotations

import torch

CHUNK_SIZE = 1024


def _check_features(a: torch.Tensor, b: torch.Tensor,
                    min_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must have shapes (n, D) and (m, D) with the same D, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if min(len(a), len(b)) < min_points:
        raise ValueError(f"need at least {min_points} points in each set, got {len(a)} and "
                         f"{len(b)}")
    return a.to(torch.float64), b.to(device=a.device, dtype=torch.float64)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix by eigh (rounding's tiny negative
    eigenvalues set to 0)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    r"""|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a S_b)^{1/2} for the sample means and
    covariances (divisor n - 1) of ``feats_a`` (n, D) and ``feats_b`` (m, D), in float64.

    tr (S_a S_b)^{1/2} = sum_i sqrt(lambda_i) over the eigenvalues of the symmetric PSD matrix
    S_a^{1/2} S_b S_a^{1/2}, which has the eigenvalues of S_a S_b: two ``eigh`` calls, no complex
    intermediate (scipy's ``sqrtm`` of the non-symmetric S_a S_b returns tiny imaginary parts
    that FID code usually discards). Negative rounding eigenvalues are set to 0, so singular
    covariances (fewer points than dimensions, dead units) are fine. Symmetric in a and b, and 0
    for identical sets up to rounding (clamped at 0).
    """
    a, b = _check_features(feats_a, feats_b, min_points=2)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(s_a)
    middle = root_a @ s_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * trace_sqrt
    return max(d.item(), 0.0)


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """(n,) distance from each point of x to its k-th nearest other point of x."""
    radii = x.new_empty(len(x))
    for start in range(0, len(x), chunk_size):
        dist = torch.cdist(x[start:start + chunk_size], x,
                           compute_mode="use_mm_for_euclid_dist")  # (chunk, n)
        radii[start:start + chunk_size] = dist.topk(k + 1, dim=1, largest=False).values[:, -1]
    return radii  # the k+1 smallest include the point itself at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3,
                     chunk_size: int = CHUNK_SIZE) -> tuple[float, float]:
    """(precision, recall) of Kynkäänniemi et al. (2019) from real and fake features (n, D), (m, D).

    The real manifold is the union of balls B(r, NN_k(r)) around the real points, NN_k the
    distance to the k-th nearest other real point; precision = the fraction of fake points in it.
    Recall = the fraction of real points in the fake manifold, built the same way. Identical sets
    give (1, 1). Distances by the matrix-product expansion in float64 (relative rounding near
    1e-8, far below any k-NN radius), ``chunk_size`` rows at a time: the real-real, fake-fake and
    fake-real distance matrices are each visited once, never held whole.
    """
    real, fake = _check_features(real, fake, min_points=k + 1)
    r_real = _kth_neighbour_radii(real, k, chunk_size)
    r_fake = _kth_neighbour_radii(fake, k, chunk_size)
    fake_inside = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    real_inside = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start in range(0, len(fake), chunk_size):
        dist = torch.cdist(fake[start:start + chunk_size], real,
                           compute_mode="use_mm_for_euclid_dist")  # (chunk, n)
        fake_inside[start:start + chunk_size] = (dist <= r_real).any(1)
        real_inside |= (dist <= r_fake[start:start + chunk_size, None]).any(0)
    return fake_inside.double().mean().item(), real_inside.double().mean().item()


def sample_quality(images_fake: torch.Tensor, images_real: torch.Tensor, feature_net, *,
                   k: int = 3, chunk_size: int = CHUNK_SIZE) -> dict:
    """The Fréchet distance (``fid``) and ``precision`` / ``recall`` (k-NN, ``k``) between model
    samples and real images (N, C, H, W) in [-1, 1], on the features of ``feature_net`` (a
    ``pdiff.feature_net.TrainedFeatureNet``); ``features`` names that network, its recipe and its
    test accuracy. The samples are first rounded to the data's K levels, as a saved image would be
    (``TrainedFeatureNet.features``), so samples drawn with any number of steps are compared alike.
    """
    fake = feature_net.features(images_fake)
    real = feature_net.features(images_real)
    precision, recall = precision_recall(real, fake, k=k, chunk_size=chunk_size)
    return {"fid": frechet_distance(fake, real), "precision": precision, "recall": recall,
            "num_fake": len(fake), "num_real": len(real), "features": feature_net.description}
