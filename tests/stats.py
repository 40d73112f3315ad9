"""Seeded Monte Carlo comparisons, the tolerance policy written once.

|estimate - target| <= Z * stderr with Z = 5: a correct implementation fails with probability
below 1e-6 per check (and the seed fixes the draw anyway); a bug larger than a few standard errors
fails.
"""
import torch

Z = 5.0


def assert_within_stderr(estimate, target, stderr, z: float = Z, atol: float = 0.0):
    estimate, target, stderr = (torch.as_tensor(v, dtype=torch.float64) for v in (estimate, target, stderr))
    err = (estimate - target).abs()
    bound = z * stderr + atol
    assert bool((err <= bound).all()), (
        f"estimate {estimate.tolist()} vs target {target.tolist()}: error {err.tolist()} "
        f"exceeds {z} standard errors ({stderr.tolist()}) + atol {atol}")
