r"""Training objectives and timestep samplers.

Every objective has the signature ``loss(model, x0, *, sampler, generator, **options) -> LossOutput``
and returns a per-example loss (average it over the batch to train):

- ``simple``: the mean over dimensions of ||target - prediction||^2 where the target is what the
  network predicts (eps for the eps parameterization: Ho et al.'s L_simple, eq. 14; x_0, the
  posterior mean or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 otherwise; the v loss is
  Salimans & Ho's, an x_0 loss weighted by SNR_t + 1). It does not train a learned variance.
- ``vlb``: the bound estimator L_T + T w_t L_{t-1} (nats per example; see ``elbo.sampled_bound``).
- ``hybrid``: simple + lambda T w_t L_{t-1} / (D ln 2) with mu_theta detached inside the bound term,
  lambda = 0.001 (Nichol & Dhariwal sec. 3.1: the bound term in bits per dimension, so it trains
  only the variance).
- ``trajectory``: the Monte Carlo bound over one forward trajectory (``elbo.trajectory_bound``).
- ``continuous``: the continuous-time bound of Variational Diffusion Models (``continuous_loss``,
  the network trained at real times u; option ``log_snr``, a ``continuous.LearnedLogSNR``).

The weighted losses of Kingma & Gao (2023), each a per-step weight c_t on the eps error (see
``weighting``, which derives every c_t and its implied weighting w(lambda)), with t from ``sampler``
(uniform: t ~ U{1..T}; the importance sampler's weights 1 / (T p_t) keep every loss unbiased):

- ``elbo``: L_T + T 1/2 Delta_t ||eps - eps_hat||^2 summed over dimensions (w(lambda) = 1;
  Delta_t = SNR_{t-1} / SNR_t - 1), with T L_0 (the decoder's -log p_theta(x_0 | x_1), as in
  ``vlb``) at t = 1: nats per example. It is the bound estimator exactly for ``fixed_small``; for
  other variances its terms t >= 2 are those of the same mean with sigma_t^2 = beta_tilde_t.
- ``snr``: the x_0-MSE, c_t = 1 / SNR_t (mean over dimensions, as ``simple``).
- ``min_snr``: Min-SNR-gamma, c_t = min(SNR_t, gamma) / SNR_t; option ``gamma`` = 5.
- ``p2``: P2 weighting, c_t = (k + SNR_t)^-gamma; options ``k`` = 1, ``gamma`` = 1.
- ``edm``: EDM's log-normal noise levels and loss weight as a weight over uniform t; options
  ``p_mean`` = -1.2, ``p_std`` = 1.2, ``sigma_data`` = 0.5.

They take the error of the network's implied eps (``ReverseOutput.eps``), so they train every
prediction (eps, x0, v, mean) as the same function of eps_hat. ``snr``, ``min_snr``, ``p2`` and
``edm`` do not train a learned variance (as ``simple``); under ``elbo`` only the t = 1 decoder term
reaches it. An unknown option raises ``ValueError`` naming the valid ones (the four original
objectives ignore options they do not take).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .distributions.reverse import ReverseProcess
from .continuous import ContinuousDenoiser, DiscreteLogSNR, LearnedLogSNR, alpha_sigma
from .elbo import _step_term, prior_term, sample_xt, trajectory_bound
from .parameterization import posterior_mean, v_from_x0_eps
from .weighting import step_weights_like

OBJECTIVES = ("simple", "vlb", "hybrid", "trajectory", "elbo", "snr", "min_snr", "p2", "edm",
              "continuous")
# the objectives that give a learned variance no gradient (a separate variance network is unused)
MEAN_ONLY_OBJECTIVES = ("simple", "snr", "min_snr", "p2", "edm")
SAMPLERS = ("uniform", "importance")


@dataclass
class LossOutput:
    """``loss``: per-example loss (N,); ``t`` and ``term``: the sampled steps and what the importance
    sampler tracks there, the bound terms (nats) or, for the weighted eps losses, the per-step loss
    c_t ||eps - eps_hat||^2 (``None`` where the objective samples no single t)."""

    loss: torch.Tensor
    t: torch.Tensor | None = None
    term: torch.Tensor | None = None


# -- timestep samplers -------------------------------------------------------------------------

class UniformSampler:
    """t ~ U{1..T}, weights 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probs(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, n: int, device=None, generator: torch.Generator | None = None):
        """(t, w): n steps in 1..T drawn with ``probs`` and their weights 1 / (T p_t) (here 1).

        The draw happens on the generator's device (the CPU without one), so a CUDA generator
        costs no copy between host and device."""
        where = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(1, self.num_timesteps + 1, (n,), generator=generator, device=where)
        return t.to(device), torch.ones(n, device=device, dtype=torch.get_default_dtype())

    def update(self, t: torch.Tensor, term: torch.Tensor) -> None:
        """Uniform sampling keeps no statistics."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ImportanceSampler(UniformSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last ``history`` values of each term, uniform until
    every t has ``history`` values, mixed with ``uniform_prob`` of uniform (Nichol & Dhariwal sec. 3.3).

    The history lives on the device of the terms it is given (no copy to the host per step) and is
    saved on the CPU.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history, self.uniform_prob = history, uniform_prob
        self.values = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probs(self) -> torch.Tensor:
        """Uniform before the warm-up, then the mixture; chosen on the device, with no wait."""
        warm = (self.counts >= self.history).all()
        rms = (self.values**2).mean(-1).sqrt()
        p = rms / rms.sum()  # NaN while every history is empty: not chosen then
        p = p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.where(warm, p, super().probs().to(p.device))

    def sample(self, n: int, device=None, generator: torch.Generator | None = None):
        """(t, w) as ``UniformSampler.sample``, with p_t from ``probs`` and w = 1 / (T p_t)."""
        where = generator.device if generator is not None else torch.device("cpu")
        p = self.probs().to(where)
        idx = torch.multinomial(p, n, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[idx])
        return (idx + 1).to(device), weights.to(device=device, dtype=torch.get_default_dtype())

    def update(self, t: torch.Tensor, term: torch.Tensor) -> None:
        """Record the bound terms ``term`` (nats) observed at steps ``t``, in order: each step keeps
        its last ``history`` values, oldest first. Vectorized over the batch, several entries of
        one step included."""
        T, H = self.num_timesteps, self.history
        i = t.detach().reshape(-1) - 1
        device = i.device
        if self.values.device != device:
            self.values, self.counts = self.values.to(device), self.counts.to(device)
        value = term.detach().reshape(-1).to(torch.float64)
        added = torch.zeros(T, dtype=torch.long, device=device).scatter_add_(
            0, i, torch.ones_like(i))  # (T,) new values per step (bincount would wait on a GPU)
        length = self.counts + added  # old and new values, in order
        kept = length.clamp(max=H)
        shift = length - kept  # how many of the oldest fall out
        # old values move left by `shift`; a slot past the old ones is filled below or stays 0
        src = torch.arange(H, device=device) + shift[:, None]  # (T, H)
        values = torch.where(src < self.counts[:, None],
                             self.values.gather(1, src.clamp(max=H - 1)), 0.0)
        # rank of each new value among its step's new values, in batch order
        order = torch.sort(i, stable=True).indices
        first = torch.cumsum(added, 0) - added  # position of each step's first entry once sorted
        rank = torch.empty_like(i)
        rank[order] = torch.arange(i.numel(), device=device) - first[i[order]]
        from_end = added[i] - 1 - rank  # 0 for the newest value of its step
        column = kept[i] - 1 - from_end
        column = torch.where(from_end < H, column, H)  # dropped values go to a spare column
        values = torch.cat([values, values.new_zeros(T, 1)], 1)
        values[i, column] = value
        self.values, self.counts = values[:, :H].contiguous(), kept

    def state_dict(self) -> dict:
        return {"values": self.values.cpu().clone(), "counts": self.counts.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.counts = state["values"].clone(), state["counts"].clone()


def make_sampler(name: str, num_timesteps: int) -> UniformSampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return ImportanceSampler(num_timesteps) if name == "importance" else UniformSampler(num_timesteps)


# -- objectives --------------------------------------------------------------------------------

def _mean_over_event(x: torch.Tensor, event_dims: int) -> torch.Tensor:
    return x.flatten(x.dim() - event_dims).mean(-1)


def _squared_error(model: ReverseProcess, out, x0, xt, t, eps) -> torch.Tensor:
    """Mean over dimensions of (target - prediction)^2, the target being what the network predicts."""
    if model.prediction == "eps":
        target = eps
    elif model.prediction == "x0":
        target = x0
    elif model.prediction == "v":
        target = v_from_x0_eps(model.schedule, x0, t, eps, model.event_dims)
    else:
        target = posterior_mean(model.schedule, x0, xt, t, model.event_dims)
    return _mean_over_event((out.prediction - target) ** 2, model.event_dims)


def simple_loss(model: ReverseProcess, x0, *, sampler, generator=None, **_) -> LossOutput:
    """L_simple = E ||target - prediction||^2 averaged over dimensions (Ho et al. eq. 14)."""
    t, _w = sampler.sample(x0.shape[0], x0.device, generator)
    xt, eps = sample_xt(model, x0, t, generator)
    out = model._output(xt, t)  # t from the sampler lies in 1..T
    return LossOutput(_squared_error(model, out, x0, xt, t, eps), t)


def vlb_loss(model: ReverseProcess, x0, *, sampler, generator=None, **_) -> LossOutput:
    """The bound L_T + T w_t L_{t-1} with t from ``sampler`` (nats per example), as
    ``elbo.sampled_bound``."""
    t, w = sampler.sample(x0.shape[0], x0.device, generator)
    xt, _ = sample_xt(model, x0, t, generator)
    term = _step_term(model, x0, xt, t, model._output(xt, t))
    return LossOutput(prior_term(model, x0) + model.num_timesteps * w * term, t, term)


def hybrid_loss(model: ReverseProcess, x0, *, sampler, generator=None,
                hybrid_weight: float = 0.001, **_) -> LossOutput:
    """L_simple + lambda L_vlb, the bound term in bits per dimension with mu_theta detached."""
    t, w = sampler.sample(x0.shape[0], x0.device, generator)
    xt, eps = sample_xt(model, x0, t, generator)
    out = model._output(xt, t)
    simple = _squared_error(model, out, x0, xt, t, eps)
    term = _step_term(model, x0, xt, t, out, detach_mean=True)
    num_dims = math.prod(x0.shape[x0.dim() - model.event_dims:])
    scale = hybrid_weight * model.num_timesteps / (num_dims * math.log(2))  # lambda T / (D ln 2)
    return LossOutput(simple + scale * w * term, t, term.detach())


def trajectory_loss(model: ReverseProcess, x0, *, sampler=None, generator=None, **_) -> LossOutput:
    """The Monte Carlo bound over one sampled forward trajectory (nats per example)."""
    return LossOutput(trajectory_bound(model, x0, generator=generator))


def _eps_error(model: ReverseProcess, x0, *, sampler, generator, reduce):
    """t from ``sampler`` with its weights, x_t ~ q(x_t | x_0), the network's output there and
    ``reduce`` over dimensions of (eps - eps_hat)^2, eps_hat the network's implied eps."""
    t, w = sampler.sample(x0.shape[0], x0.device, generator)
    xt, eps = sample_xt(model, x0, t, generator)
    out = model._output(xt, t)
    sq = ((eps - out.eps) ** 2).flatten(x0.dim() - model.event_dims)
    return t, w, xt, out, (sq.mean(-1) if reduce == "mean" else sq.sum(-1))


