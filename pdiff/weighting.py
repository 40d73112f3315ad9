r"""Diffusion losses as weighted ELBOs (Kingma & Gao 2023), on pdiff's discrete chain t = 1..T.

Kingma & Gao write each eps-space loss as a weighting of the bound's diffusion part, in the log
signal-to-noise ratio lambda_t = log SNR_t = log(alpha_bar_t / (1 - alpha_bar_t)):

    L_w = 1/2 E_{t ~ U(0, 1)} [ w(lambda_t) (-d lambda / dt) ||eps - eps_hat||^2 ],

w = 1 being the ELBO. On the chain t = 1..T with sigma_t^2 = beta_tilde_t
(``fixed_small``) the bound's term of step t >= 2 is exactly

    L_{t-1} = 1/2 Delta_t ||eps - eps_hat||^2,   Delta_t = SNR_{t-1} / SNR_t - 1
                                                         = expm1(lambda_{t-1} - lambda_t),

(the KL of two Gaussians of variance beta_tilde_t: ||mu_tilde - mu_theta||^2 / (2 beta_tilde_t) =
beta_t / (2 alpha_t (1 - alpha_bar_{t-1})) ||eps - eps_hat||^2, and beta_t / (alpha_t (1 -
alpha_bar_{t-1})) = Delta_t), so Delta_t is the discrete -d lambda/dt dt. Every weighting here is a
per-step weight c_t on the eps error with t ~ U{1..T} (``step_weights``; entry t - 1 is step t):

    loss_t = c_t mean_i (eps_i - eps_hat_i)^2      (``elbo``: summed over i, in nats)

and its implied weighting is w(lambda_t) = c_t / (1/2 T Delta_t) for t = 2..T
(``implied_weighting``; step 1 has none: lambda_0 = +inf, Delta_1 = inf). With SNR = SNR_t,
lambda = lambda_t:

- ``simple``  c_t = 1: eps-MSE, Ho et al.'s L_simple under the eps prediction. On the cosine
  schedule w is proportional to sech(lambda / 2) (Kingma & Gao).
- ``elbo``    c_t = 1/2 T Delta_t on the sum over dimensions (t >= 2), w = 1; step 1 takes the
  decoder's -log p(x_0 | x_1) instead (``c_1`` is 0, see ``objectives.elbo_loss``).
- ``snr``     c_t = 1 / SNR: the x_0-MSE, ||x_0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR_t (the
  ``simple`` loss of the x0 prediction); w = e^{-lambda} times that of ``simple``. Conventions
  differ on which loss carries the weight: Hang et al. weight the x_0 loss, so this is their
  constant weight and the eps-MSE their "SNR weighting"; Kingma & Gao, and this module, weight
  the eps loss, where the x_0-MSE is the weight 1 / SNR. The loss is the x_0-MSE either way.
- ``min_snr`` c_t = min(SNR, gamma) / SNR: Min-SNR-gamma (Hang et al. 2023: their weight
  min(SNR, gamma) on the x_0 loss, divided by SNR on the eps loss), ``gamma`` = 5: the eps-MSE
  where SNR <= gamma, gamma times the x_0-MSE above.
- ``p2``      c_t = 1 / (k + SNR)^gamma on L_simple's eps-MSE (Choi et al. 2022), ``k`` = 1,
  ``gamma`` = 1 (gamma = 0 is ``simple``).
- ``edm``     EDM's loss (Karras et al. 2022, Table 1): ln sigma ~ N(``p_mean`` = -1.2,
  ``p_std``^2 = 1.2^2) and the weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x_0
  MSE, ``sigma_data`` = 0.5, with sigma^2 = 1 / SNR (the VE x is the VP x / sqrt(alpha_bar)). So
  lambda = -2 ln sigma ~ N(-2 p_mean, 4 p_std^2) = N(2.4, 2.4^2) and, on the eps error,
  (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 / SNR = (e^{-lambda} + sigma_data^2) /
  sigma_data^2 =: g(lambda). EDM's lambda is rounded to the step whose cell (lambda_t,
  lambda_{t-1}] holds it (lambda_0 = +inf; the cell of T reaches down to -inf), so with uniform t
  the step carries T times its cell's probability:

      c_t = T P_EDM(lambda in (lambda_t, lambda_{t-1}]) g(lambda_t)
          ~ T |lambda_{t-1} - lambda_t| N(lambda_t; 2.4, 2.4^2) g(lambda_t),

  (the density of lambda under EDM over that of lambda_t under uniform t, 1 / (T |Delta lambda|)),
  and w -> 2 N(lambda; 2.4, 2.4^2) (e^{-lambda} + 0.5^2) / 0.5^2 as the steps shrink (Kingma &
  Gao's EDM weighting).
- ``v_mse``   c_t = (1 + SNR) / SNR = 1 / alpha_bar_t: the v-MSE, ``simple`` under the v
  prediction (v - v_hat = (eps - eps_hat) / sqrt(alpha_bar_t)); w -> e^{-lambda / 2} times a
  constant on the cosine schedule. A reference curve: its objective is ``simple`` with
  ``prediction="v"``.

The options and their defaults are in ``OPTIONS``; an unknown name or option raises ``ValueError``
naming the valid ones.
"""
from __future__ import annotations

