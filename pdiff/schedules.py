"""Noise schedules: beta_1..beta_T and every quantity derived from them, computed once in float64.

Time runs t = 1..T as in Ho et al. (2020). Every per-step tensor of a ``NoiseSchedule`` has length
T + 1 and is indexed by t directly; index 0 stands for t = 0, the data (alpha_bar_0 = 1, beta_0 = 0),
and is never a diffusion step.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid", "const", "polynomial")

# alpha_bar_T above this leaves a visible prior term L_T: warn the user.
ALPHA_BAR_T_WARN = 1e-2
# the smallest beta: any smaller one leaves 1 - beta = 1 in float64 (the float below 1 is 1 - 2^-53),
# and with it 1 - alpha_bar_t = 0 and a posterior variance of 0/0
MIN_BETA = 1e-16
# the entries NoiseSchedule.at gathers together (what the bound's terms ask for at one t)
GATHERED = ("alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "posterior_coef_x0",
            "posterior_coef_xt", "beta_tilde", "log_beta", "log_beta_tilde_clipped")
_GATHERED_INDEX = {name: k for k, name in enumerate(GATHERED)}


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    r"""The forward-process variances and their derived quantities, float64, indexed by t = 0..T.

    ``betas[t]`` = beta_t, ``alphas[t]`` = 1 - beta_t, ``alpha_bar[t]`` = prod_{s<=t} alpha_s,
    ``alpha_bar_prev[t]`` = alpha_bar_{t-1}, ``beta_tilde[t]`` = beta_t (1 - alpha_bar_{t-1}) /
    (1 - alpha_bar_t) (the posterior variance, Ho et al. eq. 7; beta_tilde_1 = 0),
    ``posterior_coef_x0[t]`` and ``posterior_coef_xt[t]`` the two coefficients of the posterior
    mean (eq. 7), ``sqrt_alpha_bar`` and ``sqrt_one_minus_alpha_bar`` the two of eq. 4. Entries
    at index 0 are the t = 0 conventions (beta_0 = 0, alpha_bar_0 = 1); the posterior quantities
    there are 0 and never used.
    """

    betas: torch.Tensor

    def __post_init__(self):
        b = self.betas
        alphas = 1.0 - b
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        beta_tilde = torch.zeros_like(b)
        coef_x0 = torch.zeros_like(b)
        coef_xt = torch.zeros_like(b)
        s = slice(1, None)
        beta_tilde[s] = b[s] * (1 - alpha_bar_prev[s]) / (1 - alpha_bar[s])
        coef_x0[s] = alpha_bar_prev[s].sqrt() * b[s] / (1 - alpha_bar[s])
        coef_xt[s] = alphas[s].sqrt() * (1 - alpha_bar_prev[s]) / (1 - alpha_bar[s])
        derived = dict(alphas=alphas, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                       beta_tilde=beta_tilde, posterior_coef_x0=coef_x0, posterior_coef_xt=coef_xt,
                       sqrt_alpha_bar=alpha_bar.sqrt(), sqrt_one_minus_alpha_bar=(1 - alpha_bar).sqrt())
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_last", [None])  # at(): the last gather, its t and its entries

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0] - 1

    @property
    def log_beta(self) -> torch.Tensor:
        """log beta_t (index 0: -inf, unused)."""
        return torch.log(self.betas)

    @property
    def log_beta_tilde_clipped(self) -> torch.Tensor:
        """log beta_tilde_t with t = 1 set to log beta_tilde_2, as the reference code does (beta_tilde_1 = 0).

        With T = 1 there is no beta_tilde_2 and beta_1 is used instead.
        """
        out = torch.log(self.beta_tilde.clamp_min(torch.finfo(torch.float64).tiny))
        out[0] = -math.inf
        out[1] = out[2] if self.num_timesteps >= 2 else torch.log(self.betas[1])
        return out

    @property
    def final_alpha_bar(self) -> tuple[float, float]:
        """(alpha_bar_T, log(1 - alpha_bar_T)) as Python floats, computed once (L_T's constants)."""
        value = self._cache.get("final_alpha_bar")
        if value is None:
            ab = float(self.alpha_bar[-1])
            value = self._cache["final_alpha_bar"] = (ab, math.log1p(-ab))
        return value

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (index 0: inf)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def tensor(self, name: str, device=None, dtype=None) -> torch.Tensor:
        """Attribute ``name`` cast to ``dtype`` on ``device``, cached so hot paths do not re-copy it."""
        key = (name, torch.device(device) if device is not None else None, dtype)
        cache = self._cache
        if key not in cache:
            value = getattr(self, name)
            cache[key] = value.to(device=device, dtype=dtype or value.dtype)
        return cache[key]

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor, event_dims: int) -> torch.Tensor:
        """Schedule entry ``name`` at steps ``t``, shaped to broadcast against ``like``.

        ``t`` has the batch shape of ``like`` (or broadcasts to it); ``event_dims`` trailing
        singleton dimensions are appended. The entries in ``GATHERED`` are gathered together, once
        per ``t`` tensor (while it is unmodified, by ``_version``): the bound asks for several of
        them at the same steps, so one gather serves them all. Do not modify the result in place.
        """
        device, dtype = like.device, like.dtype
        k = _GATHERED_INDEX.get(name)
        if k is None or not isinstance(t, torch.Tensor) or t.is_inference() or t.device != device:
            steps = torch.as_tensor(t, device=device)
            values = self.tensor(name, device, dtype).index_select(0, steps.reshape(-1))
            return values.reshape(steps.shape + (1,) * event_dims)  # 3x faster than table[steps]
        last = self._last[0]
        if not (last is not None and last[0] is t and last[1] == t._version and last[2] == dtype
                and last[3] == event_dims):
            stacked = self._cache.get(("GATHERED", device, dtype))
            if stacked is None:
                stacked = torch.stack([getattr(self, n) for n in GATHERED]).to(device, dtype)
                self._cache[("GATHERED", device, dtype)] = stacked
            block = stacked.index_select(1, t.reshape(-1))  # (K, B): one gather for all entries
            last = (t, t._version, dtype, event_dims,
                    block.view((len(GATHERED),) + t.shape + (1,) * event_dims))
            self._last[0] = last
        return last[4][k]

    def check_t(self, t: torch.Tensor, low: int = 1) -> torch.Tensor:
        """``t`` as a long tensor, refused unless every entry is an integer in low..T."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor, got dtype {t.dtype}")
        T = self.num_timesteps
        if t.numel() and (int(t.min()) < low or int(t.max()) > T):
            raise ValueError(f"t must lie in {low}..{T} (t = 1..T as in Ho et al.), got "
                             f"values in {int(t.min())}..{int(t.max())}")
        return t.long()

    @classmethod
    def from_betas(cls, betas, warn: bool = True) -> "NoiseSchedule":
        """The schedule with beta_1..beta_T = ``betas`` (any 1-D array-like, ``MIN_BETA`` <= beta < 1)."""
        b = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if b.dim() != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D array (beta_1..beta_T), got shape "
                             f"{tuple(b.shape)}")
        if not torch.isfinite(b).all():
            raise ValueError("betas must be finite")
        if (b < MIN_BETA).any() or (b >= 1).any():
            raise ValueError(f"betas must lie strictly between 0 and 1, in [{MIN_BETA:g}, 1) (a smaller "
                             f"beta leaves 1 - beta = 1 in float64), got min {b.min().item():.3g}, "
                             f"max {b.max().item():.3g}")
        schedule = cls(torch.cat([b.new_zeros(1), b]))
        ab_T = schedule.alpha_bar[-1].item()
        if warn and ab_T > ALPHA_BAR_T_WARN:
            warnings.warn(f"alpha_bar_T = {ab_T:.3g} is far from 0: q(x_T|x_0) is far from N(0, I) "
                          "and the prior term L_T of the bound will be large", stacklevel=2)
        return schedule

    def respace(self, kept_steps) -> tuple["NoiseSchedule", torch.Tensor]:
        """A shorter chain on the kept steps, with betas recomputed from alpha_bar there.

        Returns the new schedule (steps 1..K) and ``timestep_map`` (length K + 1, index 0 -> 0)
        mapping each new step to the original step whose alpha_bar it keeps (Nichol & Dhariwal 2021,
        sec. 4). ``kept_steps`` are distinct original steps in 1..T; they are sorted here.
        """
        kept = torch.as_tensor(kept_steps, dtype=torch.long).flatten()
        kept = self.check_t(torch.unique(kept))
        ab = self.alpha_bar[kept]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        new = NoiseSchedule.from_betas(1 - ab / ab_prev, warn=False)
        return new, torch.cat([kept.new_zeros(1), kept])


def spaced_steps(num_timesteps: int, num_steps: int) -> torch.Tensor:
    """``num_steps`` steps of 1..T evenly spaced and always including T (for ``respace``)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"the number of sampling steps must lie in 1..{num_timesteps}, got {num_steps}")
    steps = torch.linspace(num_timesteps, 1, num_steps, dtype=torch.float64).round().long()
    return torch.unique(steps)


