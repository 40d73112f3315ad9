r"""Continuous time: the log-SNR schedule lambda(u) on u in [0, 1], the denoiser at any u, and the
continuous-time bound of Kingma et al. 2021 (Variational Diffusion Models, eq. 17).

With alpha_bar(u) = sigmoid(lambda(u)) and sigma^2(u) = 1 - alpha_bar(u) = sigmoid(-lambda(u)),
x_u = sqrt(alpha_bar(u)) x_0 + sigma(u) eps is the same marginal as Ho et al.'s eq. 4. A discrete
``NoiseSchedule`` of T steps is the continuous schedule seen at u_t = t / T:

    log alpha_bar(u) interpolates log alpha_bar_t linearly between u_t = t/T (``DiscreteLogSNR``),

so beta(u) = -d log alpha_bar / du is piecewise constant, T log(1 / alpha_t) ~ T beta_t (the
variance-preserving SDE of Song et al. 2021, sec. 3.4 and app. B, at the schedule's own steps).
A network trained on the integer steps 1..T is evaluated at u through the continuous step s = u T
(``ContinuousDenoiser``); its time embedding must accept real s (the sinusoidal one does).

The continuous-time bound (VDM eq. 17, with the decoder and prior of the discrete chain):

    -log p(x_0) <= L_T + L_0 + 1/2 E_{u ~ U(u_1, 1), eps} [ -lambda'(u) ||eps - eps_hat(x_u, u)||^2 ] (1 - u_1)

L_T = KL(q(x_1-ish at u = 1 | x_0) || N(0, I)) and L_0 = -log p(x_0 | x_{u_1}) are the discrete
chain's own (u_1 = 1/T, its first step). The T'-step chain on u_1 < ... < u_T' = 1 (``discretize``)
has the bound L_T + L_0 + sum_i 1/2 (SNR(u_{i-1}) / SNR(u_i) - 1) ||eps - eps_hat||^2 (with the
posterior's variance beta_tilde), which decreases to the continuous bound as T' grows (VDM sec. 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributions.reverse import ReverseProcess
from .elbo import _num_examples, _step_term, prior_term
from .nets.embeddings import LearnedEmbedding, OneHotEmbedding
from .schedules import NoiseSchedule


class DiscreteLogSNR:
    """lambda(u) of a discrete schedule: log alpha_bar linear in u between u_t = t / T, t = 0..T
    (log alpha_bar_0 = 0: lambda(0) = +inf, the data). Float64; ``u`` in [0, 1]."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.log_alpha_bar_table = torch.log(schedule.alpha_bar)  # (T + 1,), index 0: 0

    def _segment(self, u: torch.Tensor):
        T = self.num_timesteps
        table = self.log_alpha_bar_table.to(u.device)
        s = u.to(torch.float64) * T
        i = s.floor().long().clamp(0, T - 1)
        return table[i], table[i + 1], s - i, T

    def log_alpha_bar(self, u: torch.Tensor) -> torch.Tensor:
        lo, hi, w, _ = self._segment(u)
        return lo + w * (hi - lo)

    def beta(self, u: torch.Tensor) -> torch.Tensor:
        """beta(u) = -d log alpha_bar / du (piecewise constant; the VP SDE's beta(t))."""
        lo, hi, _, T = self._segment(u)
        return T * (lo - hi)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """lambda(u) = log alpha_bar(u) - log(1 - alpha_bar(u))."""
        la = self.log_alpha_bar(u)
        return la - torch.log(-torch.expm1(la))

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        """d lambda / du = d log alpha_bar / du / (1 - alpha_bar(u)) (negative: lambda decreases)."""
        return -self.beta(u) / -torch.expm1(self.log_alpha_bar(u))


