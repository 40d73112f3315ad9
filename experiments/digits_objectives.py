"""The published ablations of the objectives at the scale of scikit-learn's 8x8 digits, in bits
per dimension of the discretized bound on the held-out digits.

Ho et al. (2020, Table 2) compare the parameterizations of the mean (the posterior mean mu~
predicted directly, or eps) under the true bound and under L_simple, with a fixed isotropic or a
learned diagonal variance; Nichol & Dhariwal (2021) compare L_simple, L_hybrid (learned range) and
L_vlb with importance-sampled t, linear against cosine. This grid has five eps-prediction
trainings under both schedules and Ho's two mu~-prediction trainings under his linear schedule,
three seeds each (36 runs), T = 1000, the image defaults (a CPU-sized U-Net, 2000 steps, the
discretized decoder over the digits' 17 grey levels):

    simple / fixed_large   / uniform t    / eps    Ho's L_simple
    vlb    / fixed_large   / uniform t    / eps    Ho's true bound, fixed isotropic variance
    vlb    / learned_range / uniform t    / eps    the true bound, learned variance
    vlb    / learned_range / importance t / eps    Nichol & Dhariwal's L_vlb
    hybrid / learned_range / uniform t    / eps    Nichol & Dhariwal's L_hybrid
    vlb    / fixed_large   / uniform t    / mean   Ho's mu~ prediction, fixed variance (linear only)
    vlb    / learned_range / uniform t    / mean   Ho's mu~ prediction, learned variance (linear only)

Ho's learned diagonal variance is taken as Improved DDPM's learned range (the variance pdiff's
image defaults learn). The other cells of objective x variance x sampler x prediction are left
out: L_simple does not train a variance and with a fixed one L_hybrid trains exactly as L_simple
(its bound term has no gradient), importance sampling is the L_vlb recipe, and Ho's mu~ rows are
under the true bound with the linear schedule. What the published trends predict is in
../shared/REFERENCE.md and, beside the measured table, in docs/results.md.

Run from the repository root (36 runs of 2000 steps: about 2.5 CPU hours, 97 min measured on 2
cores; see experiments/README.md)::

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
    """The seven trainings of the docstring x 3 seeds on the digits, T = 1000."""
    base = TrainConfig.for_data("digits", timesteps=1000)
    full = GridSpec(base=base,
                    axes={"objective": ("simple", "hybrid", "vlb"),
                          "variance": ("fixed_large", "learned_range"),
                          "sampler": ("uniform", "importance"),
                          "schedule": ("linear", "cosine"),
                          "prediction": ("eps", "mean")},
                    exclude=({"objective": "simple", "variance": "learned_range"},
                             {"objective": "hybrid", "variance": "fixed_large"},
                             {"objective": "simple", "sampler": "importance"},
                             {"objective": "hybrid", "sampler": "importance"},
                             {"variance": "fixed_large", "sampler": "importance"},
                             {"prediction": "mean", "objective": "simple"},
                             {"prediction": "mean", "objective": "hybrid"},
                             {"prediction": "mean", "sampler": "importance"},
                             {"prediction": "mean", "schedule": "cosine"}),
                    seeds=(0, 1, 2), eval_samples=300, metric_samples=0)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
