"""Toy datasets with known densities, by name.

Each toy is a ``torch.distributions.Distribution`` over vectors (``event_shape == (D,)``) whose
``sample(sample_shape, generator=None)`` draws i.i.d. points and whose ``log_prob`` is exact where
``has_exact_density`` is true (otherwise it raises ``NotImplementedError``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch.distributions import Distribution

from .empirical import EmpiricalData, is_data_file
from .mixture import GaussianMixture
from .pinwheel import Pinwheel
from .toy2d import (Checkerboard, Moons, SwissRoll, TwoSpirals, circles, eight_gaussians, rings,
                    sklearn_moons)


def mixture1d() -> GaussianMixture:
    """The 1D tutorial's mixture: means -4 and 4, std 1, weights 1:2."""
    return GaussianMixture(means=[[-4.0], [4.0]], stds=[1.0, 1.0], weights=[1.0, 2.0])


def clusters8() -> GaussianMixture:
    """The 2D tutorial's 8 clusters: centres (0, +-1), (+-1, 0), (+-0.5, +-0.5), times 4, std 0.1."""
    centres = [[0, 1], [0, -1], [1, 0], [-1, 0], [0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]]
    return GaussianMixture(means=4.0 * torch.tensor(centres, dtype=torch.get_default_dtype()),
                           stds=torch.full((8,), 0.1), weights=torch.ones(8))


TOY_DATASETS: dict[str, Callable[[], Distribution]] = {
    "mixture1d": mixture1d,
    "clusters8": clusters8,
    "8gaussians": eight_gaussians,
    "checkerboard": Checkerboard,
    "circles": circles,
    "rings": rings,
    "moons": Moons,
    "swissroll": SwissRoll,
    "2spirals": TwoSpirals,
    "pinwheel": Pinwheel,
    "sklearn_moons": sklearn_moons,
}


def has_exact_density(dist: Distribution) -> bool:
    return bool(getattr(dist, "has_exact_density", isinstance(dist, GaussianMixture)))


_FILES: dict[tuple[str, float], EmpiricalData] = {}


def get_toy(name: str) -> Distribution:
    """The toy distribution called ``name``, or the points of a ``.npy``/``.csv``/``.txt`` file
    (``EmpiricalData``, read once per process and file version); ``ValueError`` naming the valid
    ones otherwise."""
    if is_data_file(name):
        path = Path(name)
        key = (str(path.resolve()), path.stat().st_mtime if path.is_file() else -1.0)
        if key not in _FILES:
            _FILES[key] = EmpiricalData(name)
        return _FILES[key]
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(TOY_DATASETS))}, "
                         "or a file of points (.npy, .csv, .txt)")
    return TOY_DATASETS[name]()


def toy_split(dist: Distribution, num_train: int, num_test: int, seed: int):
    """Fixed train and test sets drawn from ``dist``: the same ``seed`` gives the same points.

    The test set comes from its own stream (``seed`` offset), so changing ``num_train`` does not
    change the test points. A file's points (``EmpiricalData``) are split, not drawn: its fixed
    training and test parts, whatever the seed.
    """
    if isinstance(dist, EmpiricalData):
        return dist.split(num_train, num_test)
    train = dist.sample((num_train,), generator=torch.Generator().manual_seed(2 * seed))
    test = dist.sample((num_test,), generator=torch.Generator().manual_seed(2 * seed + 1))
    return train, test


def entropy_mc(dist: Distribution, num_samples: int, generator: torch.Generator | None = None):
    """H = E[-log p(x)] in nats by Monte Carlo, with its standard error; ``None`` if unknown."""
    if not has_exact_density(dist):
        return None, None
    x = dist.sample((num_samples,), generator=generator)
    nlp = -dist.log_prob(x)
    return nlp.mean().item(), (nlp.std() / math.sqrt(num_samples)).item()
