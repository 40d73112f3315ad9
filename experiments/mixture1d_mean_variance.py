"""The 1D tutorial's mixture with separate mean and variance networks trained on the bound.

Reproduces the tutorial's setting: the mixture of N(-4, 1) and N(4, 1) with weights 1:2 (entropy
about 2.07 nats) in its own units, T = 250 with a constant beta = 0.02, and two MLPs, one for the
mean (predicting eps) and one for the variance (``net mean_variance``). The grid crosses the
variance's parameterization (learned_softplus: the tutorial's sigma_t = softplus(output);
learned_range: Nichol & Dhariwal's interpolation between log beta_t and log beta_tilde_t) with the
objective (vlb: the full bound trains both networks, as in the tutorial; hybrid: L_simple trains
the mean network and the bound only the variance network), three seeds each.

Run from the repository root (about 3 minutes on 2 idle CPU cores, twice that on a shared machine;
see experiments/README.md)::

    python experiments/mixture1d_mean_variance.py --out runs/mixture1d_mean_variance
    python experiments/mixture1d_mean_variance.py --quick --out /tmp/mixture1d  # smoke run
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python experiments/mixture1d_mean_variance.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import _common  # noqa: E402
from pdiff.compare import GridSpec  # noqa: E402
from pdiff.train import TrainConfig  # noqa: E402

NAME = "mixture1d_mean_variance"


def spec(quick: bool = False) -> GridSpec:
    """The grid: variance x objective x 3 seeds on the 1D mixture, T = 250, constant beta."""
    base = TrainConfig(data="mixture1d", net="mean_variance", timesteps=250, schedule="const",
                       embedding="sinusoidal", iterations=3000, batch_size=256, train_size=20_000,
                       test_size=2000)
    full = GridSpec(base=base,
                    axes={"variance": ("learned_softplus", "learned_range"),
                          "objective": ("vlb", "hybrid")},
                    seeds=(0, 1, 2), eval_samples=2000, metric_samples=1000)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
