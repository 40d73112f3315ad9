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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .distributions.reverse import ReverseProcess
from .elbo import _step_term, prior_term, sample_xt, trajectory_bound
from .parameterization import posterior_mean, v_from_x0_eps

OBJECTIVES = ("simple", "vlb", "hybrid", "trajectory")
SAMPLERS = ("uniform", "importance")


@dataclass
class LossOutput:
    """``loss``: per-example loss (N,); ``t`` and ``term``: the sampled steps and their bound terms
    (nats), for the importance sampler (``None`` where the objective samples no single t)."""

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


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "simple": simple_loss, "vlb": vlb_loss, "hybrid": hybrid_loss, "trajectory": trajectory_loss,
}


def get_objective(name: str) -> Callable[..., LossOutput]:
    """The loss function of objective ``name``; ``ValueError`` naming the valid ones otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return LOSSES[name]
