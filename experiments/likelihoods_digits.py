"""Likelihoods beyond the discrete bound on scikit-learn's 8x8 digits, in bits/dim (discretized decoder, uniform dequantization for the ODE).

Each objective of the weighted family (elbo, simple, snr, min_snr, p2, edm; pdiff.weighting) and
VDM's continuous-time bound (continuous) trains a v-prediction network with the posterior's
variance, T = 1000, linear schedule, three seeds; each run is evaluated on the same 100 test
points by the discrete bound, the continuous-time bound on its schedule and the probability-flow
ODE (exact divergence for D <= 8, Hutchinson above), each with its wall time. See
experiments/_likelihoods.py and docs/results.md ("Likelihoods beyond the discrete bound").

Run from the repository root (21 runs of 2000 steps with the bound on 100 test digits; see experiments/README.md)::

    python experiments/likelihoods_digits.py --out runs/likelihoods_digits
    python experiments/likelihoods_digits.py --quick --out /tmp/likelihoods_digits  # smoke run
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python experiments/likelihoods_digits.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import _common, _likelihoods  # noqa: E402
from pdiff.compare import GridSpec  # noqa: E402
from pdiff.train import TrainConfig  # noqa: E402

NAME = "likelihoods_digits"


def spec(quick: bool = False) -> GridSpec:
    """Every objective of ``_likelihoods.OBJECTIVES`` x 3 seeds, three estimators per run."""
    full = _likelihoods.grid(TrainConfig.for_data("digits"), eval_samples=100)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
