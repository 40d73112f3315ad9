r"""The reverse model p_theta around any callable ``net(x_t, t)``.

p_theta(x_{0:T}) = p(x_T) prod_{t=1}^T p_theta(x_{t-1} | x_t) with p(x_T) = N(0, I),
p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) for t = 2..T (Ho et al. eq. 1) and the
decoder p_theta(x_0 | x_1) at t = 1: the same Gaussian for real-valued data, or its discretized
version over K levels for images (eq. 13).

What the network predicts (``prediction``):
  ``eps``  the noise eps (Ho et al. eq. 11); ``x0``  the data x_0; ``mean``  mu_theta itself;
  ``v``    the velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022).
Under eps, x0 and v the mean is mu_tilde_t(x_t, x0_hat) (eq. 7) at the implied x0_hat.
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

from typing import Callable

import torch
import torch.nn.functional as F

from ..parameterization import (check_prediction, eps_from_v, eps_from_x0, posterior_mean,
                                x0_from_eps, x0_from_posterior_mean, x0_from_v)
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


class ReverseOutput:
    """What p_theta says at (x_t, t), every tensor with the shape of x_t.

    ``prediction`` is the network's raw mean output (eps, x_0, v or the mean, by parameterization);
    ``x0`` and ``eps`` are the implied predictions; ``mean`` is mu_theta(x_t, t) and
    ``log_variance`` is log sigma_t^2. Those four are derived on first use, so a loss that needs
    only the prediction (L_simple) costs the network and nothing more. Indexing selects examples.
    """

    def __init__(self, model: "ReverseProcess", xt: torch.Tensor, t: torch.Tensor,
                 prediction: torch.Tensor, variance_output: torch.Tensor | None):
        self.model, self.xt, self.t = model, xt, t
        self.prediction, self.variance_output = prediction, variance_output
        self._x0 = self._mean = self._eps = self._log_variance = None  # derived on first use

    def __getitem__(self, index) -> "ReverseOutput":
        v = self.variance_output
        return ReverseOutput(self.model, self.xt[index], self.t[index], self.prediction[index],
                             None if v is None else v[index])

    @property
    def x0(self) -> torch.Tensor:
        if self._x0 is None:
            m, s, d = self.model, self.model.schedule, self.model.event_dims
            if m.prediction == "mean":
                x0 = x0_from_posterior_mean(s, self.mean, self.xt, self.t, d)
            else:
                if m.prediction == "x0":
                    x0 = self.prediction
                elif m.prediction == "eps":
                    x0 = x0_from_eps(s, self.xt, self.t, self.prediction, d)
                else:
                    x0 = x0_from_v(s, self.xt, self.t, self.prediction, d)
                x0 = x0 if m.clip_x0 is None else x0.clamp(-m.clip_x0, m.clip_x0)
            self._x0 = x0
        return self._x0

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            m = self.model
            self._mean = (self.prediction if m.prediction == "mean"
                          else posterior_mean(m.schedule, self.x0, self.xt, self.t, m.event_dims))
        return self._mean

    @property
    def eps(self) -> torch.Tensor:
        if self._eps is None:
            m = self.model
            if m.clip_x0 is None and m.prediction == "eps":
                self._eps = self.prediction
            elif m.clip_x0 is None and m.prediction == "v":
                # directly: through x_0 would divide by sqrt(1 - alpha_bar_t), small at t = 1
                self._eps = eps_from_v(m.schedule, self.xt, self.t, self.prediction, m.event_dims)
            else:
                self._eps = eps_from_x0(m.schedule, self.xt, self.t, self.x0, m.event_dims)
        return self._eps

    @property
    def log_variance(self) -> torch.Tensor:
        if self._log_variance is None:
            self._log_variance = self.model._log_variance(self.variance_output, self.xt, self.t)
        return self._log_variance


class _MeanOutput:
    """The mean part of a learned-variance model's network output (``with_variance``); other
    attributes (``num_classes``) are the network's."""

    def __init__(self, model: "ReverseProcess"):
        self.model = model

    def __call__(self, xt, t, *args):
        return self.model._split(self.model.net(xt, t, *args))[0]

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model.net, name)