import math
import weakref
from pathlib import Path

import torch

from .files import atomic_write
from .schedules import NoiseSchedule, make_schedule

OPTIONS: dict[str, dict[str, float]] = {
    "simple": {}, "elbo": {}, "snr": {}, "min_snr": {"gamma": 5.0}, "p2": {"k": 1.0, "gamma": 1.0},
    "edm": {"p_mean": -1.2, "p_std": 1.2, "sigma_data": 0.5}, "v_mse": {},
}
WEIGHTINGS = tuple(OPTIONS)

# step_weights per schedule, device and dtype: the training hot path gathers from them every step
_TABLES: "weakref.WeakKeyDictionary[NoiseSchedule, dict]" = weakref.WeakKeyDictionary()


def check_options(name: str, options: dict) -> dict[str, float]:
    """The options of weighting ``name``: its defaults updated with ``options``, checked."""
    if name not in OPTIONS:
        raise ValueError(f"unknown weighting {name!r}; valid: {', '.join(WEIGHTINGS)}")
    valid = OPTIONS[name]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name!r}; valid: "
                         f"{', '.join(valid) if valid else 'none'}")
    merged = {**valid, **{k: float(v) for k, v in options.items()}}
    if not all(math.isfinite(v) for v in merged.values()):
        raise ValueError(f"the options of {name!r} must be finite, got {merged}")
    positive = {"min_snr": ("gamma",), "edm": ("p_std", "sigma_data")}.get(name, ())
    if name == "p2" and merged["k"] < 0:
        raise ValueError(f"p2 needs k >= 0, got {merged['k']}")
    for key in positive:
        if merged[key] <= 0:
            raise ValueError(f"{name} needs {key} > 0, got {merged[key]}")
    return merged


def log_snr(schedule: NoiseSchedule) -> torch.Tensor:
    """lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) for t = 0..T (index 0: +inf), float64.

    log alpha_bar_t is summed from log1p(-beta_s), and log(1 - alpha_bar_t) = log(-expm1(...)),
    so neither end loses digits (alpha_bar_t near 1 at t = 1, near 0 at t = T)."""
    log_ab = torch.cumsum(torch.log1p(-schedule.betas), 0)
    return log_ab - torch.log(-torch.expm1(log_ab))


def snr_ratio_minus_one(schedule: NoiseSchedule) -> torch.Tensor:
    """Delta_t = SNR_{t-1} / SNR_t - 1 = expm1(lambda_{t-1} - lambda_t), t = 1..T (Delta_1 = inf):
    the eps-form coefficient of the fixed_small bound, L_{t-1} = 1/2 Delta_t ||eps - eps_hat||^2."""
    lam = log_snr(schedule)
    return torch.expm1(lam[:-1] - lam[1:])


