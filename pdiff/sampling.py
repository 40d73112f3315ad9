"""Sampling from p_theta: ancestral (Ho et al. Algorithm 2) and DDIM (Song et al. 2021, eq. 12),
with trajectories and respacing.

Samplers share one signature: ``sampler(model, shape, *, generator, ...) -> SampleOutput``.
Respaced chains and other schedules come from ``ReverseProcess.respaced`` /
``ReverseProcess.with_schedule``; x_0 clipping from ``ReverseProcess(clip_x0=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from .distributions.discretized import quantize
from .distributions.reverse import ReverseOutput, ReverseProcess
from .schedules import NoiseSchedule, spaced_steps

SAMPLING_METHODS = ("ddpm", "ddim")


@dataclass
class SampleOutput:
    """``x0``: the samples. ``trajectory``: if requested, shape ``(K + 1,) + shape`` with index k
    holding x_k of the (possibly respaced) chain, from x_0 (index 0) to x_K."""

    x0: torch.Tensor
    trajectory: torch.Tensor | None = None


def _normal(shape, like_dtype, device, generator):
    return torch.randn(shape, dtype=like_dtype, device=device, generator=generator)


@torch.no_grad()
def ancestral_sample(model: ReverseProcess, shape, *, generator: torch.Generator | None = None,
                     device=None, dtype=None, return_trajectory: bool = False,
                     noiseless_last_step: bool = False) -> SampleOutput:
    """x_T ~ N(0, I), then x_{t-1} ~ p_theta(x_{t-1} | x_t) for t = T..1 (Ho et al. Algorithm 2).

    The last step draws x_0 from the decoder p_theta(x_0 | x_1), so the samples come from the very
    model whose bound is evaluated; ``noiseless_last_step`` returns its mean instead, as Ho et al.
    display samples.
    """
    dtype = dtype or torch.get_default_dtype()
    shape = torch.Size(shape)
    batch_shape = shape[: len(shape) - model.event_dims]
    x = _normal(shape, dtype, device, generator)
    steps = [x] if return_trajectory else None
    for t in range(model.num_timesteps, 0, -1):
        tt = torch.full(batch_shape, t, dtype=torch.long, device=x.device)
        out = model.output(x, tt)
        if t > 1:
            std = torch.exp(0.5 * out.log_variance)
            x = out.mean + std * _normal(shape, dtype, x.device, generator)
        elif noiseless_last_step:
            x = out.mean
        else:
            x = _decode(model, x, out, generator)
        if return_trajectory:
            steps.append(x)
    trajectory = torch.stack(steps[::-1]) if return_trajectory else None
    return SampleOutput(x0=x, trajectory=trajectory)


def _decode(model: ReverseProcess, x1, out, generator):
    std = torch.exp(0.5 * out.log_variance)
    x0 = out.mean + std * _normal(x1.shape, x1.dtype, x1.device, generator)
    if model.decoder_type == "discretized":
        x0 = quantize(x0, model.num_levels)
    return x0


def ddim_sigma(schedule: NoiseSchedule, eta: float) -> torch.Tensor:
    """sigma_t = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1}) for t = 0..T, float64
    (Song et al. 2021, eq. 16; ab = alpha_bar). sigma_t^2 = eta^2 beta_tilde_t: eta = 1 is the
    posterior variance of the chain ``schedule`` (respaced or not). Index 0 is 0 and never used."""
    check_eta(eta)
    ab, ab_prev = schedule.alpha_bar, schedule.alpha_bar_prev
    sigma = torch.zeros_like(ab)
    sigma[1:] = eta * ((1 - ab_prev[1:]) / (1 - ab[1:]) * (1 - ab[1:] / ab_prev[1:])).sqrt()
    # x_{t-1} needs sqrt(1 - ab_{t-1} - sigma_t^2): eta <= 1 always fits, a larger one may not
    over = sigma[1:] ** 2 > (1 - ab_prev[1:]) * (1 + 1e-12)
    if bool(over.any()):  # never at t = 1, where sigma_1 = 0: the limit is over t = 2..T
        limit = float(((1 - ab[2:]) / (1 - ab[2:] / ab_prev[2:])).min().sqrt())
        raise ValueError(f"eta = {eta:g} makes sigma_t^2 exceed 1 - alpha_bar_(t-1) on this chain; "
                         f"eta must be at most {limit:.6g} here (eta in [0, 1] always fits)")
    return sigma


def check_eta(eta: float) -> float:
    """``eta`` as a float, refused unless finite and >= 0."""
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM), got {eta}")
    return eta


def ddim_mean(model: ReverseProcess, out: ReverseOutput, sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma_t^2) eps_hat, the mean of the DDIM step
    from x_t (Song et al. 2021, eq. 12), with x0_hat and eps_hat those of ``out`` (x0_hat clipped
    under ``clip_x0``, eps_hat implied by it) and ``sigma`` from ``ddim_sigma`` (all t = 0..T)."""
    s, d, like = model.schedule, model.event_dims, out.xt
    ab_prev = s.tensor("alpha_bar_prev", like.device)
    sig = sigma.to(like.device)
    c_x0 = ab_prev.sqrt()
    c_eps = (1 - ab_prev - sig**2).clamp_min(0).sqrt()  # round-off only: ddim_sigma checked it
    shape = out.t.shape + (1,) * d
    c_x0 = c_x0.to(like.dtype).index_select(0, out.t.reshape(-1)).reshape(shape)
    c_eps = c_eps.to(like.dtype).index_select(0, out.t.reshape(-1)).reshape(shape)
    return c_x0 * out.x0 + c_eps * out.eps