class ReverseProcess:
    """p_theta for a network ``net(x_t, t)``; see the module docstring for the options.

    Args:
        net: callable taking x_t (``batch_shape + event_shape``) and integer t (``batch_shape``, the
            training chain's steps in 1..T) and returning the prediction (see module docstring).
        schedule: the forward process the model reverses.
        prediction, variance, decoder, decoder_variance: options named in the module docstring.
        num_levels: K for the discretized decoder (256 for 8-bit data, 17 for the digits).
        event_dims: number of trailing event dimensions of the data (1 for vectors, 3 for images).
        clip_x0: if given, clamp the predicted x_0 to [-clip_x0, clip_x0] (eps, x0 and v
            predictions; eps and the mean then follow from the clamped x_0).
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
        # the identity map (an unrespaced chain) is skipped: no gather per network call
        self._maps = {} if not torch.equal(self.timestep_map, torch.arange(T + 1)) else None
        self._fixed_log_variance = self._fixed_table() if variance in FIXED_VARIANCES else None
        self._fixed_cache: dict = {}

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

    def with_variance(self, variance: str) -> "ReverseProcess":
        """p_theta with the same mean and sigma_t^2 fixed to ``variance`` (``fixed_small``: beta_tilde_t,
        ``fixed_large``: beta_t), e.g. to sample a learned-variance model with Ho et al.'s choices;
        a learned variance's output is dropped."""
        _check("sampling variance", variance, FIXED_VARIANCES)
        net = _MeanOutput(self) if self.learns_variance else self.net
        return self.replace(net=net, variance=variance)

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
        """Evaluate the network at (x_t, t); x_0, eps, mu_theta and log sigma_t^2 follow from it."""
        t = self.schedule.check_t(t).to(xt.device).expand(xt.shape[: xt.dim() - self.event_dims])
        return self._output(xt, t)

    def _output(self, xt: torch.Tensor, t: torch.Tensor) -> ReverseOutput:
        """``output`` for steps ``t`` already checked, a long tensor of x_t's batch shape."""
        raw = self.net(xt, t if self._maps is None else self._network_steps(t))
        pred, var_out = self._split(raw)
        if pred.shape != xt.shape:
            raise ValueError(f"the network's mean output has shape {tuple(pred.shape)}, expected "
                             f"{tuple(xt.shape)} (the shape of x_t)")
        if var_out is not None and var_out.shape != xt.shape:
            raise ValueError(f"the network's variance output has shape {tuple(var_out.shape)}, "
                             f"expected {tuple(xt.shape)}")
        return ReverseOutput(self, xt, t, pred, var_out)

    def _network_steps(self, t: torch.Tensor) -> torch.Tensor:
        """The network's steps on a respaced chain: ``timestep_map[t]`` (the map kept per
        device)."""
        if t.device not in self._maps:
            self._maps[t.device] = self.timestep_map.to(t.device)
        return self._maps[t.device][t]

    def _log_variance(self, var_out, xt, t) -> torch.Tensor:
        s, d = self.schedule, self.event_dims
        if self.variance in FIXED_VARIANCES:
            key = (xt.device, xt.dtype)
            if key not in self._fixed_cache:
                self._fixed_cache[key] = self._fixed_log_variance.to(xt.device, xt.dtype)
            table = self._fixed_cache[key]
            return table.index_select(0, t.reshape(-1)).reshape(t.shape + (1,) * d).expand_as(xt)
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
                   detach_mean: bool = False, validate_args: bool | None = None):
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I), a Gaussian for every t = 1..T.

        ``out`` reuses a network evaluation; ``detach_mean`` stops gradients through mu_theta (the
        hybrid objective trains only the variance through the bound); ``validate_args`` as in
        ``torch.distributions`` (the bound's hot paths pass False: sigma_t = exp(...) > 0 always).
        """
        out = self.output(xt, t) if out is None else out
        mean = out.mean.detach() if detach_mean else out.mean
        return diag_normal(mean, log_variance=out.log_variance, event_dims=self.event_dims,
                           validate_args=validate_args)

    def decoder(self, x1: torch.Tensor, *, out: ReverseOutput | None = None,
                detach_mean: bool = False, validate_args: bool | None = None):
        """p_theta(x_0 | x_1): the Gaussian transition at t = 1, or its discretization to K levels.

        ``validate_args`` as in ``torch.distributions`` (the discretized decoder then checks that
        x_0 lies on its K levels)."""
        if out is None:
            t = torch.ones(x1.shape[: x1.dim() - self.event_dims], dtype=torch.long, device=x1.device)
            out = self.output(x1, t)
        if self.decoder_type == "gaussian":
            return self.transition(x1, None, out=out, detach_mean=detach_mean,
                                   validate_args=validate_args)
        mean = out.mean.detach() if detach_mean else out.mean
        scale = torch.exp(0.5 * out.log_variance)
        return DiscretizedGaussian(mean, scale, self.num_levels,
                                   validate_args=validate_args).to_event(self.event_dims)

