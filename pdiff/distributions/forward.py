r"""The forward process q as distributions.

Shapes: data ``x`` has shape ``batch_shape + event_shape`` with ``event_dims = len(event_shape)``
(1 for vectors, 3 for images); ``t`` holds steps in 1..T and broadcasts to ``batch_shape``. Every
function returns a ``Distribution`` with that ``batch_shape`` and ``event_shape``, so ``log_prob``
and ``kl_divergence`` come out per example.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ..parameterization import posterior_mean
from ..schedules import NoiseSchedule
from .normal import diag_normal


def _steps(schedule: NoiseSchedule, t, x: torch.Tensor, event_dims: int) -> torch.Tensor:
    t = schedule.check_t(t).to(x.device)
    return t.expand(x.shape[: x.dim() - event_dims])


def q_step(schedule: NoiseSchedule, x_prev: torch.Tensor, t, *, event_dims: int = 1):
    """q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. eq. 2)."""
    t = _steps(schedule, t, x_prev, event_dims)
    a = schedule.at("alphas", t, x_prev, event_dims)
    return diag_normal(a.sqrt() * x_prev, 1 - a, event_dims=event_dims)


def q_marginal(schedule: NoiseSchedule, x0: torch.Tensor, t, *, event_dims: int = 1):
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4)."""
    t = _steps(schedule, t, x0, event_dims)
    ab = schedule.at("alpha_bar", t, x0, event_dims)
    return diag_normal(ab.sqrt() * x0, 1 - ab, event_dims=event_dims)


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t, *,
                event_dims: int = 1):
    """q(x_{t-1} | x_t, x_0) = N(mu_tilde_t(x_t, x_0), beta_tilde_t I) for t = 2..T (eqs. 6-7).

    At t = 1 the posterior is a point mass at x_0 (beta_tilde_1 = 0) and has no density: refused.
    """
    t = _steps(schedule, t, xt, event_dims)
    if t.numel() and int(t.min()) < 2:
        raise ValueError("q(x_{t-1} | x_t, x_0) has a density only for t = 2..T "
                         "(at t = 1 it is a point mass at x_0)")
    var = schedule.at("beta_tilde", t, xt, event_dims)
    return diag_normal(posterior_mean(schedule, x0, xt, t, event_dims), var, event_dims=event_dims)


class ForwardChain(dist.TorchDistribution):
    r"""The whole forward chain q(x_{1:T} | x_0) = prod_{t=1}^T q(x_t | x_{t-1}) (eq. 2).

    A value is a trajectory of shape ``batch_shape + (T,) + event_shape`` whose index ``t - 1`` along
    the time axis holds x_t. ``batch_shape`` is that of ``x0``; the event is the whole trajectory.
    """

    arg_constraints = {"x0": constraints.real}
    support = constraints.real
    has_rsample = True

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor, *, event_dims: int = 1,
                 validate_args=None):
        self.schedule, self.x0, self.event_dims = schedule, x0, event_dims
        batch_shape = x0.shape[: x0.dim() - event_dims]
        data_shape = x0.shape[x0.dim() - event_dims:]
        event_shape = torch.Size((schedule.num_timesteps,)) + data_shape
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        x0 = self.x0.expand(batch_shape + self.x0.shape[self.x0.dim() - self.event_dims:])
        return ForwardChain(self.schedule, x0, event_dims=self.event_dims)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        """The recursion x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps_t (t = 1..T) unrolled:
        x_t = sqrt(alpha_bar_t) (x_0 + sum_{s<=t} sqrt(beta_s / alpha_bar_s) eps_s), one cumulative
        sum over t (accumulated in float64) instead of a loop. The T noise draws come time-major."""
        shape = torch.Size(sample_shape) + self.x0.shape
        T, device = self.schedule.num_timesteps, self.x0.device
        eps = torch.randn((T,) + shape, dtype=self.x0.dtype, device=device, generator=generator)
        alpha_bar = self.schedule.tensor("alpha_bar", device, torch.float64)[1:]
        betas = self.schedule.tensor("betas", device, torch.float64)[1:]
        along_t = (T,) + (1,) * len(shape)
        total = torch.cumsum(eps.double() * (betas / alpha_bar).sqrt().reshape(along_t), 0)
        x = ((total + self.x0.double()) * alpha_bar.sqrt().reshape(along_t)).to(self.x0.dtype)
        return x.movedim(0, len(shape) - self.event_dims).contiguous()  # time axis before the event

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def log_prob(self, trajectory: torch.Tensor) -> torch.Tensor:
        """sum_{t=1}^T log q(x_t | x_{t-1}) with x_0 the conditioning data, shape ``batch_shape``."""
        if self._validate_args:
            self._validate_sample(trajectory)
        time_axis = trajectory.dim() - self.event_dims - 1
        xt = trajectory
        x_prev = torch.cat([self.x0.expand_as(xt.select(time_axis, 0)).unsqueeze(time_axis),
                            xt.narrow(time_axis, 0, xt.shape[time_axis] - 1)], dim=time_axis)
        t = torch.arange(1, self.schedule.num_timesteps + 1, device=xt.device)
        t = t.expand(xt.shape[: time_axis + 1])  # (..., T)
        return q_step(self.schedule, x_prev, t, event_dims=self.event_dims).log_prob(xt).sum(-1)
