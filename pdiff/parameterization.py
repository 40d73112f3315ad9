r"""Conversions between eps, x_0, v and the posterior mean: pure functions of the schedule.

With x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4), the posterior
mean mu_tilde_t(x_t, x_0) = c0_t x_0 + ct_t x_t (eq. 7) and the velocity
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, "Progressive
distillation", sec. 4 and app. D), any one of eps, x_0, v and mu_tilde determines the others given
x_t. ``t`` has the batch shape of ``xt``; ``event_dims`` is the number of trailing event dimensions
of ``xt``.
"""
from __future__ import annotations

from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "mean", "v")


def check_prediction(name: str) -> str:
    if name not in PREDICTIONS:
        raise ValueError(f"unknown prediction {name!r}; valid: {', '.join(PREDICTIONS)}")
    return name


def xt_from_x0(schedule: NoiseSchedule, x0, t, eps, event_dims: int):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4, the reparameterized marginal)."""
    a = schedule.at("sqrt_alpha_bar", t, x0, event_dims)
    return a * x0 + schedule.at("sqrt_one_minus_alpha_bar", t, x0, event_dims) * eps


def x0_from_eps(schedule: NoiseSchedule, xt, t, eps, event_dims: int):
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (eq. 4 solved for x_0)."""
    a = schedule.at("sqrt_alpha_bar", t, xt, event_dims)
    return (xt - schedule.at("sqrt_one_minus_alpha_bar", t, xt, event_dims) * eps) / a


def eps_from_x0(schedule: NoiseSchedule, xt, t, x0, event_dims: int):
    """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t) (eq. 4 solved for eps)."""
    a = schedule.at("sqrt_alpha_bar", t, xt, event_dims)
    return (xt - a * x0) / schedule.at("sqrt_one_minus_alpha_bar", t, xt, event_dims)


def posterior_mean(schedule: NoiseSchedule, x0, xt, t, event_dims: int):
    """mu_tilde_t(x_t, x_0) = c0_t x_0 + ct_t x_t, the mean of q(x_{t-1} | x_t, x_0) (eq. 7).

    At t = 1 it is x_0 itself (c0_1 = 1, ct_1 = 0).
    """
    c0 = schedule.at("posterior_coef_x0", t, xt, event_dims)
    ct = schedule.at("posterior_coef_xt", t, xt, event_dims)
    return c0 * x0 + ct * xt


def x0_from_posterior_mean(schedule: NoiseSchedule, mean, xt, t, event_dims: int):
    """x_0 = (mu_tilde - ct_t x_t) / c0_t, inverting ``posterior_mean``."""
    c0 = schedule.at("posterior_coef_x0", t, xt, event_dims)
    ct = schedule.at("posterior_coef_xt", t, xt, event_dims)
    return (mean - ct * xt) / c0


def mean_from_eps(schedule: NoiseSchedule, xt, t, eps, event_dims: int):
    """mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) (Ho et al. eq. 11)."""
    b = schedule.at("betas", t, xt, event_dims)
    ab = schedule.at("alpha_bar", t, xt, event_dims)
    a = schedule.at("alphas", t, xt, event_dims)
    return (xt - b / (1 - ab).sqrt() * eps) / a.sqrt()


def v_from_x0_eps(schedule: NoiseSchedule, x0, t, eps, event_dims: int):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4; app. D:
    dx_t/dphi for x_t = cos(phi) x_0 + sin(phi) eps, phi_t = arctan sqrt((1 - alpha_bar_t) /
    alpha_bar_t))."""
    a = schedule.at("sqrt_alpha_bar", t, x0, event_dims)
    return a * eps - schedule.at("sqrt_one_minus_alpha_bar", t, x0, event_dims) * x0


def x0_from_v(schedule: NoiseSchedule, xt, t, v, event_dims: int):
    """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v (Salimans & Ho 2022, sec. 4)."""
    a = schedule.at("sqrt_alpha_bar", t, xt, event_dims)
    return a * xt - schedule.at("sqrt_one_minus_alpha_bar", t, xt, event_dims) * v


def eps_from_v(schedule: NoiseSchedule, xt, t, v, event_dims: int):
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v (Salimans & Ho 2022, app. D)."""
    a = schedule.at("sqrt_alpha_bar", t, xt, event_dims)
    return schedule.at("sqrt_one_minus_alpha_bar", t, xt, event_dims) * xt + a * v


def v_from_x0(schedule: NoiseSchedule, xt, t, x0, event_dims: int):
    """v = (sqrt(alpha_bar_t) x_t - x_0) / sqrt(1 - alpha_bar_t) (``x0_from_v`` solved for v)."""
    a = schedule.at("sqrt_alpha_bar", t, xt, event_dims)
    return (a * xt - x0) / schedule.at("sqrt_one_minus_alpha_bar", t, xt, event_dims)


def v_from_eps(schedule: NoiseSchedule, xt, t, eps, event_dims: int):
    """v = (eps - sqrt(1 - alpha_bar_t) x_t) / sqrt(alpha_bar_t) (``eps_from_v`` solved for v)."""
    a = schedule.at("sqrt_alpha_bar", t, xt, event_dims)
    return (eps - schedule.at("sqrt_one_minus_alpha_bar", t, xt, event_dims) * xt) / a