def _weighted_loss(name: str, model: ReverseProcess, x0, sampler, generator, options) -> LossOutput:
    """c_t mean_i (eps_i - eps_hat_i)^2 with c from ``weighting.step_weights(name)``, times the
    sampler's weight."""
    c = step_weights_like(name, model.schedule, x0, **options)
    t, w, _, _, err = _eps_error(model, x0, sampler=sampler, generator=generator, reduce="mean")
    term = c.index_select(0, t.reshape(-1) - 1).reshape(t.shape) * err
    return LossOutput(w * term, t, term.detach())


def elbo_loss(model: ReverseProcess, x0, *, sampler, generator=None, **options) -> LossOutput:
    """L_T + T w_t term_t (nats; Kingma & Gao's w = 1): term_t = 1/2 Delta_t ||eps - eps_hat||^2
    summed over dimensions for t >= 2 (L_{t-1} under fixed_small) and L_0 = -log p_theta(x_0 | x_1)
    at t = 1."""
    half_delta = step_weights_like("elbo", model.schedule, x0, **options) / model.num_timesteps
    t, w, xt, out, err = _eps_error(model, x0, sampler=sampler, generator=generator, reduce="sum")
    diffusion = half_delta.index_select(0, t.reshape(-1) - 1).reshape(t.shape) * err  # 0 at t = 1
    term = torch.where(t == 1, _step_term(model, x0, xt, t, out), diffusion)
    return LossOutput(prior_term(model, x0) + model.num_timesteps * w * term, t, term.detach())


