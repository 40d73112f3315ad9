"""Likelihoods beyond the discrete bound on the 1D two-Gaussian mixture (means -4 and 4, std 1, weights 1:2).

Each objective of the weighted family (elbo, simple, snr, min_snr, p2, edm; pdiff.weighting) and
VDM's continuous-time bound (continuous) trains a v-prediction network with the posterior's
variance, T = 1000, linear schedule, three seeds; each run is evaluated on the same 500 test
points by the discrete bound, the continuous-time bound on its schedule and the probability-flow
ODE (exact divergence for D <= 8, Hutchinson above), each with its wall time. See
experiments/_likelihoods.py and docs/results.md ("Likelihoods beyond the discrete bound").

Run from the repository root (21 runs of 3000 steps with every estimator on 500 test points; see experiments/README.md)::

    python experiments/likelihoods_mixture1d.py --out runs/likelihoods_mixture1d
    python experiments/likelihoods_mixture1d.py --quick --out /tmp/likelihoods_mixture1d  # smoke run
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python experiments/likelihoods_mixture1d.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import _common, _likelihoods  # noqa: E402
from pdiff.compare import GridSpec  # noqa: E402
from pdiff.train import TrainConfig  # noqa: E402

NAME = "likelihoods_mixture1d"


def spec(quick: bool = False) -> GridSpec:
    """Every objective of ``_likelihoods.OBJECTIVES`` x 3 seeds, three estimators per run."""
    base = TrainConfig(data="mixture1d", iterations=3000, batch_size=256, train_size=20_000,
                       test_size=2000)
    full = _likelihoods.grid(base, eval_samples=500)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
