"""The 2D tutorial's 8 clusters under the linear and the quadratic schedule.

Reproduces the tutorial's setting: the 8 clusters (centres (0, +-1), (+-1, 0), (+-0.5, +-0.5), all
times 4, std 0.1; entropy about 0.29 nats) in their own units, T = 250, an MLP with a sinusoidal
time embedding, trained on the hybrid loss. The grid crosses the schedule with the variance
(fixed_small, fixed_large, learned_range), three seeds each. Both schedules run from beta_1 = 4e-4
to beta_T = 0.08, set explicitly below: DDPM's 1e-4 and 0.02 at T = 1000 scaled by 1000/T = 4 as
in Improved DDPM, so that 250 steps destroy the data as DDPM's 1000 do. The linear schedule
spaces beta_t evenly (alpha_bar_T = 3.3e-5, prior term L_T = 2e-4 nats), the quadratic spaces
sqrt(beta_t) evenly (alpha_bar_T = 6.3e-4, L_T = 0.004 nats); DDPM's unscaled ends would leave
alpha_bar_T = 0.08 and 0.16 and L_T = 0.5 and 1.0 nats. With a fixed variance the hybrid loss
trains exactly as L_simple (its bound term has no gradient: the mean is detached inside it and the
variance is fixed), so the fixed-variance rows are the tutorial's L_simple runs and learned_range
is Nichol & Dhariwal's.

Figures (``figures/`` in ``--out``) include the reverse-trajectory animation of each cell's first
seed, ``reverse_<schedule>-<variance>.gif``: 1000 samples going from x_T to x_0 over the data.

Run from the repository root (about 3 minutes on 2 idle CPU cores, twice that on a shared machine;
see experiments/README.md)::

    python experiments/clusters8_schedules.py --out runs/clusters8_schedules
    python experiments/clusters8_schedules.py --quick --out /tmp/clusters8  # smoke run
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python experiments/clusters8_schedules.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import _common  # noqa: E402
from pdiff.compare import GridSpec  # noqa: E402
from pdiff.train import TrainConfig  # noqa: E402

NAME = "clusters8_schedules"
# the schedules' ends at T = 250: DDPM's (1e-4, 0.02) at T = 1000 times 1000/T (Improved DDPM)
TIMESTEPS = 250
BETA_START, BETA_END = 1e-4 * 1000 / TIMESTEPS, 0.02 * 1000 / TIMESTEPS


def spec(quick: bool = False) -> GridSpec:
    """The grid: schedule x variance x 3 seeds on the 8 clusters, T = 250 (beta from 4e-4 to 0.08),
    hybrid loss."""
    base = TrainConfig(data="clusters8", objective="hybrid", timesteps=TIMESTEPS,
                       beta_start=BETA_START, beta_end=BETA_END, net="mlp", embedding="sinusoidal",
                       iterations=3000, batch_size=256, train_size=20_000, test_size=2000)
    full = GridSpec(base=base,
                    axes={"schedule": ("linear", "quadratic"),
                          "variance": ("fixed_small", "fixed_large", "learned_range")},
                    seeds=(0, 1, 2), eval_samples=2000, metric_samples=1000)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
