r"""The variational bound, term by term, per example (Ho et al. eq. 5), in nats.

    -log p_theta(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || p(x_T))
    L_{t-1} = E_q KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))   t = 2..T
    L_0     = E_q [-log p_theta(x_0 | x_1)]

"The term of step t" below means L_{t-1} (t >= 2) or L_0 (t = 1). Each is estimated with one draw
x_t ~ q(x_t | x_0); the KLs are analytic, through ``kl_divergence``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributions import Distribution, kl_divergence

from .distributions.discretized import DiscretizedGaussian
from .distributions.forward import ForwardChain
from .distributions.normal import DiagNormal
from .distributions.reverse import ReverseOutput, ReverseProcess
from .distributions.reverse_chain import reverse_log_prob
from .parameterization import posterior_mean, xt_from_x0


@dataclass
class Bound:
    """All terms of the bound for N examples, in nats summed over data dimensions.

    ``prior``: L_T, shape (N,). ``terms``: shape (N, T), column t - 1 is the term of step t
    (column 0 is L_0).
    """

    prior: torch.Tensor
    terms: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """The bound on -log p_theta(x_0) per example, shape (N,)."""
        return self.prior + self.terms.sum(-1)


def prior_term(model: ReverseProcess, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)), shape ``batch_shape``.

    q(x_T | x_0) = N(sqrt(ab_T) x_0, (1 - ab_T) I), so in closed form

        L_T = 1/2 sum_i [ab_T x0_i^2 - ab_T - log(1 - ab_T)],

    the registered DiagNormal KL written out (the training hot path calls it every step;
    ``tests/test_elbo.py`` checks it against ``kl_divergence`` of the two distributions).
    """
    ab, log1m_ab = model.schedule.final_alpha_bar
    per_dim = 0.5 * (ab * (x0 * x0) - ab - log1m_ab)
    return per_dim.flatten(x0.dim() - model.event_dims).sum(-1) if model.event_dims else per_dim


def step_term(model: ReverseProcess, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, *,
              out: ReverseOutput | None = None, detach_mean: bool = False) -> torch.Tensor:
    """The term of step t at the given x_t: KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) for
    t >= 2 and -log p_theta(x_0 | x_1) for t = 1; ``t`` may mix steps. Shape ``batch_shape``."""
    t = model.schedule.check_t(t).to(x0.device).expand(x0.shape[: x0.dim() - model.event_dims])
    check_data(model, x0)
    return _step_term(model, x0, xt, t, model._output(xt, t) if out is None else out, detach_mean)


def check_data(model: ReverseProcess, x0: torch.Tensor) -> None:
    """Under distribution validation (torch's default), refuse x_0 off the discretized decoder's K
    levels with a ``ValueError``; the hot paths then skip the per-call check."""
    if model.decoder_type == "discretized" and Distribution._validate_args:
        if not bool(DiscretizedGaussian(x0, 1.0, model.num_levels).support.check(x0).all()):
            raise ValueError(f"x_0 must lie on the decoder's {model.num_levels} levels "
                             "-1 + 2k/(K - 1) in [-1, 1]")


def _step_term(model: ReverseProcess, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
               out: ReverseOutput, detach_mean: bool = False) -> torch.Tensor:
    """``step_term`` for checked steps ``t`` (a long tensor of the batch shape).

    Both the KL and the decoder's NLL are computed for every entry and ``torch.where`` keeps the
    right one: no boolean indexing, no copies and no wait for the device. The t = 1 entries take
    their KL with the posterior's variance at t = 2 (beta_tilde_1 = 0 has no density); that finite
    value is discarded, so neither it nor its (zero) gradient can be NaN.
    """
    d = model.event_dims
    p = model.transition(xt, None, out=out, detach_mean=detach_mean, validate_args=False)
    decoder = (p if model.decoder_type == "gaussian"
               else model.decoder(xt, out=out, detach_mean=detach_mean, validate_args=False))
    nll = -decoder.log_prob(x0)
    if model.num_timesteps == 1:
        return nll
    # q(x_{t-1} | x_t, x_0); at t = 1 its mean is x_0 itself and its variance beta_tilde_1 = 0 is
    # replaced by beta_tilde_2 (log_beta_tilde_clipped); those entries are discarded
    log_variance = model.schedule.at("log_beta_tilde_clipped", t, xt, d)
    q = DiagNormal(posterior_mean(model.schedule, x0, xt, t, d), log_variance, d,
                   validate_args=False)
    return torch.where(t == 1, nll, kl_divergence(q, p))


