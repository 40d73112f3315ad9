"""FFJORD's ``pinwheel`` toy, whose density is a sum over the preimages of a 1-D circle map."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .toy2d import Toy2D


class Pinwheel(Toy2D):
    r"""FFJORD's ``pinwheel`` (after Johnson et al. 2016): 5 spiral arms. H about 2.32 nats.

    Generator: f = (f_0, f_1) with f_0 ~ N(1, 0.3^2) (radial) and f_1 ~ N(0, 0.1^2) (tangential),
    an arm k uniform in {0..4} (FFJORD draws equal counts and shuffles), angle
    theta = 2 pi k / 5 + 0.25 exp(f_0), and x = 2 R(-theta) f: FFJORD's ``einsum("ti,tij->tj")``
    multiplies by the transpose of R(theta), the rotation it builds.

    Density by change of variables. Rotation keeps |f| = |x|/2 =: rho, so only the angle moves:
    writing f = rho (cos psi, sin psi) and beta for the angle of x, the arm-k map is the circle map
    psi -> beta = G(psi) - 2 pi k / 5 with G(psi) = psi - 0.25 exp(rho cos psi), and
    det(dx/df) / 4 = G'(psi) = 1 + 0.25 rho sin(psi) exp(rho cos psi). Summing over arms,

    .. math:: p(x) = \frac{1}{4} \cdot \frac{1}{5} \sum_{\psi:\ G(\psi) - \beta \in (2\pi/5)\mathbb{Z}}
              \frac{\mathcal{N}(\rho\cos\psi;\ 1, 0.3^2)\ \mathcal{N}(\rho\sin\psi;\ 0, 0.1^2)}
                   {|G'(\psi)|}.

    The roots are bracketed on a grid of psi fine enough that G moves by at most half of 2 pi / 5
    per cell (|G'| <= 1 + 0.25 rho e^rho), then bisected to machine precision. G is monotone, with
    exactly 5 roots, except where 0.25 |f_1| e^{f_0} > 1 (probability below 1e-7): there a pair of
    roots closer than a grid cell can be missed. The grid is capped at ``max_grid`` cells, which
    resolves every root for |x| <= 11.5 (all but about e^-120 of the mass); beyond it ``log_prob``
    may miss roots and is then a lower bound.
    """

    max_grid = 4096
    chunk_size = 512  # points per pass: (points, grid) intermediates stay below 2^21 entries

    def __init__(self, radial_std: float = 0.3, tangential_std: float = 0.1, num_arms: int = 5,
                 rate: float = 0.25, scale: float = 2.0, validate_args: bool | None = None):
        self.radial_std, self.tangential_std = radial_std, tangential_std
        self.num_arms, self.rate, self.scale = num_arms, rate, scale
        super().__init__(validate_args=validate_args)

    def _draw(self, n, generator):
        f = self._randn(n, 2, generator=generator) * torch.tensor(
            [self.radial_std, self.tangential_std], dtype=self.dtype)
        f[:, 0] += 1
        k = torch.randint(self.num_arms, (n,), generator=generator)
        theta = 2 * math.pi * k / self.num_arms + self.rate * f[:, 0].exp()
        cos, sin = theta.cos(), theta.sin()
        return self.scale * torch.stack([f[:, 0] * cos + f[:, 1] * sin,
                                         f[:, 1] * cos - f[:, 0] * sin], dim=-1)

    def _arm_coordinate(self, psi: Tensor, rho: Tensor, beta: Tensor) -> Tensor:
        """(G(psi) - beta) in units of 2 pi / num_arms: a root of arm k sits at an integer."""
        return (psi - self.rate * torch.exp(rho * psi.cos()) - beta) * self.num_arms / (2 * math.pi)

    def _log_prob(self, x):
        z = x / self.scale
        rho, beta = z.norm(dim=-1), torch.atan2(z[:, 1], z[:, 0])  # (n,)
        rho_max = rho.max().item() if len(rho) else 0.0
        steps = 2 * self.num_arms * (1 + self.rate * rho_max * math.exp(rho_max))
        cells = int(min(max(math.ceil(steps), 64), self.max_grid))
        with torch.no_grad():
            psi = torch.linspace(-math.pi, math.pi, cells + 1, dtype=x.dtype, device=x.device)
            u = self._arm_coordinate(psi, rho[:, None], beta[:, None])  # (n, cells + 1)
            level = torch.floor(u)
            point, cell = torch.nonzero(level[:, 1:] != level[:, :-1], as_tuple=True)
            target = torch.maximum(level[point, cell], level[point, cell + 1])  # integer crossed
            lo, hi = psi[cell], psi[cell + 1]
            sign_lo = torch.sign(u[point, cell] - target)
            rho_r, beta_r = rho[point], beta[point]
            for _ in range(60):
                mid = (lo + hi) / 2
                right = torch.sign(self._arm_coordinate(mid, rho_r, beta_r) - target) == sign_lo
                lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
            root = (lo + hi) / 2
        # One Newton step with gradients: the value stays put, and d root / d x follows from the
        # implicit function theorem, so log_prob is differentiable in x.
        rho_r, beta_r = rho[point], beta[point]
        slope = 1 + self.rate * rho_r * root.sin() * torch.exp(rho_r * root.cos())  # G'(root)
        root = root - self._arm_coordinate(root, rho_r, beta_r).sub(target) * (
            2 * math.pi / self.num_arms) / slope
        slope = 1 + self.rate * rho_r * root.sin() * torch.exp(rho_r * root.cos())
        f0, f1 = rho_r * root.cos(), rho_r * root.sin()
        log_terms = (-0.5 * ((f0 - 1) / self.radial_std) ** 2 - 0.5 * (f1 / self.tangential_std) ** 2
                     - torch.log(2 * math.pi * self.radial_std * self.tangential_std * slope.abs()))
        shift = torch.full_like(rho, -math.inf).scatter_reduce(
            0, point, log_terms.detach(), "amax").nan_to_num(neginf=0.0)
        total = torch.zeros_like(rho).index_add(0, point, torch.exp(log_terms - shift[point]))
        return shift + total.log() - math.log(self.num_arms * self.scale**2)