@torch.no_grad()
def ddim_sample(model: ReverseProcess, shape, *, eta: float = 0.0,
                generator: torch.Generator | None = None, device=None, dtype=None,
                return_trajectory: bool = False, xT: torch.Tensor | None = None) -> SampleOutput:
    """x_T ~ N(0, I), then x_{t-1} = sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma_t^2) eps_hat
    + sigma_t z for t = T..1 over the steps of ``model``'s chain (DDIM, Song et al. 2021, eq. 12).

    Only x0_hat and eps_hat come from the network; ``model``'s variance option is not used.
    sigma_t = eta sqrt(beta_tilde_t) of the chain (``ddim_sigma``): eta = 0 is deterministic given
    x_T (no noise is drawn), eta = 1 gives each step t >= 2 the mean and variance of the
    fixed_small ancestral step p_theta(x_{t-1} | x_t).
    Respace ``model`` (``ReverseProcess.respaced``) to sample on a subsequence of its steps. The
    last step (ab_0 = 1) returns x0_hat with no noise; for a discretized decoder it is rounded to
    the nearest of the K levels (``quantize``), so samples lie where the decoder puts its mass, as
    ancestral sampling's do. ``xT``: start from this x_T instead of drawing it.
    """
    sigma = ddim_sigma(model.schedule, eta)  # float64 on the CPU: its entries read without a wait
    dtype = dtype or (xT.dtype if xT is not None else torch.get_default_dtype())
    shape = torch.Size(shape)
    batch_shape = shape[: len(shape) - model.event_dims]
    if xT is None:
        x = _normal(shape, dtype, device, generator)
    else:
        if xT.shape != shape:
            raise ValueError(f"xT has shape {tuple(xT.shape)}, expected {tuple(shape)}")
        x = xT.to(device=device or xT.device, dtype=dtype)
    steps = [x] if return_trajectory else None
    sigma_here = sigma.to(x.device)
    for t in range(model.num_timesteps, 0, -1):
        tt = torch.full(batch_shape, t, dtype=torch.long, device=x.device)
        out = model.output(x, tt)
        if t > 1:
            x = ddim_mean(model, out, sigma_here)
            if sigma[t] > 0:
                x = x + float(sigma[t]) * _normal(shape, dtype, x.device, generator)
        else:
            x = out.x0 if model.decoder_type == "gaussian" else quantize(out.x0, model.num_levels)
        if return_trajectory:
            steps.append(x)
    trajectory = torch.stack(steps[::-1]) if return_trajectory else None
    return SampleOutput(x0=x, trajectory=trajectory)


def check_sampler(sampler: str, eta: float | None) -> float | None:
    """Refuse an unknown ``sampler`` (valid: ``SAMPLING_METHODS``) and an ``eta`` given to ddpm
    (ancestral sampling has no eta); returns eta, 0 for ddim when not given."""
    if sampler not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLING_METHODS)}")
    if sampler == "ddpm":
        if eta is not None:
            raise ValueError("eta applies to the ddim sampler only (ddpm draws each step from "
                             "p_theta with the model's own variance)")
        return None
    return check_eta(0.0 if eta is None else eta)


def sample(model: ReverseProcess, num: int, *, sampling_timesteps: int | None = None,
           generator: torch.Generator | None = None, device=None, dtype=None,
           event_shape=None, return_trajectory: bool = False, sampler: str = "ddpm",
           eta: float | None = None) -> SampleOutput:
    """``num`` samples of shape ``event_shape``, on a chain respaced to ``sampling_timesteps`` steps
    (evenly spaced, always including T) when given, by ``sampler``: ``ddpm`` (``ancestral_sample``)
    or ``ddim`` (``ddim_sample`` with ``eta``, default 0)."""
    eta = check_sampler(sampler, eta)
    if sampling_timesteps is not None and sampling_timesteps != model.num_timesteps:
        model = model.respaced(spaced_steps(model.num_timesteps, sampling_timesteps))
    shape = (num,) + tuple(event_shape)
    if sampler == "ddim":
        return ddim_sample(model, shape, eta=eta, generator=generator, device=device, dtype=dtype,
                           return_trajectory=return_trajectory)
    return ancestral_sample(model, shape, generator=generator, device=device, dtype=dtype,
                            return_trajectory=return_trajectory)
