r"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, "Score-based
generative modeling through SDEs", sec. 4.3 and app. D.2, eqs. 39-40).

The model's schedule is seen in continuous time u in [0, 1] (``pdiff.continuous.DiscreteLogSNR``):
the variance-preserving SDE dx = -1/2 beta(u) x du + sqrt(beta(u)) dw, with beta(u) =
-d log alpha_bar / du, has the same marginals as the deterministic probability-flow ODE

    dx/du = f(x, u) = -1/2 beta(u) (x + score(x, u)),   score = -eps_hat(x, u) / sigma(u),

with eps_hat the model's noise prediction at real u (``ContinuousDenoiser``) and sigma^2(u) =
1 - alpha_bar(u). The ODE is a continuous normalizing flow from u_0 to 1, so by the instantaneous
change of variables (eq. 39)

    log p_{u_0}(x(u_0)) = log p_1(x(1)) + int_{u_0}^1 div f(x(u), u) du,
    div f = -1/2 beta(u) (D - div eps_hat / sigma(u)),

with the prior p_1 = N(0, I), as Song et al. take it (the forward process leaves x at u = 1 with
q(x_1 | x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I), close to N(0, I) but not equal: the
prior mismatch, as the bound's L_T). div eps_hat is exact (D vector-Jacobian products) for small
D, otherwise the Skilling-Hutchinson estimate z^T (d eps_hat / dx) z with Rademacher z (eq. 40),
the probes fixed along each trajectory: an unbiased estimate of log p whose noise is averaged over
``probes`` per point.

The solver runs in tau = -log alpha_bar(u) = int_0^u beta, where the ODE reads dx/dtau =
-1/2 (x - eps_hat / sigma) with sigma^2 = 1 - exp(-tau), and div(dx/dtau) = -1/2 (D - div eps_hat /
sigma): the same flow and the same integral, but without beta(u), which for a discrete schedule is
piecewise constant with T jumps that an adaptive solver in u must resolve one by one (on 3-D
Gaussian data with T = 1000 and rtol = atol = 1e-5: 62 evaluations and an error of 3e-5 nats in tau,
152 evaluations and 2e-3 nats in u). A network then sees its step u(tau) T continuous in tau.

The ODE starts at u_0 = ``u_start`` (1e-5 as Song et al. for DDPM checkpoints), not at 0 where
sigma = 0 and the score diverges: the data are treated as the marginal at u_0, and the network is
evaluated at the continuous step u_0 T, below the first step it was trained on (s = 1).

Discrete data (a discretized decoder with K levels -1 + 2k/(K - 1)) are dequantized uniformly,
z = x + U(-1/(K - 1), 1/(K - 1))^D, one draw per point: since P(x) = int_bin p(z) dz,

    -log P(x) <= E_U[-log p(z)] - D log(2 / (K - 1)),

an upper bound on the NLL of the discrete data, in the same units (probability mass of the K
levels) as the discretized decoder's bound; bits/dim = nats / (D ln 2) for both.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .continuous import ContinuousDenoiser
from .distributions.reverse import ReverseProcess
from .elbo import _num_examples, bits_per_dim, nll_summary

DIVERGENCES = ("auto", "exact", "hutchinson")
METHODS = ("RK45", "RK23", "DOP853")
# "auto" takes the exact divergence (D backward passes per evaluation) up to this many dimensions
EXACT_MAX_DIM = 8


@dataclass
class ODEResult:
    """Per example (N,), float64, in nats summed over data dimensions (the model's units):

    ``nll`` the estimate of -log p(x) (with dequantization, of -log P(x)); ``probe_nll`` (N, P) the
    estimate of each Hutchinson probe, whose mean over P is ``nll`` (None when exact); ``prior``
    -log N(x(1); 0, I); ``latent`` x(1), the flow's endpoint (dequantized input's), data dtype.
    ``dequantization_nats`` = -D log(2/(K - 1)), included in ``nll`` (0 without dequantization).
    ``nfe``: ODE function evaluations summed over the chunks (each one network pass and D or P
    backward passes); ``nfe_per_chunk`` each chunk's.
    """

    nll: torch.Tensor
    probe_nll: torch.Tensor | None
    prior: torch.Tensor
    latent: torch.Tensor
    dequantization_nats: float
    divergence: str
    probes: int | None
    nfe: int
    nfe_per_chunk: list[int]
    wall_seconds: float


def _check_options(rtol, atol, u_start, divergence, probes, chunk_size, method):
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; valid: {', '.join(METHODS)}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(u_start, (int, float)) and 0 < u_start < 1):
        raise ValueError(f"u_start must lie in (0, 1), got {u_start!r}")
    for name, value in (("probes", probes), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _divergence(eps: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """div_x eps_hat per example, (n, 1) exact (one backward pass per dimension), or (n, P) the
    Hutchinson estimates z_p^T J z_p (one backward pass per probe). Examples must not interact in
    the network (true in eval mode: no batch norm), so one VJP of the summed output serves all."""
    flat = eps.flatten(1)  # (n, D)
    if not eps.requires_grad:  # eps_hat does not depend on x
        return torch.zeros(flat.shape[0], 1 if probes is None else probes.shape[0],
                           dtype=torch.float64, device=x.device)
    if probes is None:
        D = flat.shape[1]
        div = torch.zeros(flat.shape[0], 1, dtype=torch.float64, device=x.device)
        for i in range(D):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < D - 1,
                                       allow_unused=True)
            if g is not None:
                div[:, 0] += g.flatten(1)[:, i].double()
        return div
    P = probes.shape[0]
    div = torch.empty(flat.shape[0], P, dtype=torch.float64, device=x.device)
    for p in range(P):
        (g,) = torch.autograd.grad((eps * probes[p]).sum(), x, retain_graph=p < P - 1,
                                   allow_unused=True)
        div[:, p] = 0 if g is None else (g * probes[p]).flatten(1).sum(1).double()
    return div


def _solve_chunk(den: ContinuousDenoiser, x: torch.Tensor, probes: torch.Tensor | None,
                 u_start: float, rtol: float, atol: float, method: str):
    """Integrate [x, delta log p] from u_start to 1 for the points ``x`` (n,) + event as one
    flattened float64 state (as Song et al. do), in the time tau = -log alpha_bar(u) (module
    docstring). Returns (x(1), int div f du (n, P), nfe)."""
    shape, n, dev = x.shape, x.shape[0], x.device
    D = x[0].numel()
    cols = 1 if probes is None else probes.shape[0]
    tau_table = (-den.log_snr.log_alpha_bar_table).numpy()  # (T + 1,) increasing from 0
    T = len(tau_table) - 1

    def u_of_tau(tau: float) -> float:  # the inverse of the piecewise-linear tau(u)
        i = min(max(int(np.searchsorted(tau_table, tau, side="right")) - 1, 0), T - 1)
        return (i + (tau - tau_table[i]) / (tau_table[i + 1] - tau_table[i])) / T

    def f(tau: float, y: np.ndarray) -> np.ndarray:
        x64 = torch.from_numpy(y[: n * D]).to(dev).reshape(shape)
        u = torch.full((n,), u_of_tau(tau), dtype=torch.float64, device=dev)
        sigma = math.sqrt(-math.expm1(-tau))
        with torch.enable_grad():
            xu = x64.to(x.dtype).detach().requires_grad_(True)
            eps = den(xu, u)
            div_eps = _divergence(eps, xu, probes)  # (n, cols)
        drift = -0.5 * (x64 - eps.detach().double() / sigma)  # dx/dtau
        ddelta = -0.5 * (D - div_eps / sigma)  # div of dx/dtau
        return torch.cat([drift.reshape(-1), ddelta.reshape(-1)]).cpu().numpy()

    tau_span = [float(-den.log_snr.log_alpha_bar(torch.tensor([v], dtype=torch.float64)))
                for v in (u_start, 1.0)]
    y0 = np.concatenate([x.detach().double().reshape(-1).cpu().numpy(), np.zeros(n * cols)])
    sol = solve_ivp(f, tau_span, y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the probability-flow ODE solver failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1].copy())
    latent = end[: n * D].reshape(shape).to(dev, x.dtype)
    delta = end[n * D:].reshape(n, cols).to(dev)
    return latent, delta, int(sol.nfev)


