r"""The baselines ``pdiff.bench`` measures pdiff against, written directly in torch.

``HandLoop`` is a training iteration with no pdiff abstraction in it (no distributions, no
schedule object, no trainer); ``chain_mean_field_bound`` is the estimator Pyro's
``TraceMeanField_ELBO`` computes with the per-step sites, evaluated the torch way.
"""
from __future__ import annotations

import copy
import math

import torch

from .distributions.discretized import log_diff_ndtr
from .distributions.forward import ForwardChain
from .elbo import _step_term, prior_term
from .schedules import make_schedule
from .train import TrainConfig

HYBRID_WEIGHT = 0.001  # lambda of the hybrid objective (objectives.hybrid_loss's default)


class HandLoop:
    """The arithmetic of a ``Trainer`` iteration written directly in torch for eps prediction and
    the learned_range variance (the defaults): draw indices, t, eps; x_t; the network; the loss of
    the objective; backward, gradient clipping, AdamW with the warm-up learning rate, EMA.

    Schedule tables (in the data's dtype) are gathered by t with ``index_select``; both bound
    branches are computed for the whole batch and ``torch.where`` picks the decoder term at t = 1,
    as improved-diffusion does. ``tests/test_bench.py`` checks that its loss and gradients are
    pdiff's on the same draws.
    """

    def __init__(self, cfg: TrainConfig, net: torch.nn.Module, data: torch.Tensor,
                 num_levels: int | None, device):
        self.cfg, self.net, self.data = cfg, net, data
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.params, self.ema_params = list(net.parameters()), list(self.ema.parameters())
        self.opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.num_levels, self.step, self.device = num_levels, 0, device
        s = make_schedule(cfg.schedule, cfg.timesteps)
        col = lambda v: v.to(device=device, dtype=data.dtype)  # noqa: E731
        ab = s.alpha_bar
        self.T, self.D = s.num_timesteps, math.prod(data.shape[1:])
        self.sqrt_ab, self.sqrt_1m_ab = col(ab.sqrt()), col((1 - ab).sqrt())
        self.c0, self.ct = col(s.posterior_coef_x0), col(s.posterior_coef_xt)
        self.log_beta, self.log_bt = col(s.log_beta), col(s.log_beta_tilde_clipped)
        self.sqrt_alpha = col(s.alphas.sqrt())
        self.ab64, self.beta64 = ab[1:].to(device), s.betas[1:].to(device)  # float64, for the chain
        self.ab_T = float(ab[-1])

    def _col(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, t.reshape(-1)).reshape(t.shape + (1,) * (self.data.dim() - 1))

    def _gaussian_log_prob(self, x, mean, log_var):
        d = x - mean
        return (-0.5 * (d * d * torch.exp(-log_var) + log_var + math.log(2 * math.pi))).flatten(
            x.dim() - self.data.dim() + 1).sum(-1)

    def _decoder_log_prob(self, x0, mean, log_var):
        if self.num_levels is None:
            return self._gaussian_log_prob(x0, mean, log_var)
        h, inv_std = 1.0 / (self.num_levels - 1), torch.exp(-0.5 * log_var)
        upper = torch.where(x0 > 1 - h, math.inf, (x0 + h - mean) * inv_std)
        lower = torch.where(x0 < -1 + h, -math.inf, (x0 - h - mean) * inv_std)
        return log_diff_ndtr(lower, upper).flatten(1).sum(-1)

    def _mean_and_log_var(self, xt, t, out, detach_mean):
        eps_hat, v = out.chunk(2, dim=xt.dim() - self.data.dim() + 1)
        a, b = self._col(self.sqrt_ab, t), self._col(self.sqrt_1m_ab, t)
        x0_hat = (xt - b * (eps_hat.detach() if detach_mean else eps_hat)) / a
        mean = self._col(self.c0, t) * x0_hat + self._col(self.ct, t) * xt
        frac = (v + 1) / 2
        log_var = frac * self._col(self.log_beta, t) + (1 - frac) * self._col(self.log_bt, t)
        return eps_hat, mean, log_var

    def _step_term(self, x0, xt, t, mean, log_var):
        mu_q = self._col(self.c0, t) * x0 + self._col(self.ct, t) * xt
        lq = self._col(self.log_bt, t.clamp(min=2))
        d = mu_q - mean
        kl = 0.5 * ((torch.exp(lq) + d * d) * torch.exp(-log_var) + log_var - lq - 1)
        kl = kl.flatten(1).sum(-1)
        return torch.where(t == 1, -self._decoder_log_prob(x0, mean, log_var), kl)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        objective, T, B = self.cfg.objective, self.T, x0.shape[0]
        if objective == "trajectory":
            return self._trajectory(x0)
        t = torch.randint(1, T + 1, (B,), generator=self.gen, device=self.device)
        eps = torch.randn(x0.shape, generator=self.gen, device=self.device, dtype=x0.dtype)
        xt = self._col(self.sqrt_ab, t) * x0 + self._col(self.sqrt_1m_ab, t) * eps
        eps_hat, mean, log_var = self._mean_and_log_var(xt, t, self.net(xt, t),
                                                        objective == "hybrid")
        if objective == "simple":
            return ((eps_hat - eps) ** 2).flatten(1).mean(-1).mean()
        term = self._step_term(x0, xt, t, mean, log_var)
        if objective == "hybrid":
            simple = ((eps_hat - eps) ** 2).flatten(1).mean(-1)
            return (simple + (HYBRID_WEIGHT * T / (self.D * math.log(2))) * term).mean()
        prior = 0.5 * (self.ab_T * x0 * x0 - self.ab_T - math.log(1 - self.ab_T)).flatten(1).sum(-1)
        return (prior + T * term).mean()

    def _trajectory(self, x0):
        """-log p(x_{0:T}) + log q(x_{1:T} | x_0) at one forward trajectory, all T steps at once."""
        T, B = self.T, x0.shape[0]
        eps = torch.randn((T,) + x0.shape, generator=self.gen, device=self.device, dtype=x0.dtype)
        steps = torch.arange(1, T + 1, device=self.device)
        along = (T,) + (1,) * x0.dim()
        ab, beta = self.ab64.reshape(along), self.beta64.reshape(along)
        traj = ((torch.cumsum(eps.double() * (beta / ab).sqrt(), 0) + x0.double()) * ab.sqrt())
        traj = traj.to(x0.dtype).movedim(0, 1).contiguous()  # (B, T) + event
        t = steps.expand(B, T)
        out = self.net(traj, t)
        _, mean, log_var = self._mean_and_log_var(traj, t, out, False)
        x_T = traj[:, -1]
        log_p = -0.5 * (x_T * x_T + math.log(2 * math.pi)).flatten(1).sum(-1)
        log_p = log_p + self._gaussian_log_prob(traj[:, :-1], mean[:, 1:], log_var[:, 1:]).sum(-1)
        log_p = log_p + self._decoder_log_prob(x0, mean[:, 0], log_var[:, 0])
        prev = torch.cat([x0.unsqueeze(1), traj[:, :-1]], 1)
        q_mean = self._col(self.sqrt_alpha, t) * prev
        log_q = self._gaussian_log_prob(traj, q_mean, self._col(self.log_beta, t))
        return (log_q.sum(-1) - log_p).mean()

    def run(self, iterations: int) -> None:
        cfg = self.cfg
        for _ in range(iterations):
            idx = torch.randint(self.data.shape[0], (cfg.batch_size,), generator=self.gen,
                                device=self.device)
            loss = self.loss(self.data[idx])
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            self.opt.step()
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
            self.step += 1


def chain_mean_field_bound(model, x0: torch.Tensor) -> torch.Tensor:
    """The estimator TraceMeanField_ELBO computes with ``markov.posterior_guide``, in torch:
    L_T + sum_t (the term of step t) at ONE trajectory x_{1:T} ~ q(x_{1:T} | x_0) (drawn forward:
    the same joint as the posterior guide's), the network at all T steps in one batch."""
    d, T = model.event_dims, model.num_timesteps
    trajectory = ForwardChain(model.schedule, x0, event_dims=d).rsample()  # (N, T) + event
    t = torch.arange(1, T + 1, device=x0.device).expand(trajectory.shape[:2])
    x0_t = x0.unsqueeze(1).expand_as(trajectory)
    terms = _step_term(model, x0_t, trajectory, t, model._output(trajectory, t))  # (N, T)
    return prior_term(model, x0) + terms.sum(-1)