def _edm_cells(lam: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """P(lambda in (lambda_t, lambda_{t-1}]) for t = 1..T under lambda ~ N(-2 p_mean, (2 p_std)^2),
    lambda_0 = +inf and the last cell open below. Upper tails are differenced as survival
    functions, lower ones as CDFs, so no cell loses its digits to 1 - 1."""
    mu, s = -2 * p_mean, 2 * p_std
    upper = (lam[:-1] - mu) / s  # (T,) +inf first
    lower = ((lam[1:] - mu) / s).clone()
    lower[-1] = -math.inf
    ndtr = torch.special.ndtr
    return torch.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))


def step_weights(name: str, schedule: NoiseSchedule, **options) -> torch.Tensor:
    """c_1..c_T of weighting ``name`` (module docstring), shape (T,), float64: the loss at step t
    is c_t times the eps-MSE (``elbo``: times the sum over dimensions; c_1 = 0 there)."""
    o = check_options(name, options)
    lam = log_snr(schedule)[1:]  # (T,) lambda_1..lambda_T
    T = schedule.num_timesteps
    if name == "simple":
        return torch.ones(T, dtype=torch.float64)
    if name == "elbo":
        half_delta = 0.5 * T * snr_ratio_minus_one(schedule)
        half_delta[0] = 0.0  # step 1 is the decoder's NLL, not an eps error
        return half_delta
    if name == "snr":
        return torch.exp(-lam)
    if name == "min_snr":
        snr = torch.exp(lam)
        # snr / snr is exactly 1 where SNR <= gamma
        return torch.minimum(snr, torch.full_like(snr, o["gamma"])) / snr
    if name == "p2":
        return torch.exp(-o["gamma"] * torch.log(o["k"] + torch.exp(lam)))
    if name == "edm":
        g = (torch.exp(-lam) + o["sigma_data"] ** 2) / o["sigma_data"] ** 2
        return T * _edm_cells(log_snr(schedule), o["p_mean"], o["p_std"]) * g
    return 1 + torch.exp(-lam)  # v_mse


def step_weights_like(name: str, schedule: NoiseSchedule, like: torch.Tensor,
                      **options) -> torch.Tensor:
    """``step_weights`` on ``like``'s device and dtype, computed once per schedule, name, options,
    device and dtype (the objectives gather from it every training step)."""
    key = (name, tuple(sorted(check_options(name, options).items())), like.device, like.dtype)
    tables = _TABLES.setdefault(schedule, {})
    if key not in tables:
        tables[key] = step_weights(name, schedule, **options).to(like.device, like.dtype)
    return tables[key]