def ode_nll(model: ReverseProcess, x0: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
            u_start: float = 1e-5, divergence: str = "auto", probes: int = 1,
            method: str = "RK45", generator: torch.Generator | None = None,
            chunk_size: int = 1024, progress: Callable[[int], None] | None = None) -> ODEResult:
    """-log p(x) of each example of ``x0`` ((N,) + event, already rescaled for the model) under the
    probability-flow ODE of ``model`` (eq. 39; see the module docstring), with no gradients.

    ``divergence``: ``exact``, ``hutchinson`` (``probes`` Rademacher probes per point, fixed along
    its trajectory) or ``auto`` (exact up to ``EXACT_MAX_DIM`` dimensions). ``rtol``, ``atol``,
    ``method``: scipy's ``solve_ivp`` on the flattened state of ``chunk_size`` points at a time (the
    solver's steps are shared by a chunk, so results depend on it at the level of the tolerances).
    ``generator`` draws the probes and the dequantization noise (on ``x0``'s device). A model with
    a discretized decoder has its data dequantized (module docstring). ``progress(points)`` is
    called after each chunk. The network should be in eval mode (examples independent).
    """
    _check_options(rtol, atol, u_start, divergence, probes, chunk_size, method)
    den = ContinuousDenoiser(model)  # refuses mean prediction, one-hot or learned time tables
    N = _num_examples(model, x0)
    if N == 0:
        raise ValueError("ode_nll needs at least one example")
    D, dev = x0[0].numel(), x0.device
    exact = divergence == "exact" or (divergence == "auto" and D <= EXACT_MAX_DIM)
    start_time = time.perf_counter()
    offset = 0.0
    if model.decoder_type == "discretized":
        half = 1.0 / (model.num_levels - 1)  # half a bin
        noise = torch.rand(x0.shape, dtype=x0.dtype, device=dev, generator=generator)
        x0 = x0 + (2 * noise - 1) * half
        offset = -D * math.log(2 * half)
    cols = 1 if exact else probes
    delta = torch.empty(N, cols, dtype=torch.float64, device=dev)
    latent = torch.empty_like(x0)
    nfe = []
    with torch.no_grad():
        for start in range(0, N, chunk_size):
            x = x0[start: start + chunk_size]
            z = None
            if not exact:
                z = torch.randint(0, 2, (probes,) + x.shape, generator=generator, device=dev)
                z = (2 * z - 1).to(x.dtype)  # (P, n) + event, Rademacher
            latent[start: start + len(x)], delta[start: start + len(x)], k = _solve_chunk(
                den, x, z, u_start, rtol, atol, method)
            nfe.append(k)
            if progress is not None:
                progress(len(x))
    z1 = latent.double().flatten(1)
    prior = 0.5 * (z1 * z1).sum(1) + 0.5 * D * math.log(2 * math.pi)  # -log N(x(1); 0, I)
    per_probe = prior[:, None] - delta + offset
    return ODEResult(nll=per_probe.mean(1), probe_nll=None if exact else per_probe, prior=prior,
                     latent=latent, dequantization_nats=offset,
                     divergence="exact" if exact else "hutchinson",
                     probes=None if exact else probes, nfe=sum(nfe), nfe_per_chunk=nfe,
                     wall_seconds=time.perf_counter() - start_time)