def snr_loss(model: ReverseProcess, x0, *, sampler, generator=None, **options) -> LossOutput:
    """The x_0-MSE ||x_0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR_t, averaged over dimensions."""
    return _weighted_loss("snr", model, x0, sampler, generator, options)


def min_snr_loss(model: ReverseProcess, x0, *, sampler, generator=None, **options) -> LossOutput:
    """min(SNR_t, gamma) / SNR_t ||eps - eps_hat||^2 (Hang et al. 2023), gamma = 5 by default."""
    return _weighted_loss("min_snr", model, x0, sampler, generator, options)


def p2_loss(model: ReverseProcess, x0, *, sampler, generator=None, **options) -> LossOutput:
    """(k + SNR_t)^-gamma ||eps - eps_hat||^2 (Choi et al. 2022), k = gamma = 1 by default."""
    return _weighted_loss("p2", model, x0, sampler, generator, options)


def edm_loss(model: ReverseProcess, x0, *, sampler, generator=None, **options) -> LossOutput:
    """EDM's loss (Karras et al. 2022) as c_t ||eps - eps_hat||^2 over uniform t (see
    ``weighting``): ln sigma ~ N(-1.2, 1.2^2), weight (sigma^2 + 0.5^2) / (0.5 sigma)^2 on x_0."""
    return _weighted_loss("edm", model, x0, sampler, generator, options)


