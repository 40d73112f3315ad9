r"""The reverse model p_theta around any callable ``net(x_t, t)``.

p_theta(x_{0:T}) = p(x_T) prod_{t=1}^T p_theta(x_{t-1} | x_t) with p(x_T) = N(0, I),
p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) for t = 2..T (Ho et al. eq. 1) and the
decoder p_theta(x_0 | x_1) at t = 1: the same Gaussian for real-valued data, or its discretized
version over K levels for images (eq. 13).

What the network predicts (``prediction``):
  ``eps``  the noise eps (Ho et al. eq. 11); ``x0``  the data x_0; ``mean``  mu_theta itself.
How sigma_t^2 is chosen (``variance``):
  ``fixed_small``     beta_tilde_t;  ``fixed_large``  beta_t;
  ``learned``         the network outputs log sigma_t^2;
  ``learned_range``   the network outputs o, v = (o + 1)/2 and
                      log sigma_t^2 = v log beta_t + (1 - v) log beta_tilde_t (Nichol & Dhariwal eq. 15);
  ``learned_softplus``the network outputs s and sigma_t = softplus(s) (the 1D tutorial's variance net).
Under fixed variances sigma_1^2 at the decoder step is ``decoder_variance``: ``beta1`` (beta_1) or
``beta_tilde2`` (beta_tilde_2, the reference DDPM code's choice since beta_tilde_1 = 0).

With a learned variance the network returns either a pair ``(mean_output, variance_output)`` (two
networks, or two heads) or one tensor with the first event dimension doubled (mean part first),
as a U-Net with 2C output channels does.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from ..parameterization import (check_prediction, eps_from_x0, posterior_mean, x0_from_eps,
                                x0_from_posterior_mean)
from ..schedules import NoiseSchedule
from .discretized import DiscretizedGaussian
from .normal import diag_normal, standard_normal

FIXED_VARIANCES = ("fixed_small", "fixed_large")
LEARNED_VARIANCES = ("learned", "learned_range", "learned_softplus")
VARIANCES = FIXED_VARIANCES + LEARNED_VARIANCES
DECODERS = ("gaussian", "discretized")
DECODER_VARIANCES = ("beta1", "beta_tilde2")


def _check(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


@dataclass
class ReverseOutput:
    """What p_theta says at (x_t, t), every field with the shape of x_t.

    ``prediction`` is the network's raw mean output (eps, x_0 or the mean, by parameterization);
    ``x0`` and ``eps`` are the implied predictions; ``mean`` is mu_theta(x_t, t) and
    ``log_variance`` is log sigma_t^2.
    """

    prediction: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    mean: torch.Tensor
    log_variance: torch.Tensor

    def __getitem__(self, index) -> "ReverseOutput":
        return ReverseOutput(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


class ReverseProcess:
    """p_theta for a network ``net(x_t, t)``; see the module docstring for the options.

    Args:
        net: callable taking x_t (``batch_shape + event_shape``) and integer t (``batch_shape``, the
            training chain's steps in 1..T) and returning the prediction (see module docstring).
        schedule: the forward process the model reverses.
        prediction, variance, decoder, decoder_variance: options named in the module docstring.
        num_levels: K for the discretized decoder (256 for 8-bit data, 17 for the digits).
        event_dims: number of trailing event dimensions of the data (1 for vectors, 3 for images).
        clip_x0: if given, clamp the predicted x_0 to [-clip_x0, clip_x0] (eps and x0 predictions).
        timestep_map: the network's step for each step of ``schedule`` (respaced chains).
    """

    def __init__(self, net: Callable, schedule: NoiseSchedule, *, prediction: str = "eps",
                 variance: str = "fixed_small", decoder: str = "gaussian",
                 decoder_variance: str = "beta1", num_levels: int | None = None,
                 event_dims: int = 1, clip_x0: float | None = None,
                 timestep_map: torch.Tensor | None = None):
        self.net = net
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        self.variance = _check("variance", variance, VARIANCES)
        self.decoder_type = _check("decoder", decoder, DECODERS)
        self.decoder_variance = _check("decoder variance", decoder_variance, DECODER_VARIANCES)
        if decoder == "discretized" and (not isinstance(num_levels, int) or num_levels < 2):
            raise ValueError(f"the discretized decoder needs num_levels >= 2, got {num_levels!r}")
        self.num_levels = num_levels
        self.event_dims = event_dims
        self.clip_x0 = clip_x0
        T = schedule.num_timesteps
        self.timestep_map = (torch.arange(T + 1) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long))
        if self.timestep_map.shape != (T + 1,):
            raise ValueError(f"timestep_map must have length T + 1 = {T + 1}")
        self._fixed_log_variance = self._fixed_table() if variance in FIXED_VARIANCES else None

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def learns_variance(self) -> bool:
        return self.variance in LEARNED_VARIANCES

    def _fixed_table(self) -> torch.Tensor:
        """log sigma_t^2 for t = 0..T under a fixed variance, t = 1 set by ``decoder_variance``."""
        s = self.schedule
        table = (s.log_beta if self.variance == "fixed_large" else s.log_beta_tilde_clipped).clone()
        table[1] = s.log_beta[1] if self.decoder_variance == "beta1" else s.log_beta_tilde_clipped[1]
        return table

    def replace(self, **changes) -> "ReverseProcess":
        """A copy with some constructor arguments changed (the network is shared)."""
        kwargs = dict(prediction=self.prediction, variance=self.variance, decoder=self.decoder_type,
                      decoder_variance=self.decoder_variance, num_levels=self.num_levels,
                      event_dims=self.event_dims, clip_x0=self.clip_x0,
                      timestep_map=self.timestep_map)
        kwargs.update(changes)
        return ReverseProcess(kwargs.pop("net", self.net), kwargs.pop("schedule", self.schedule),
                              **kwargs)

    def respaced(self, kept_steps) -> "ReverseProcess":
        """p_theta on a shorter chain over ``kept_steps`` (see ``NoiseSchedule.respace``)."""
        schedule, kept = self.schedule.respace(kept_steps)
        return self.replace(schedule=schedule, timestep_map=self.timestep_map[kept])

    def with_schedule(self, schedule: NoiseSchedule) -> "ReverseProcess":
        """p_theta run on another schedule: each of its steps is fed to the network as the
        training step of nearest log signal-to-noise ratio, the noise level the network knows."""
        train = torch.log(self.schedule.snr[1:])
        new = torch.log(schedule.snr[1:])
        nearest = (new[:, None] - train[None, :]).abs().argmin(1) + 1
        mapped = self.timestep_map[nearest]
        return self.replace(schedule=schedule, timestep_map=torch.cat([mapped.new_zeros(1), mapped]))

    # -- what the network says ------------------------------------------------------------------

    def _split(self, out):
        if not self.learns_variance:
            if isinstance(out, (tuple, list)):
                raise ValueError(f"variance {self.variance!r} is fixed but the network returned a pair")
            return out, None
        if isinstance(out, (tuple, list)):
            return out[0], out[1]
        dim = out.dim() - self.event_dims
        if out.shape[dim] % 2:
            raise ValueError(f"variance {self.variance!r} is learned: the network must return a pair "
                             f"or a tensor with the first event dimension doubled, got shape "
                             f"{tuple(out.shape)}")
        return out.chunk(2, dim=dim)

    def output(self, xt: torch.Tensor, t: torch.Tensor) -> ReverseOutput:
        """Evaluate the network at (x_t, t) and derive x_0, eps, mu_theta and log sigma_t^2."""
        s, d = self.schedule, self.event_dims
        t = s.check_t(t).to(xt.device).expand(xt.shape[: xt.dim() - d])
        raw = self.net(xt, self.timestep_map.to(xt.device)[t])
        pred, var_out = self._split(raw)
        if pred.shape != xt.shape:
            raise ValueError(f"the network's mean output has shape {tuple(pred.shape)}, expected "
                             f"{tuple(xt.shape)} (the shape of x_t)")
        if self.prediction == "mean":
            mean = pred
            x0 = x0_from_posterior_mean(s, mean, xt, t, d)
        else:
            x0 = pred if self.prediction == "x0" else x0_from_eps(s, xt, t, pred, d)
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            mean = posterior_mean(s, x0, xt, t, d)
        eps = pred if self.prediction == "eps" and self.clip_x0 is None else eps_from_x0(s, xt, t, x0, d)
        return ReverseOutput(prediction=pred, x0=x0, eps=eps, mean=mean,
                             log_variance=self._log_variance(var_out, xt, t))

    def _log_variance(self, var_out, xt, t) -> torch.Tensor:
        s, d = self.schedule, self.event_dims
        if self.variance in FIXED_VARIANCES:
            table = self._fixed_log_variance.to(device=xt.device, dtype=xt.dtype)
            return table[t].reshape(t.shape + (1,) * d).expand_as(xt)
        if var_out.shape != xt.shape:
            raise ValueError(f"the network's variance output has shape {tuple(var_out.shape)}, "
                             f"expected {tuple(xt.shape)}")
        if self.variance == "learned":
            return var_out
        if self.variance == "learned_range":
            v = (var_out + 1) / 2
            return v * s.at("log_beta", t, xt, d) + (1 - v) * s.at("log_beta_tilde_clipped", t, xt, d)
        return 2 * torch.log(F.softplus(var_out).clamp_min(torch.finfo(xt.dtype).tiny))

    # -- the distributions ----------------------------------------------------------------------

    def prior(self, like: torch.Tensor):
        """p(x_T) = N(0, I), with the batch and event shape of ``like``."""
        return standard_normal(like, self.event_dims)

    def transition(self, xt: torch.Tensor, t, *, out: ReverseOutput | None = None,
                   detach_mean: bool = False):
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I), a Gaussian for every t = 1..T.

        ``out`` reuses a network evaluation; ``detach_mean`` stops gradients through mu_theta (the
        hybrid objective trains only the variance through the bound).
        """
        out = self.output(xt, t) if out is None else out
        mean = out.mean.detach() if detach_mean else out.mean
        return diag_normal(mean, log_variance=out.log_variance, event_dims=self.event_dims)

    def decoder(self, x1: torch.Tensor, *, out: ReverseOutput | None = None,
                detach_mean: bool = False):
        """p_theta(x_0 | x_1): the Gaussian transition at t = 1, or its discretization to K levels."""
        if out is None:
            t = torch.ones(x1.shape[: x1.dim() - self.event_dims], dtype=torch.long, device=x1.device)
            out = self.output(x1, t)
        if self.decoder_type == "gaussian":
            return self.transition(x1, None, out=out, detach_mean=detach_mean)
        mean = out.mean.detach() if detach_mean else out.mean
        scale = torch.exp(0.5 * out.log_variance)
        return DiscretizedGaussian(mean, scale, self.num_levels).to_event(self.event_dims)