def alpha_sigma(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar), sigma) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda)))."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def discretize(log_snr, num_steps: int, u_first: float) -> NoiseSchedule:
    """The ``num_steps``-step chain of the continuous schedule ``log_snr`` on the even grid
    u_1 = ``u_first`` < ... < u_T' = 1 (x_1 at u_first, where the decoder sits)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < u_first <= 1:
        raise ValueError(f"u_first must lie in (0, 1], got {u_first}")
    u = (torch.linspace(u_first, 1.0, num_steps, dtype=torch.float64) if num_steps > 1
         else torch.ones(1, dtype=torch.float64))
    log_ab = torch.nn.functional.logsigmoid(log_snr(u).to(torch.float64))
    log_ab = torch.cat([log_ab.new_zeros(1), log_ab])
    return NoiseSchedule.from_betas(-torch.expm1(log_ab[1:] - log_ab[:-1]), warn=False)


def _takes_real_time(net) -> bool:
    while not isinstance(net, torch.nn.Module) and hasattr(net, "net"):  # through CastNet & co.
        net = net.net
    modules = net.modules() if isinstance(net, torch.nn.Module) else ()
    return not any(isinstance(m, (OneHotEmbedding, LearnedEmbedding)) for m in modules)


class ContinuousDenoiser:
    """eps_hat(x_u, u) of a ``ReverseProcess`` at any u in (0, 1]: its network at the continuous
    step s = u T (the steps it was trained on are s = 1..T), its prediction turned into eps with
    alpha and sigma at lambda(u). The Gaussian-mixture oracle is evaluated exactly at alpha_bar(u)."""

    def __init__(self, model: ReverseProcess, log_snr: DiscreteLogSNR | None = None):
        if model.prediction == "mean":
            raise ValueError("continuous time needs an eps, x0 or v prediction: a posterior-mean "
                             "network's output belongs to one discrete step")
        if model._maps is not None:
            raise ValueError("continuous time takes the model on its training chain, not a "
                             "respaced one")
        if not (_takes_real_time(model.net) or hasattr(model.net, "x0_at_alpha_bar")):
            raise ValueError("continuous time needs a network whose time embedding takes real "
                             "steps (sinusoidal); this one has a one-hot or learned table of "
                             "the integer steps")
        self.model = model
        self.log_snr = log_snr if log_snr is not None else DiscreteLogSNR(model.schedule)
        self.num_timesteps = model.num_timesteps

    def __call__(self, xt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """eps_hat, shape of ``xt``; ``u`` has its batch shape (or broadcasts to it)."""
        d = self.model.event_dims
        batch = xt.shape[: xt.dim() - d]
        u = torch.as_tensor(u, device=xt.device).expand(batch)
        lam = self.log_snr(u).to(xt.dtype)
        a, s = (v.reshape(batch + (1,) * d) for v in alpha_sigma(lam))
        return self.eps(xt, u, a, s)

    def eps(self, xt: torch.Tensor, u: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        """eps_hat at (x_u, u) given alpha = ``a`` and sigma = ``s`` there (shaped to broadcast
        against ``xt``), for callers that computed them (and may train through them)."""
        m = self.model
        oracle = getattr(m.net, "x0_at_alpha_bar", None)
        if oracle is not None:
            return (xt - a * oracle(xt, (a**2).reshape(u.shape))) / s
        pred, _ = m._split(m.net(xt, (u * self.num_timesteps).to(xt.dtype)))
        if m.prediction == "eps":
            return pred
        if m.prediction == "x0":
            return (xt - a * pred) / s
        return s * xt + a * pred  # v: eps = sigma x_u + alpha v


@dataclass
class ContinuousBound:
    """The continuous-time bound per example (nats summed over data dimensions), each (N,):
    ``prior`` L_T, ``decoder`` L_0, ``diffusion`` the integral over u in (u_1, 1) estimated from
    ``num_u`` stratified draws per example."""

    prior: torch.Tensor
    decoder: torch.Tensor
    diffusion: torch.Tensor
    num_u: int

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.decoder + self.diffusion


def continuous_bound(model: ReverseProcess, x0: torch.Tensor, *, num_u: int = 16,
                     chunk_size: int = 16384, generator: torch.Generator | None = None,
                     log_snr=None, progress=None) -> ContinuousBound:
    """The continuous-time bound (VDM eq. 17; see the module docstring) of ``model`` on its own
    schedule seen in continuous time: L_T and L_0 exactly as the discrete chain has them, the
    diffusion integral from ``num_u`` draws per example, an unbiased estimate.

    The integral is taken in lambda, where it reads 1/2 int_{lambda(1)}^{lambda(u_1)}
    E||eps - eps_hat(x_lambda)||^2 dlambda (VDM eq. 19: the schedule only reparameterizes it): the
    draws are stratified uniformly in lambda and mapped back to u (``inverse``). Uniform u would
    weight each draw by -lambda'(u), which is huge near u_1 (a hundred times the average on the
    linear schedule), and make the estimate far noisier. ``log_snr``: a learned schedule the
    model was trained on (default: the model's schedule, ``DiscreteLogSNR``)."""
    N = _num_examples(model, x0)
    if num_u < 1:
        raise ValueError(f"num_u must be >= 1, got {num_u}")
    den = ContinuousDenoiser(model, log_snr)
    T, d, dev = model.num_timesteps, model.event_dims, x0.device
    u_first = 1.0 / T
    with torch.no_grad():
        prior = prior_term(model, x0)
        ones = torch.ones(N, dtype=torch.long, device=dev)
        decoder = x0.new_zeros(N)
        for start in range(0, N, chunk_size):
            stop = min(start + chunk_size, N)
            x, t = x0[start:stop], ones[start:stop]
            eps = torch.randn(x.shape, dtype=x.dtype, device=dev, generator=generator)
            xt = (model.schedule.at("sqrt_alpha_bar", t, x, d) * x
                  + model.schedule.at("sqrt_one_minus_alpha_bar", t, x, d) * eps)
            decoder[start:stop] = _step_term(model, x, xt, t, model._output(xt, t))
        ends = den.log_snr(torch.tensor([u_first, 1.0], dtype=torch.float64, device=dev))
        lam_max, lam_min = float(ends[0]), float(ends[1])
        strata = (torch.arange(num_u, device=dev, dtype=torch.float64)
                  + torch.rand((N, num_u), generator=generator, device=dev, dtype=torch.float64))
        lam_all = (lam_min + (lam_max - lam_min) * strata / num_u).reshape(-1)  # example-major
        n = torch.arange(N, device=dev).repeat_interleave(num_u)
        terms = x0.new_empty(N * num_u)
        for start in range(0, N * num_u, chunk_size):
            stop = min(start + chunk_size, N * num_u)
            lam, x = lam_all[start:stop], x0.index_select(0, n[start:stop])
            uc = inverse(den.log_snr, lam, u_first, 1.0)
            a, s = (v.to(x.dtype).reshape(lam.shape + (1,) * d) for v in alpha_sigma(lam))
            eps = torch.randn(x.shape, dtype=x.dtype, device=dev, generator=generator)
            err = (eps - den.eps(a * x + s * eps, uc, a, s)) ** 2
            terms[start:stop] = 0.5 * err.flatten(x.dim() - d).sum(-1)
            if progress is not None:
                progress(stop - start)
        diffusion = terms.reshape(N, num_u).mean(1) * (lam_max - lam_min)
    return ContinuousBound(prior=prior, decoder=decoder, diffusion=diffusion, num_u=num_u)


def inverse(log_snr, lam: torch.Tensor, lo: float, hi: float, iterations: int = 60) -> torch.Tensor:
    """u in [lo, hi] with log_snr(u) = ``lam``, for a decreasing ``log_snr``, by bisection (60
    halvings: float64's resolution on [0, 1])."""
    a = torch.full_like(lam, lo, dtype=torch.float64)
    b = torch.full_like(lam, hi, dtype=torch.float64)
    for _ in range(iterations):
        mid = (a + b) / 2
        above = log_snr(mid) > lam  # lambda still too large: the root lies later
        a, b = torch.where(above, mid, a), torch.where(above, b, mid)
    return (a + b) / 2


class LearnedLogSNR(torch.nn.Module):
    """A learned monotone schedule with fixed endpoints (VDM sec. 3.4 and app. H's monotone network):

        lambda(u) = lambda(u_1) + (lambda(1) - lambda(u_1)) (f(u) - f(u_1)) / (f(1) - f(u_1)),
        f(u) = l1(u) + l3(sigmoid(l2(l1(u)))),

    every weight of l1, l2, l3 kept positive (softplus), so f increases and lambda decreases from
    the base schedule's ``lambda(u_1)`` to its ``lambda(1)``: the prior and decoder terms stay
    what they are, and only the diffusion integral's variance depends on the schedule (its mean
    does not, VDM eq. 19). Train it on the squared loss (``continuous_loss`` does, through
    gradient hooks). Float64."""

    def __init__(self, base: DiscreteLogSNR, hidden: int = 64):
        super().__init__()
        self.u_first = 1.0 / base.num_timesteps
        ends = base(torch.tensor([self.u_first, 1.0], dtype=torch.float64))
        self.register_buffer("ends", ends)
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.b1 = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dtype=torch.float64, generator=g))
        self.b2 = torch.nn.Parameter(torch.zeros(hidden, dtype=torch.float64))
        self.w3 = torch.nn.Parameter(torch.full((hidden,), -5.0, dtype=torch.float64))

    def _f(self, u: torch.Tensor) -> torch.Tensor:
        sp = torch.nn.functional.softplus
        h = sp(self.w1) * u + self.b1  # (...,)
        return h + (torch.sigmoid(h[..., None] * sp(self.w2) + self.b2) * sp(self.w3)).sum(-1)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(torch.float64)
        ends = self.ends
        f0, f1 = self._f(ends.new_tensor([self.u_first, 1.0]))
        return ends[0] + (ends[1] - ends[0]) * (self._f(u) - f0) / (f1 - f0)

    def derivative(self, u: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """d lambda / du by automatic differentiation (with ``create_graph`` to train through it)."""
        with torch.enable_grad():
            u = u.detach().to(torch.float64).requires_grad_(True)
            (d,) = torch.autograd.grad(self(u).sum(), u, create_graph=create_graph)
        return d


def gaussian_discrete_diffusion(schedule: NoiseSchedule, data_var: float) -> float:
    """E[sum_{t>=2} L_{t-1}] per dimension of the exact denoiser on N(mu, data_var) data with the
    posterior's variance (beta_tilde), in closed form: L_{t-1} = c0_t^2 ||x_0 - x0_hat||^2 /
    (2 beta_tilde_t) with E||x_0 - E[x_0 | x_t]||^2 = s^2 (1 - ab_t) / (ab_t s^2 + 1 - ab_t) per
    dimension (the discrete counterpart of ``gaussian_mmse_integral``)."""
    ab = schedule.alpha_bar[2:]
    post_var = data_var * (1 - ab) / (ab * data_var + 1 - ab)
    return float((schedule.posterior_coef_x0[2:] ** 2 * post_var / (2 * schedule.beta_tilde[2:])).sum())


def gaussian_mmse_integral(log_snr, u_first: float, data_var: float, *, points: int = 20001) -> float:
    """1/2 int_{u_first}^1 -lambda'(u) mmse(u) du per dimension for N(mu, data_var) data, where
    mmse(u) = E||eps - E[eps | x_u]||^2 = alpha_bar s^2 / (alpha_bar s^2 + sigma^2): the
    diffusion term of the continuous bound of the exact denoiser, by the substitution
    dlambda (Simpson's rule in lambda, which is smooth there)."""
    ends = log_snr(torch.tensor([u_first, 1.0], dtype=torch.float64))
    lam = torch.linspace(float(ends[1]), float(ends[0]), points, dtype=torch.float64)
    snr = lam.exp()
    f = 0.5 * snr * data_var / (snr * data_var + 1)  # mmse as a function of SNR
    h = (lam[-1] - lam[0]) / (points - 1)
    w = torch.ones(points, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((f * w).sum() * h / 3)