def implied_weighting(name: str, schedule: NoiseSchedule, *, normalize_at: float | None = None,
                      **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda_t, w(lambda_t)) for t = 2..T, w = c_t / (1/2 T Delta_t) (Kingma & Gao's w in discrete
    time; ``elbo`` gives 1). ``normalize_at``: divide w by its value at that log-SNR (interpolated
    linearly in log w between the two steps around it; it must lie within lambda_T..lambda_2)."""
    T = schedule.num_timesteps
    if T < 2:
        raise ValueError("the implied weighting needs T >= 2 (step 1 has no eps-form term)")
    c = step_weights(name, schedule, **options)
    lam = log_snr(schedule)[2:]
    w = c[1:] / (0.5 * T * snr_ratio_minus_one(schedule)[1:])
    if normalize_at is not None:
        w = w / reference_value(lam, w, normalize_at)
    return lam, w


def reference_value(lam: torch.Tensor, w: torch.Tensor, at: float) -> torch.Tensor:
    """w at log-SNR ``at``, interpolated linearly in log w on the decreasing grid ``lam``."""
    if not float(lam.min()) <= at <= float(lam.max()):
        raise ValueError(f"the reference log-SNR {at} lies outside the steps' "
                         f"{float(lam.min()):.3g}..{float(lam.max()):.3g}")
    i = int(torch.searchsorted(-lam, torch.tensor(-at, dtype=lam.dtype)).clamp(1, len(lam) - 1))
    u = (at - lam[i - 1]) / (lam[i] - lam[i - 1])  # lam[i] <= at <= lam[i - 1]
    return torch.exp((1 - u) * torch.log(w[i - 1]) + u * torch.log(w[i]))


LABELS = {
    "simple": r"simple: $\epsilon$-MSE", "elbo": "elbo ($w = 1$)", "snr": "snr: $x_0$-MSE",
    "min_snr": r"min_snr ($\gamma = 5$)", "p2": r"p2 ($k = 1, \gamma = 1$)",
    "edm": r"edm ($P_{mean} = -1.2, P_{std} = 1.2, \sigma_{data} = 0.5$)",
    "v_mse": "v-MSE (simple, v prediction)",
}


def plot_weightings(path: str | Path, schedule_names=("linear", "cosine"), T: int = 1000) -> Path:
    """The implied weighting w(lambda) of every weighting in ``WEIGHTINGS`` (default options) over
    the log-SNR, one panel per schedule with T steps, each curve divided by its value at lambda = 0,
    log y axis; saved as the PNG ``path`` (parent folders created). Steps 2..T - 1 are drawn: step
    1 has no implied weight and the last step's cell is an artefact of the chain's end (EDM's cell
    reaches down to -inf; the cosine schedule clips its beta_T). Drawn on the Agg canvas, never
    through pyplot (the caller's backend is left alone)."""
    import matplotlib
    import seaborn as sns
    from matplotlib.figure import Figure

    if not schedule_names:
        raise ValueError("plot_weightings needs at least one schedule name")
    if T < 3:
        raise ValueError(f"plot_weightings draws steps 2..T - 1 and needs T >= 3, got {T}")
    schedules = {s: make_schedule(s, T, warn=False) for s in schedule_names}
    style = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook")}
    # simple first, wide and pale, so that the curves equal to it at low SNR (min_snr, p2) show
    order = ("simple", "elbo", "snr", "min_snr", "p2", "edm", "v_mse")
    with matplotlib.rc_context(style):
        fig = Figure(figsize=(6.2 * len(schedules), 5.6), layout="constrained")
        axes = fig.subplots(1, len(schedules), squeeze=False)[0]
        for ax, (label, s) in zip(axes, schedules.items()):
            for k, name in enumerate(order):
                lam, w = implied_weighting(name, s, normalize_at=0.0)
                ax.plot(lam[:-1].numpy(), w[:-1].numpy(), color=f"C{k}",
                        lw=5 if name == "simple" else 1.8, alpha=0.45 if name == "simple" else 1,
                        ls="--" if name in ("elbo", "v_mse") else "-",
                        label=LABELS[name] if ax is axes[0] else None)
            ax.set(yscale="log", ylim=(1e-4, 1e4), title=f"{label} schedule, T = {T}",
                   xlabel=r"log-SNR $\lambda_t = \log(\bar\alpha_t / (1 - \bar\alpha_t))$",
                   ylabel=r"implied weighting $w(\lambda) / w(0)$")
            ax.axvline(0.0, color="0.6", lw=0.8)
        fig.legend(loc="outside lower center", ncols=4, fontsize="small")
        fig.suptitle(r"loss$_t = c_t \|\epsilon - \hat\epsilon\|^2$, "
                     r"$t \sim U\{1, \ldots, T\}$, "
                     r"$w(\lambda_t) = c_t / (\frac{1}{2} T \Delta_t)$, "
                     r"$\Delta_t = \mathrm{SNR}_{t-1} / \mathrm{SNR}_t - 1$ (steps 2..T - 1)")
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"),
                     suffix=Path(path).suffix, make_parents=True)
    return Path(path)
