r"""p_theta and q over the whole chain as a Pyro model and guides.

``model``: x_T ~ N(0, I); x_{t-1} ~ p_theta(x_{t-1} | x_t) for t = T..2; x_0 ~ p_theta(x_0 | x_1)
observed. Sites are named ``x_T`` ... ``x_1`` and ``x_0`` (observed), inside a plate over examples.

``posterior_guide``: x_T ~ q(x_T | x_0), then x_{t-1} ~ q(x_{t-1} | x_t, x_0) for t = T..2. Site by
site the guide and model distributions are Gaussians with a registered KL, so
``TraceMeanField_ELBO`` computes exactly -(L_T + sum_t L_{t-1} + L_0) at the guide's draws.

``forward_guide``: x_t ~ q(x_t | x_{t-1}) for t = 1..T. ``Trace_ELBO`` with it is the trajectory
estimator -log p(x_T) - sum_t log [p_theta(x_{t-1} | x_t) / q(x_t | x_{t-1})], negated.

``chain_model`` and ``chain_guide``: the same joint distributions with the latent trajectory x_{1:T}
as ONE site ``x_1:T`` (a ``ReverseChain`` in the model, a ``ForwardChain`` in the guide), and x_0
observed under the decoder. ``Trace_ELBO`` with them is the trajectory estimator again, but the
network sees all T steps in one batch instead of one site (and one call) per step.

All are trainable with ``pyro.infer.SVI``; the network is registered with ``pyro.module``.
"""
from __future__ import annotations

import pyro
import torch

from .distributions.forward import ForwardChain, q_marginal, q_posterior, q_step
from .distributions.reverse import ReverseProcess
from .distributions.reverse_chain import ReverseChain

TRAJECTORY = "x_1:T"  # the one latent site of chain_model / chain_guide


def _steps(x0: torch.Tensor, t: int, event_dims: int) -> torch.Tensor:
    return torch.full(x0.shape[: x0.dim() - event_dims], t, dtype=torch.long, device=x0.device)


def _register(model: ReverseProcess) -> None:
    if isinstance(model.net, torch.nn.Module):
        pyro.module("denoiser", model.net)


def model(p: ReverseProcess, x0: torch.Tensor) -> None:
    """The generative chain p_theta(x_{0:T}) with x_0 observed; ``x0`` has shape (N,) + event."""
    _register(p)
    T, d = p.num_timesteps, p.event_dims
    with pyro.plate("data", x0.shape[0]):
        x = pyro.sample(f"x_{T}", p.prior(x0))
        for t in pyro.markov(range(T, 1, -1)):
            x = pyro.sample(f"x_{t - 1}", p.transition(x, _steps(x0, t, d)))
        pyro.sample("x_0", p.decoder(x), obs=x0)


def posterior_guide(p: ReverseProcess, x0: torch.Tensor) -> None:
    """q(x_{1:T} | x_0) in reverse order: q(x_T | x_0) prod_{t=2}^T q(x_{t-1} | x_t, x_0)."""
    T, d, s = p.num_timesteps, p.event_dims, p.schedule
    with pyro.plate("data", x0.shape[0]):
        x = pyro.sample(f"x_{T}", q_marginal(s, x0, _steps(x0, T, d), event_dims=d))
        for t in pyro.markov(range(T, 1, -1)):
            x = pyro.sample(f"x_{t - 1}", q_posterior(s, x0, x, _steps(x0, t, d), event_dims=d))


def forward_guide(p: ReverseProcess, x0: torch.Tensor) -> None:
    """q(x_{1:T} | x_0) in forward order: prod_{t=1}^T q(x_t | x_{t-1})."""
    T, d, s = p.num_timesteps, p.event_dims, p.schedule
    with pyro.plate("data", x0.shape[0]):
        x = x0
        for t in pyro.markov(range(1, T + 1)):
            x = pyro.sample(f"x_{t}", q_step(s, x, _steps(x0, t, d), event_dims=d))


def chain_model(p: ReverseProcess, x0: torch.Tensor) -> None:
    """p_theta(x_{0:T}) as two sites: the trajectory x_{1:T} ~ ``ReverseChain`` (p(x_T) and the
    transitions t = T..2, one network call), then x_0 ~ p_theta(x_0 | x_1) observed."""
    _register(p)
    with pyro.plate("data", x0.shape[0]):
        trajectory = pyro.sample(TRAJECTORY, ReverseChain(p, x0))
        x1 = trajectory.select(x0.dim() - p.event_dims, 0)  # index 0 of the time axis holds x_1
        pyro.sample("x_0", p.decoder(x1), obs=x0)


def chain_guide(p: ReverseProcess, x0: torch.Tensor) -> None:
    """q(x_{1:T} | x_0) as one site: the whole forward chain (``ForwardChain``), drawn at once."""
    with pyro.plate("data", x0.shape[0]):
        pyro.sample(TRAJECTORY, ForwardChain(p.schedule, x0, event_dims=p.event_dims))
