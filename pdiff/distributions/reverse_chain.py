r"""The whole reverse chain p_theta(x_{1:T}) as one distribution, one network call per log_prob."""
from __future__ import annotations

import torch
import pyro.distributions as dist
from torch.distributions import constraints

from .reverse import ReverseProcess


def reverse_log_prob(model: ReverseProcess, trajectory: torch.Tensor,
                     x0: torch.Tensor | None = None) -> torch.Tensor:
    r"""log p(x_T) + sum_{t=2}^T log p_theta(x_{t-1} | x_t), plus log p_theta(x_0 | x_1) when ``x0``
    is given, for a trajectory of shape ``batch_shape + (T,) + event_shape`` (index t - 1 along the
    time axis holds x_t). The network sees all the steps it needs in one batch. Shape
    ``batch_shape``.
    """
    d, T = model.event_dims, model.num_timesteps
    time_axis = trajectory.dim() - d - 1
    along_t = lambda index: (slice(None),) * time_axis + (index,)  # noqa: E731
    x_T = trajectory[along_t(T - 1)]
    log_p = model.prior(x_T).log_prob(x_T)
    lo = 0 if x0 is not None else 1  # the decoder needs the network at t = 1 too
    if lo == T:
        return log_p
    xs = trajectory[along_t(slice(lo, None))]  # x_{lo+1}, ..., x_T
    t = torch.arange(lo + 1, T + 1, device=trajectory.device).expand(xs.shape[: time_axis + 1])
    out = model._output(xs, t)
    if T > 1:
        later = along_t(slice(1 - lo, None))  # x_2..x_T
        p = model.transition(xs[later], None, out=out[later], validate_args=False)
        log_p = log_p + p.log_prob(trajectory[along_t(slice(0, T - 1))]).sum(-1)
    if x0 is not None:
        first = along_t(0)
        log_p = log_p + model.decoder(xs[first], out=out[first], validate_args=False).log_prob(x0)
    return log_p


class ReverseChain(dist.TorchDistribution):
    r"""The reverse chain without its last step, over the latent trajectory x_{1:T}:

    .. math::
        p_\theta(x_{1:T}) = p(x_T) \prod_{t=2}^T p_\theta(x_{t-1} \mid x_t),
        \qquad p(x_T) = \mathcal{N}(0, I),

    with p_theta(x_{t-1} | x_t) the Gaussian transitions of ``model`` (Ho et al. eq. 1). A value
    is a trajectory of shape ``batch_shape + (T,) + event_shape`` whose index ``t - 1`` along the
    time axis holds x_t, as ``ForwardChain`` draws them; ``log_prob`` evaluates the network at all
    T - 1 transitions in one batch. ``like`` (``batch_shape + event_shape``) gives the shapes, dtype
    and device. The decoder p_theta(x_0 | x_1) is left out: x_0 is observed through its own site.
    """

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, model: ReverseProcess, like: torch.Tensor, validate_args=None):
        self.model, self.like = model, like
        d = model.event_dims
        batch_shape = like.shape[: like.dim() - d]
        event_shape = torch.Size((model.num_timesteps,)) + like.shape[like.dim() - d:]
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        d = self.model.event_dims
        like = self.like.expand(batch_shape + self.like.shape[self.like.dim() - d:])
        return ReverseChain(self.model, like, validate_args=self._validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return reverse_log_prob(self.model, value)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()):
        """Ancestral sampling: x_T ~ N(0, I), then x_{t-1} ~ p_theta(x_{t-1} | x_t), t = T..2."""
        m, d = self.model, self.model.event_dims
        shape = torch.Size(sample_shape) + self.like.shape
        x = torch.randn(shape, dtype=self.like.dtype, device=self.like.device)
        steps = [x]
        for t in range(m.num_timesteps, 1, -1):
            tt = torch.full(shape[: len(shape) - d], t, dtype=torch.long, device=x.device)
            x = m.transition(x, tt).sample()
            steps.append(x)
        return torch.stack(steps[::-1], dim=len(shape) - d)