def continuous_loss(model: ReverseProcess, x0: torch.Tensor, *, sampler=None,
                    generator: torch.Generator | None = None,
                    log_snr: DiscreteLogSNR | LearnedLogSNR | None = None, **_):
    """The continuous-time bound (VDM eq. 17) as a training objective, nats per example: L_T + L_0
    (the decoder at u_1 = 1/T, one draw of x_1) + the diffusion integral from one u per example,
    the batch's u spread evenly over (u_1, 1) from one uniform offset (VDM's low-discrepancy
    sampler, sec. 3.3). The network is trained at real steps s = u T.

    With a ``LearnedLogSNR``, gradient hooks turn the schedule's gradient into that of the mean
    squared loss (VDM sec. 5.2: the schedule minimizes the estimator's variance, not its mean),
    while the network gets the gradient of the loss itself."""
    N, d, dev = x0.shape[0], model.event_dims, x0.device
    T = model.num_timesteps
    u_first = 1.0 / T
    den = ContinuousDenoiser(model, log_snr)
    offset = torch.rand((), generator=generator, device=generator.device if generator else None)
    grid = ((offset.to(dev, torch.float64) + torch.arange(N, device=dev, dtype=torch.float64) / N)
            % 1.0)
    u = u_first + (1 - u_first) * grid
    learned = isinstance(den.log_snr, LearnedLogSNR)
    lam = den.log_snr(u)
    dlam = (den.log_snr.derivative(u, create_graph=True) if learned
            else den.log_snr.derivative(u))
    a, s = (v.to(x0.dtype).reshape((N,) + (1,) * d) for v in alpha_sigma(lam))
    eps = torch.randn(x0.shape, dtype=x0.dtype, device=dev, generator=generator)
    xu = a * x0 + s * eps
    eps_hat = den.eps(xu, u, a, s)
    err = ((eps - eps_hat) ** 2).flatten(x0.dim() - d).sum(-1)
    diffusion = 0.5 * (1 - u_first) * (-dlam).to(x0.dtype) * err
    t1 = torch.ones(N, dtype=torch.long, device=dev)
    x1 = (model.schedule.at("sqrt_alpha_bar", t1, x0, d) * x0
          + model.schedule.at("sqrt_one_minus_alpha_bar", t1, x0, d)
          * torch.randn(x0.shape, dtype=x0.dtype, device=dev, generator=generator))
    loss = prior_term(model, x0) + _step_term(model, x0, x1, t1, model._output(x1, t1)) + diffusion
    if learned and torch.is_grad_enabled():
        scale = 2 * loss.detach().to(torch.float64)  # d E[L^2] = E[2 L dL]
        lam.register_hook(lambda g: g * scale)
        dlam.register_hook(lambda g: g * scale)
    return LossOutput(loss)


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "simple": simple_loss, "vlb": vlb_loss, "hybrid": hybrid_loss, "trajectory": trajectory_loss,
    "elbo": elbo_loss, "snr": snr_loss, "min_snr": min_snr_loss, "p2": p2_loss, "edm": edm_loss,
    "continuous": continuous_loss,
}


def get_objective(name: str) -> Callable[..., LossOutput]:
    """The loss function of objective ``name``; ``ValueError`` naming the valid ones otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return LOSSES[name]