def sample_xt(model: ReverseProcess, x0: torch.Tensor, t: torch.Tensor,
              generator: torch.Generator | None = None):
    """x_t ~ q(x_t | x_0) by eq. 4; returns (x_t, eps)."""
    eps = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
    return xt_from_x0(model.schedule, x0, t, eps, model.event_dims), eps


def full_bound(model: ReverseProcess, x0: torch.Tensor, *, chunk_size: int = 16384,
               generator: torch.Generator | None = None,
               progress: Callable[[int], None] | None = None) -> Bound:
    """Every term of the bound for every example (the evaluation estimator), with no gradients.

    The N x T (example, step) pairs are flattened row-major and evaluated ``chunk_size`` at a time,
    one network call per chunk, so memory is bounded by the chunk, not by T x N, and there is no
    loop over t. Each term uses its own draw of x_t ~ q(x_t | x_0). ``progress(pairs)`` is called
    after each chunk with the number of pairs it held.
    """
    T = model.num_timesteps
    N = _num_examples(model, x0)

    def pairs(start: int, stop: int):  # row-major over (N, T), made a chunk at a time
        idx = torch.arange(start, stop, device=x0.device)
        return idx // T, idx % T + 1
    terms = _pair_terms(model, x0, N * T, pairs, chunk_size, generator, progress)
    with torch.no_grad():
        prior = prior_term(model, x0)
    return Bound(prior=prior, terms=terms.reshape(N, T))


def stratified_bound(model: ReverseProcess, x0: torch.Tensor, timestep_samples: int, *,
                     chunk_size: int = 16384, generator: torch.Generator | None = None,
                     progress: Callable[[int], None] | None = None) -> Bound:
    """An unbiased estimate of the bound per example from K + 1 terms instead of T, K =
    ``timestep_samples``: the decoder term L_0 exactly (it differs most from its neighbours), and
    steps 2..T split into K contiguous strata S_k of near-equal size, one t_k ~ U(S_k) per stratum
    and example:

        L_T + L_0 + sum_k |S_k| L_{t_k - 1}     (E_t[|S_k| L_{t_k - 1}] = sum_{t in S_k} L_{t-1})

    Returned as a ``Bound`` whose ``terms`` are (N, K + 1): column 0 is L_0, column k the weighted
    term |S_k| L_{t_k - 1} (so ``total`` is the estimate). Stratifying keeps each draw's t near its
    neighbours, so the variance is at most that of K uniform draws; K = T - 1 gives every term."""
    T = model.num_timesteps
    if not 1 <= timestep_samples <= max(T - 1, 1):
        raise ValueError(f"timestep_samples must be in 1..T - 1 = {T - 1}, got {timestep_samples}")
    N, K = _num_examples(model, x0), min(timestep_samples, T - 1)
    dev = x0.device
    edges = 1 + torch.div(torch.arange(K + 1, device=dev) * (T - 1), K, rounding_mode="floor")
    width = edges[1:] - edges[:-1]  # (K,) >= 1; the strata cover 2..T
    u = torch.rand((N, K), generator=generator, device=dev, dtype=torch.float64)
    t = edges[:-1] + 1 + (u * width).long().clamp(max=width - 1)  # (N, K), t_k in S_k
    t = torch.cat([torch.ones((N, 1), dtype=t.dtype, device=dev), t], 1).reshape(-1)  # L_0 first
    n = torch.arange(N, device=dev).repeat_interleave(K + 1)
    terms = _pair_terms(model, x0, N * (K + 1), lambda a, b: (n[a:b], t[a:b]), chunk_size,
                        generator, progress)
    with torch.no_grad():
        prior = prior_term(model, x0)
    weights = torch.cat([torch.ones(1, device=dev, dtype=width.dtype), width]).to(terms.dtype)
    return Bound(prior=prior, terms=terms.reshape(N, K + 1) * weights)


