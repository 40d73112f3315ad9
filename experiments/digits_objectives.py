"""The published ablations of the objectives at the scale of scikit-learn's 8x8 digits: L_simple,
L_hybrid and L_vlb, fixed against learned variances, the linear against the cosine schedule, each
in bits per dimension of the discretized bound on the held-out digits.

Ho et al. (2020, Table 2) compare the true bound with L_simple under fixed and learned variances;
Nichol & Dhariwal (2021) compare L_simple, L_hybrid and L_vlb with learned_range variances and the
linear against the cosine schedule. This grid crosses objective {simple, hybrid, vlb} with
variance {fixed_large, learned_range} and schedule {linear, cosine}, three seeds each, T = 1000,
a CPU-sized U-Net and the discretized decoder over the digits' 17 grey levels. (L_vlb here samples
t uniformly; Nichol & Dhariwal's best L_vlb numbers use importance-sampled t, ``sampler
importance``.) What the published trends predict is in ../shared/REFERENCE.md and, beside the
measured table, in docs/results.md.

Run from the repository root (36 runs of 2000 steps: about three CPU hours; see experiments/README.md)::

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
    """objective x variance x schedule x 3 seeds on the digits, T = 1000, the image defaults."""
    base = TrainConfig.for_data("digits", timesteps=1000)
    full = GridSpec(base=base,
                    axes={"objective": ("simple", "hybrid", "vlb"),
                          "variance": ("fixed_large", "learned_range"),
                          "schedule": ("linear", "cosine")},
                    seeds=(0, 1, 2), eval_samples=300, metric_samples=0)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
