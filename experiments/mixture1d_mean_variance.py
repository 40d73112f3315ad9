"""The 1D tutorial's mixture with separate small mean and variance networks trained on the bound.

Reproduces the tutorial's system: the mixture of N(-4, 1) and N(4, 1) with weights 1:2 (entropy
2.056 nats) in its own units, T = 250 with a constant beta = 0.02, and two small MLPs (2 hidden
layers of 32 units each, a sinusoidal time embedding), one for the mean (predicting eps) and one
for the variance (``net mean_variance``), trained on the bound. The grid crosses the objective
(trajectory: the tutorial's own, the Monte Carlo bound over one sampled forward trajectory
x_{1:T} ~ q(x_{1:T} | x_0), both networks trained by it; vlb: the same bound estimated from one
analytic KL term at a uniform t; hybrid: L_simple trains the mean network and the bound only the
variance network) with the variance's parameterization (learned_softplus: the tutorial's sigma_t =
softplus(output); learned_range: Nichol & Dhariwal's interpolation between log beta_t and
log beta_tilde_t), three seeds each.

What differs from the tutorial: the networks' exact sizes and training length are ours (batches
of 128 for 4000 Adam steps at lr 2e-3, the trainer's gradient clipping, warm-up and EMA), the
bound is evaluated term by term (analytic KLs) on 2000 held-out points rather than by the
trajectory estimator, and the grid adds the vlb and hybrid objectives and the learned_range
variance beside the tutorial's trajectory bound with softplus variances.

Measured (seed 0 of each cell): the trajectory bound reaches 2.11 nats, 0.03 above the entropy,
with both modes sampled (65.0% of 20,000 samples at +4); vlb and hybrid 0.06-0.14 above. The
modes' weight is not 2/3 even for a perfect model: at this T, alpha_bar_T = 0.0064 and q(x_T) is
not quite the prior N(0, 1), from which the exact reverse process puts 65.4% at +4
(tests/test_experiment_mixture1d.py). A trajectory run costs 3-4 CPU minutes (the network
at all 250 steps of 128 trajectories per step), a vlb or hybrid run 15 CPU seconds.

One run of the grid from pdiff's command line (the trajectory bound with softplus variances)::

    pdiff train --data mixture1d --net mean_variance --objective trajectory \\
        --variance learned_softplus --schedule const --const-beta 0.02 --timesteps 250 \\
        --hidden 32 --depth 2 --batch-size 128 --iterations 4000 --train-size 20000 \\
        --test-size 2000 --out runs/m1
    pdiff evaluate --checkpoint runs/m1 --samples 2000 --json
    pdiff sample --checkpoint runs/m1 --num 2000 --out runs/m1_samples.npy

The whole grid, from the repository root (about 25 CPU minutes, most of it the six trajectory
runs; see experiments/README.md)::

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
    """The grid: objective x variance x 3 seeds on the 1D mixture, T = 250, constant beta, two
    small MLPs."""
    base = TrainConfig(data="mixture1d", net="mean_variance", timesteps=250, schedule="const",
                       const_beta=0.02, hidden=32, depth=2, embedding="sinusoidal",
                       iterations=4000, batch_size=128, lr=2e-3, train_size=20_000,
                       test_size=2000)
    full = GridSpec(base=base,
                    axes={"objective": ("trajectory", "vlb", "hybrid"),
                          "variance": ("learned_softplus", "learned_range")},
                    seeds=(0, 1, 2), eval_samples=2000, metric_samples=1000)
    return _common.quick(full) if quick else full


def main(argv: list[str] | None = None) -> int:
    return _common.main(NAME, __doc__, spec, argv)


if __name__ == "__main__":
    sys.exit(main())
