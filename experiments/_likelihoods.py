"""What the three likelihood studies share (``likelihoods_*.py``): the weighted-loss family of
Kingma & Gao (2023) and the continuous-time bound of VDM as objectives, each run's likelihood
estimated three ways on the same test points: the discrete bound at T = 1000, the continuous-time
bound on the same schedule, and the probability-flow ODE (issue 16's measured table)."""
from __future__ import annotations

from dataclasses import replace

from pdiff.compare import GridSpec
from pdiff.train import TrainConfig

# the weightings w(lambda) of the ELBO's integrand (pdiff.weighting) and VDM's continuous bound
OBJECTIVES = ("elbo", "simple", "snr", "min_snr", "p2", "edm", "continuous")


def grid(base: TrainConfig, eval_samples: int) -> GridSpec:
    """Every objective x 3 seeds on ``base``: v-prediction (every weighting is well scaled at both
    ends of the chain with it: the eps error of an x_0 loss is divided by SNR_t, which an eps
    network makes huge at t = T), the posterior's variance (the bound the weightings reweight,
    and the one the continuous bound is the limit of), the estimators beside the bound."""
    base = replace(base, prediction="v", variance="fixed_small", timesteps=1000,
                   schedule="linear", embedding="sinusoidal")
    return GridSpec(base=base, axes={"objective": OBJECTIVES}, seeds=(0, 1, 2),
                    eval_samples=eval_samples, metric_samples=0,
                    likelihoods=("continuous", "ode"))