def _betas_from_alpha_bar(f, T: int, max_beta: float) -> torch.Tensor:
    t = torch.arange(T + 1, dtype=torch.float64)
    ab = f(t) / f(torch.zeros((), dtype=torch.float64))
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def make_schedule(name: str, num_timesteps: int, *, beta_start: float | None = None,
                  beta_end: float | None = None, beta: float = 0.02, cosine_s: float = 0.008,
                  power: float = 2.0, max_beta: float = 0.999, warn: bool = True) -> NoiseSchedule:
    r"""The named schedule with T = ``num_timesteps`` steps.

    - ``linear``: beta evenly spaced from ``beta_start`` to ``beta_end`` (default 1e-4 and 0.02, both
      scaled by 1000/T as in Improved DDPM, so any T gives the same process in the limit).
    - ``quadratic``: sqrt(beta) evenly spaced between the same ends.
    - ``sigmoid``: beta_start + (beta_end - beta_start) sigmoid(linspace(-6, 6, T)).
    - ``cosine``: alpha_bar(t) = f(t)/f(0), f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2, s = ``cosine_s``,
      beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} capped at ``max_beta`` (Nichol & Dhariwal eq. 17).
    - ``polynomial``: alpha_bar(t) = f(t)/f(0), f(t) = (1 - 2e-4) (1 - (t/T)^p)^2 + 1e-4 with p =
      ``power`` (the polynomial schedule of Hoogeboom et al. 2022), betas capped at ``max_beta``.
    - ``const``: beta_t = ``beta`` (0.02 by default) for every t.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral) or num_timesteps < 1:
        raise ValueError(f"the number of timesteps T must be an integer >= 1, got {num_timesteps!r}")
    T = int(num_timesteps)
    scale = 1000.0 / T
    start = beta_start if beta_start is not None else 1e-4 * scale
    end = beta_end if beta_end is not None else min(0.02 * scale, max_beta)
    f64 = dict(dtype=torch.float64)
    if name == "linear":
        betas = torch.linspace(start, end, T, **f64)
    elif name == "quadratic":
        betas = torch.linspace(math.sqrt(start), math.sqrt(end), T, **f64) ** 2
    elif name == "sigmoid":
        betas = start + (end - start) * torch.sigmoid(torch.linspace(-6, 6, T, **f64))
    elif name == "cosine":
        betas = _betas_from_alpha_bar(
            lambda t: torch.cos((t / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2, T, max_beta)
    elif name == "polynomial":
        betas = _betas_from_alpha_bar(
            lambda t: (1 - 2e-4) * (1 - (t / T) ** power) ** 2 + 1e-4, T, max_beta)
    else:  # const
        betas = torch.full((T,), float(beta), **f64)
    return NoiseSchedule.from_betas(betas, warn=warn)
