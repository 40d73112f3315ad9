"""The 2D tutorial's moons with only T = 10 steps: which objective and which variance make a
ten-step chain a good density model.

Reproduces the tutorial's setting: scikit-learn's ``make_moons(noise=0.1)`` (data ``sklearn_moons``)
scaled to [-1, 1] (``rescale minmax``; bounds are reported in the data's own units), T = 10 with
the polynomial schedule of Hoogeboom et al. (power 2), and an MLP that sees t one-hot over 0..T
through a linear layer (``embedding onehot``), as the tutorial does. With so few steps the reverse
variance matters: the grid crosses the objective (vlb, hybrid) with the variance (fixed_small,
fixed_large, learned_range), three seeds each. With a fixed variance the hybrid loss trains exactly
as L_simple (its bound term has no gradient: the mean is detached inside it and the variance is
fixed), so the hybrid rows with fixed variances are Ho et al.'s L_simple runs.

Figures (``figures/`` in ``--out``) include the reverse-trajectory animation of each cell's first
seed, ``reverse_<objective>-<variance>.gif``.

Run from the repository root (about 4 minutes on 2 idle CPU cores; 21 measured with ``--jobs 1``
on one core of a shared machine, 7 of them CPU minutes; see experiments/README.md)::

    python experiments/moons_polynomial.py --out runs/moons_polynomial
    python experiments/moons_polynomial.py --quick --out /tmp/moons  # smoke run
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python experiments/moons_polynomial.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import _common  # noqa: E402
from pdiff.compare import GridSpec  # noqa: E402
from pdiff.train import TrainConfig  # noqa: E402

NAME = "moons_polynomial"


def spec(quick: bool = False) -> GridSpec:
    """The grid: objective x variance x 3 seeds on the moons in [-1, 1], T = 10, polynomial
    schedule, one-hot time embedding."""
    base = TrainConfig(data="sklearn_moons", rescale="minmax", timesteps=10, schedule="polynomial",
                       embedding="onehot", iterations=3000, batch_size=256, train_size=20_000,
                       test_size=2000)
    full = GridSpec(base=base,
                    axes={"objective": ("vlb", "hybrid"),
                          "variance": ("fixed_small", "fixed_large", "learned_range")},
                    seeds=(0, 1, 2), eval_samples=2000, metric_samples=1000)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
