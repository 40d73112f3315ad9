"""experiments/mixture1d_mean_variance.py's trajectory-bound system, run from the command line.

The experiment's trajectory cell (separate small mean and variance MLPs, softplus variances, the
Monte Carlo bound over one forward trajectory, T = 250, constant beta = 0.02) is trained with
``pdiff train`` on fewer steps, evaluated with ``pdiff evaluate --json`` and sampled with
``pdiff sample``; the numbers those commands print and write are checked against the system:

- the bound is an upper bound on the model's NLL, whose mean over the data is at least the data
  entropy H, so the paired gap (bound + log p_data(x) per test point) is at least -Z standard
  errors;
- the gap is at most ``MAX_GAP`` (see there);
- the fraction of samples in the right mode (x > 0) is, within Z binomial standard errors, the
  fraction the exact reverse process gives from the prior N(0, 1) (``reverse_right_fraction``:
  0.654, not the data's 2/3, because q(x_T) is not quite N(0, 1) at this T), and each mode's
  samples sit at its centre (+-4) within one component std.

A run that puts all its samples in one mode has a bound about 10 nats above H and a fraction of
0 or 1, so every check fails for it.
"""
import json
import math
from dataclasses import fields, replace

import numpy as np

from experiments.mixture1d_mean_variance import spec
from pdiff import cli
from pdiff.data.toy import mixture1d
from pdiff.schedules import make_schedule
from pdiff.train import TrainConfig
from tests.stats import Z

CENTRE, COMPONENT_STD = 4.0, 1.0  # mixture1d: N(-4, 1) and N(4, 1) with weights 1:2
EVAL_POINTS, SAMPLES = 2000, 2000
# The smoke run: the experiment's trajectory cell, fewer and smaller batches (a minute on one core).
SMOKE = {"objective": "trajectory", "variance": "learned_softplus", "iterations": 1000,
         "batch_size": 64, "train_size": 5000, "test_size": EVAL_POINTS, "log_every": 100,
         "checkpoint_every": 1000}
# The gap this short run must reach, in nats. Seeds 0-4 of it reach 0.07-0.13 (standard error
# 0.02 each), so the worst plus Z standard errors is 0.23. On this schedule the Bayes-optimal
# mean (pdiff evaluate --denoiser oracle) is 0.02 above H with sigma_t^2 = beta_t and 0.29 with
# sigma_t^2 = beta_tilde_t: below 0.25 the variance network must have learned more than the
# posterior's variance, and the mean network the whole mixture (one mode alone is 10 nats above).
MAX_GAP = 0.25


def reverse_right_fraction(cfg: TrainConfig) -> float:
    """P(x_0 > 0) under the exact reverse process started from p(x_T) = N(0, 1): the mean over
    x_T ~ N(0, 1) of q(right component | x_T), where q(x_T | k) = N(sqrt(ab_T) mu_k,
    1 - ab_T + ab_T sigma_k^2) (Gauss-Hermite quadrature). What a model that matches every reverse
    step of q samples; the components lie far enough apart that their overlap at 0 is negligible."""
    data = mixture1d()
    ab = float(make_schedule(cfg.schedule, cfg.timesteps, **cfg.schedule_options()).alpha_bar[-1])
    mu, sd, w = (v.double().numpy().ravel() for v in (data.means, data.stds, data.weights))
    x, h = np.polynomial.hermite_e.hermegauss(80)  # nodes and weights of N(0, 1), up to sqrt(2 pi)
    var = 1 - ab + ab * sd**2
    joint = w * np.exp(-(x[:, None] - math.sqrt(ab) * mu) ** 2 / (2 * var)) / np.sqrt(var)
    posterior_right = joint[:, mu > 0].sum(1) / joint.sum(1)
    return float((h * posterior_right).sum() / h.sum())


def train_args(cfg: TrainConfig) -> list[str]:
    """The ``pdiff train`` options that give ``cfg``: every field that differs from the default."""
    args = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value != f.default:
            args += ["--" + f.name.replace("_", "-"), str(value)]
    return args


def test_train_args_give_the_config_back():
    cfg = replace(spec().base, **SMOKE)
    parsed = cli.build_parser().parse_args(["train", "--out", "x"] + train_args(cfg))
    assert cli._config_from_args(parsed) == cfg


def test_reverse_fraction_is_the_data_weight_once_q_forgets_x0():
    """With alpha_bar_T -> 0 (T = 2000 here: alpha_bar_T = 3e-18) q(x_T) is N(0, 1) and the
    reverse process gives the data's weight 2/3; at the experiment's T = 250 (alpha_bar_T = 0.0064)
    q(x_T) leans towards the heavier mode and the prior N(0, 1) gives it less."""
    base = spec().base
    assert math.isclose(reverse_right_fraction(replace(base, timesteps=2000)), 2 / 3, rel_tol=1e-12)
    assert 0.5 < reverse_right_fraction(base) < 2 / 3 - 0.01


def test_trajectory_bound_from_the_command_line(tmp_path, capsys):
    cfg = replace(spec().base, **SMOKE)
    assert (cfg.data, cfg.net, cfg.timesteps, cfg.schedule) == ("mixture1d", "mean_variance", 250,
                                                               "const")
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--no-progress"] + train_args(cfg)) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(run), "--samples", str(EVAL_POINTS),
                     "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["estimator"] == "all_terms" and report["num_samples"] == EVAL_POINTS
    gap, gap_se = report["gap_nats"], report["gap_stderr"]
    assert gap >= -Z * gap_se, report  # E[bound] >= E[-log p_theta(x)] >= H
    assert gap <= MAX_GAP, report

    samples = tmp_path / "samples.npy"
    assert cli.main(["sample", "--checkpoint", str(run), "--num", str(SAMPLES), "--out",
                     str(samples), "--seed", "0"]) == 0
    x = np.load(samples).ravel()
    assert x.shape == (SAMPLES,) and np.isfinite(x).all()
    right, expected = x > 0, reverse_right_fraction(cfg)
    binomial_se = math.sqrt(expected * (1 - expected) / SAMPLES)
    assert abs(right.mean() - expected) <= Z * binomial_se, (right.mean(), expected)
    # both modes populated, each around its own centre
    assert abs(np.median(x[right]) - CENTRE) <= COMPONENT_STD, np.median(x[right])
    assert abs(np.median(x[~right]) + CENTRE) <= COMPONENT_STD, np.median(x[~right])
