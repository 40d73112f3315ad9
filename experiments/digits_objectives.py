"""The published ablations of the objectives at the scale of scikit-learn's 8x8 digits, in bits
per dimension of the discretized bound on the held-out digits.

Ho et al. (2020, Table 2) compare the true bound with L_simple under a fixed variance and the true
bound with a learned diagonal one; Nichol & Dhariwal (2021) compare L_simple, L_hybrid (learned
range) and L_vlb with importance-sampled t, linear against cosine. This grid has those five
trainings, each under both schedules, three seeds each (30 runs), T = 1000, the image defaults
(a CPU-sized U-Net, 2000 steps, the discretized decoder over the digits' 17 grey levels):

    simple / fixed_large / uniform t        Ho's L_simple
    vlb    / fixed_large / uniform t        Ho's true bound, fixed isotropic variance
    vlb    / learned_range / uniform t      the true bound, learned variance
    vlb    / learned_range / importance t   Nichol & Dhariwal's L_vlb
    hybrid / learned_range / uniform t      Nichol & Dhariwal's L_hybrid

The other cells of objective x variance x sampler are left out: L_simple does not train a variance
and with a fixed one L_hybrid trains exactly as L_simple (its bound term has no gradient), and
importance sampling is the L_vlb recipe. What the published trends predict is in
../shared/REFERENCE.md and, beside the measured table, in docs/results.md.

Run from the repository root (30 runs of 2000 steps: about 2.5 CPU hours, 80 min on 2 cores; see
experiments/README.md)::

    python experiments/digits_objectives.py --out runs/digits_objectives
    python experiments/digits_objectives.py --quick --out /tmp/digits  # smoke run
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python experiments/digits_objectives.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import _common  # noqa: E402
from pdiff.compare import GridSpec  # noqa: E402
from pdiff.train import TrainConfig  # noqa: E402

NAME = "digits_objectives"


def spec(quick: bool = False) -> GridSpec:
    """The five trainings of the docstring x {linear, cosine} x 3 seeds on the digits, T = 1000."""
    base = TrainConfig.for_data("digits", timesteps=1000)
    full = GridSpec(base=base,
                    axes={"objective": ("simple", "hybrid", "vlb"),
                          "variance": ("fixed_large", "learned_range"),
                          "sampler": ("uniform", "importance"),
                          "schedule": ("linear", "cosine")},
                    exclude=({"objective": "simple", "variance": "learned_range"},
                             {"objective": "hybrid", "variance": "fixed_large"},
                             {"objective": "simple", "sampler": "importance"},
                             {"objective": "hybrid", "sampler": "importance"},
                             {"variance": "fixed_large", "sampler": "importance"}),
                    seeds=(0, 1, 2), eval_samples=300, metric_samples=0)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