def _num_examples(model: ReverseProcess, x0: torch.Tensor) -> int:
    batch_shape = x0.shape[: x0.dim() - model.event_dims]
    if len(batch_shape) != 1:
        raise ValueError(f"the bound takes a batch of examples, shape (N,) + event_shape; got "
                         f"{tuple(x0.shape)} with {model.event_dims} event dimensions")
    check_data(model, x0)
    return batch_shape[0]


def _pair_terms(model: ReverseProcess, x0: torch.Tensor, count: int,
                pairs: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], chunk_size: int,
                generator, progress) -> torch.Tensor:
    """The term of step t for example n, for each of the ``count`` pairs (n, t) that
    ``pairs(start, stop)`` gives, ``chunk_size`` pairs per network call."""
    terms = x0.new_empty(count)
    with torch.no_grad():
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            n_c, t_c = pairs(start, stop)
            x0_c = x0.index_select(0, n_c)
            xt, _ = sample_xt(model, x0_c, t_c, generator)
            terms[start:stop] = _step_term(model, x0_c, xt, t_c, model._output(xt, t_c))
            if progress is not None:
                progress(stop - start)
    return terms


def sampled_bound(model: ReverseProcess, x0: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                  *, generator: torch.Generator | None = None, detach_mean: bool = False):
    """The unbiased one-step estimator L_T + T w_t L_{t-1}, t drawn by a sampler with weights
    w_t = 1 / (T p_t) (1 for uniform t). Returns (estimate, term), both shape ``batch_shape``."""
    t = model.schedule.check_t(t).to(x0.device).expand(x0.shape[: x0.dim() - model.event_dims])
    check_data(model, x0)
    xt, _ = sample_xt(model, x0, t, generator)
    term = _step_term(model, x0, xt, t, model._output(xt, t), detach_mean)
    return prior_term(model, x0) + model.num_timesteps * weights * term, term


def trajectory_bound(model: ReverseProcess, x0: torch.Tensor, *,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The Monte Carlo bound over one forward trajectory x_{1:T} ~ q(x_{1:T} | x_0):

        -log p(x_T) - sum_{t=1}^T log [p_theta(x_{t-1} | x_t) / q(x_t | x_{t-1})]   (Ho et al. eq. 3)

    Its expectation is the bound; the network is evaluated at all T steps in one batch.
    Shape ``batch_shape``.
    """
    chain = ForwardChain(model.schedule, x0, event_dims=model.event_dims)
    traj = chain.rsample(generator=generator)  # batch + (T,) + event; index t-1 holds x_t
    return -(reverse_log_prob(model, traj, x0) - chain.log_prob(traj))


def bits_per_dim(nats: torch.Tensor | float, num_dims: int):
    """nats / (D ln 2)."""
    return nats / (num_dims * math.log(2))


def nll_summary(total: torch.Tensor, entropy: tuple[float | None, float | None] = (None, None),
                data_log_prob: torch.Tensor | None = None):
    """(nll, stderr, gap, gap_stderr) of per-example estimates ``total`` of -log p(x), shape (N,):
    the mean and its standard error (None for one example, never NaN), and the gap to the data
    entropy: paired, the mean of total + log p_data(x) over the same points, where
    ``data_log_prob`` is given; else nll - H with the two standard errors combined; else None."""
    total = total.double()
    n = total.shape[0]
    nll = total.mean().item()
    stderr = total.std().item() / math.sqrt(n) if n > 1 else None
    h, h_se = entropy
    if data_log_prob is not None:
        diff = total + data_log_prob.to(total)
        gap, gap_se = diff.mean().item(), (diff.std().item() / math.sqrt(n) if n > 1 else None)
    elif h is not None:
        gap = nll - h
        gap_se = None if stderr is None or h_se is None else math.sqrt(stderr**2 + h_se**2)
    else:
        gap = gap_se = None
    return nll, stderr, gap, gap_se
