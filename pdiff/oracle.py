r"""The Bayes-optimal denoiser for Gaussian-mixture data, as a network-shaped callable.

If x_0 ~ sum_k w_k N(mu_k, diag s_k^2) then x_t | k ~ N(sqrt(ab) mu_k, diag(ab s_k^2 + 1 - ab)) with
ab = alpha_bar_t, so with responsibilities r_k(x_t) = p(k | x_t),

    E[x_0 | x_t] = sum_k r_k(x_t) [mu_k + sqrt(ab) s_k^2 / (ab s_k^2 + 1 - ab) (x_t - sqrt(ab) mu_k)].

The optimal Gaussian mean of p_theta(x_{t-1} | x_t) under the bound is E_q[x_{t-1} | x_t] =
mu_tilde_t(x_t, E[x_0 | x_t]), which is what an x0-predicting ``ReverseProcess`` around this oracle
computes: its bound is the bound of the best possible mean for a given schedule and variance.
"""
from __future__ import annotations

import torch

from .data.mixture import GaussianMixture
from .schedules import NoiseSchedule


class MixtureDenoiser:
    """``net(x_t, t) -> E[x_0 | x_t]`` for mixture data; use with ``prediction="x0"``.

    ``t`` indexes ``schedule`` (1..T); ``x_t`` has shape ``batch_shape + (D,)``.
    """

    prediction = "x0"

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        self.mixture, self.schedule = mixture, schedule

    @staticmethod
    def example_bytes(num_components: int, dim: int, itemsize: int) -> int:
        """Bytes of the temporaries a call holds per example: K responsibilities, posterior means
        and gains of D values (about 6 K D numbers)."""
        return 6 * num_components * dim * itemsize

    def work_bytes(self, itemsize: int) -> int:
        """``example_bytes`` of this mixture (``evaluation.pair_bytes`` sizes chunks by it)."""
        return self.example_bytes(*self.mixture.means.shape, itemsize)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.x0_at_alpha_bar(xt, self.schedule.tensor("alpha_bar", xt.device, xt.dtype)[t])

    def x0_at_alpha_bar(self, xt: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] at the noise level alpha_bar = ``ab`` (shape ``batch_shape``), any level in
        (0, 1]: what continuous-time estimators (``pdiff.continuous``, ``pdiff.ode``) call."""
        m = self.mixture
        ab = torch.as_tensor(ab, dtype=xt.dtype, device=xt.device).expand(xt.shape[:-1])
        means = m.means.to(xt)
        var0 = m.stds.to(xt) ** 2
        log_r = m.component_log_prob(xt, ab.sqrt(), 1 - ab)  # (..., K)
        r = torch.softmax(log_r, dim=-1)
        a = ab.sqrt()[..., None, None]
        gain = a * var0 / (a**2 * var0 + 1 - a**2)  # (..., K, D)
        x0_k = means + gain * (xt.unsqueeze(-2) - a * means)
        return (r.unsqueeze(-1) * x0_k).sum(-2)