@dataclass
class ODEReport:
    """The probability-flow ODE's NLL averaged over examples, in nats summed over dimensions.

    ``nll_nats`` = mean ODE NLL - ``log_jacobian_nats`` (in the data's units, as ``BoundReport``);
    with ``dequantization`` ``uniform`` it is the bound on the discrete data's -log P(x) and
    includes ``dequantization_nats`` = -D log(2/(K - 1)). ``nll_stderr``: std over examples /
    sqrt(N), each example's estimate with its probe and dequantization noise (None for N = 1,
    never NaN).
    ``prior_nats``: mean -log N(x(1); 0, I). ``gap_nats``, ``gap_stderr``: as in ``BoundReport``
    (paired with ``data_log_prob``, else against ``entropy``). ``nfe`` sums the chunks' function
    evaluations, ``nfe_max`` is the largest chunk's; ``probes`` is None for the exact divergence.
    """

    nll_nats: float
    nll_stderr: float | None
    bits_per_dim: float
    prior_nats: float
    log_jacobian_nats: float
    dequantization: str | None
    dequantization_nats: float
    entropy_nats: float | None
    entropy_stderr: float | None
    gap_nats: float | None
    gap_stderr: float | None
    nfe: int
    nfe_max: int
    num_chunks: int
    rtol: float
    atol: float
    method: str
    u_start: float
    divergence: str
    probes: int | None
    num_samples: int
    dim: int
    chunk_size: int
    wall_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def ode_report(model: ReverseProcess, x: torch.Tensor, *, log_jacobian: float = 0.0,
               entropy: tuple[float | None, float | None] = (None, None),
               data_log_prob: torch.Tensor | None = None, rtol: float = 1e-5,
               atol: float = 1e-5, u_start: float = 1e-5, divergence: str = "auto",
               probes: int = 1, method: str = "RK45", generator: torch.Generator | None = None,
               chunk_size: int = 1024, progress: bool = False) -> ODEReport:
    """``ode_nll`` of the (already rescaled) examples ``x`` summarized like
    ``evaluation.bound_report``: ``log_jacobian`` (sum_d log scale_d of the rescaling) is
    subtracted to give nats in the data's units; ``entropy`` and ``data_log_prob`` give the gap.
    ``progress``: a progress bar over the examples (on a terminal)."""
    from tqdm import tqdm

    bar = tqdm(total=x.shape[0] if x.dim() else 0, disable=None if progress else True,
               desc="ode", unit="pt", dynamic_ncols=True)
    try:
        r = ode_nll(model, x, rtol=rtol, atol=atol, u_start=u_start, divergence=divergence,
                    probes=probes, method=method, generator=generator, chunk_size=chunk_size,
                    progress=bar.update)
    finally:
        bar.close()
    total = r.nll - log_jacobian
    n, dim = total.shape[0], x[0].numel()
    h, h_se = entropy
    nll, stderr, gap, gap_se = nll_summary(total, entropy, data_log_prob)
    return ODEReport(nll_nats=nll, nll_stderr=stderr, bits_per_dim=bits_per_dim(nll, dim),
                     prior_nats=r.prior.mean().item(), log_jacobian_nats=log_jacobian,
                     dequantization="uniform" if model.decoder_type == "discretized" else None,
                     dequantization_nats=r.dequantization_nats, entropy_nats=h,
                     entropy_stderr=h_se, gap_nats=gap, gap_stderr=gap_se, nfe=r.nfe,
                     nfe_max=max(r.nfe_per_chunk), num_chunks=len(r.nfe_per_chunk), rtol=rtol,
                     atol=atol, method=method, u_start=u_start, divergence=r.divergence,
                     probes=r.probes, num_samples=n, dim=dim, chunk_size=chunk_size,
                     wall_seconds=r.wall_seconds)
