"""Ancestral sampling from p_theta (Ho et al. Algorithm 2), with trajectories and respacing.

Samplers share one signature: ``sampler(model, shape, *, generator, ...) -> SampleOutput``.
Respaced chains and other schedules come from ``ReverseProcess.respaced`` /
``ReverseProcess.with_schedule``; x_0 clipping from ``ReverseProcess(clip_x0=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributions.discretized import quantize
from .distributions.reverse import ReverseProcess
from .schedules import spaced_steps


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


def sample(model: ReverseProcess, num: int, *, sampling_timesteps: int | None = None,
           generator: torch.Generator | None = None, device=None, dtype=None,
           event_shape=None, return_trajectory: bool = False) -> SampleOutput:
    """``num`` samples of shape ``event_shape``, on a chain respaced to ``sampling_timesteps`` steps
    (evenly spaced, always including T) when given."""
    if sampling_timesteps is not None and sampling_timesteps != model.num_timesteps:
        model = model.respaced(spaced_steps(model.num_timesteps, sampling_timesteps))
    return ancestral_sample(model, (num,) + tuple(event_shape), generator=generator, device=device,
                            dtype=dtype, return_trajectory=return_trajectory)
