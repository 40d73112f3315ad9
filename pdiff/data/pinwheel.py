"""FFJORD's ``pinwheel`` toy, whose density is a sum over the preimages of a 1-D circle map."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .toy2d import Toy2D, scatter_logsumexp


class Pinwheel(Toy2D):
    r"""FFJORD's ``pinwheel`` (after Johnson et al. 2016): 5 spiral arms. H about 2.32 nats
    (2.318 by grid integration of this density).

    Generator: f = (f_0, f_1) with f_0 ~ N(1, 0.3^2) (radial) and f_1 ~ N(0, 0.1^2) (tangential),
    an arm k uniform in {0..4} (FFJORD draws equal counts and shuffles), angle
    theta = 2 pi k / 5 + 0.25 exp(f_0), and x = 2 R(-theta) f: FFJORD's ``einsum("ti,tij->tj")``
    multiplies by the transpose of R(theta), the rotation it builds.

    Density by change of variables. Rotation keeps |f| = |x|/2 =: rho, so only the angle moves:
    writing f = rho (cos psi, sin psi) and beta for the angle of x, the arm-k map is the circle map
    psi -> beta = G(psi) - 2 pi k / 5 with G(psi) = psi - 0.25 exp(rho cos psi), and
    det(dx/df) / 4 = G'(psi) = 1 + 0.25 rho sin(psi) exp(rho cos psi). Summing over arms,

    .. math:: p(x) = \frac{1}{4} \cdot \frac{1}{5}
              \sum_{\psi:\ G(\psi) - \beta \in (2\pi/5)\mathbb{Z}}
              \frac{\mathcal{N}(\rho\cos\psi;\ 1, 0.3^2)\ \mathcal{N}(\rho\sin\psi;\ 0, 0.1^2)}
                   {|G'(\psi)|}.

    The roots are bracketed on a grid of psi fine enough that G moves by at most half of 2 pi / 5
    per cell (|G'| <= 1 + 0.25 rho e^rho), then refined by Newton steps kept inside the bracket.
    G is monotone, with exactly 5 roots, unless the circle |f| = rho meets the fold region
    0.25 f_1 e^{f_0} < -1 (probability 1.4e-9): there a pair of roots closer than a grid cell can
    be missed. The grid is capped at ``max_grid`` cells, which
    resolves every root for |x| <= 11.5 (all but about e^-120 of the mass); beyond it ``log_prob``
    may miss roots and is then a lower bound.
    """

    max_grid = 4096
    chunk_size = 1 << 16  # points per pass
    newton_steps = 12  # 6 reach 1e-10 nats; the rest is margin

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

    def _arm_coordinate(self, psi: Tensor, rho: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """u = (G(psi) - beta) in units of 2 pi / num_arms (a root of an arm sits at an integer
        value) and du / dpsi."""
        unit = self.num_arms / (2 * math.pi)
        bend = self.rate * torch.exp(rho * psi.cos())
        return (psi - bend - beta) * unit, (1 + rho * psi.sin() * bend) * unit

    def _log_prob(self, x):
        z = x / self.scale
        rho, beta = z.norm(dim=-1), torch.atan2(z[:, 1], z[:, 0])  # (n,)
        with torch.no_grad():
            point, lo, hi, target = self._bracket(rho, beta)
            root = self._refine(lo, hi, target, rho[point], beta[point])
        # One more Newton step, with gradients: the value stays put, and d root / d x follows from
        # the implicit function theorem, so log_prob is differentiable in x.
        rho, beta = rho[point], beta[point]
        value, slope = self._arm_coordinate(root, rho, beta)
        root = root - (value - target) / slope
        f0, f1 = rho * root.cos(), rho * root.sin()
        jacobian = self._arm_coordinate(root, rho, beta)[1] * (2 * math.pi / self.num_arms)  # G'
        log_terms = (-0.5 * ((f0 - 1) / self.radial_std) ** 2
                     - 0.5 * (f1 / self.tangential_std) ** 2
                     - math.log(2 * math.pi * self.radial_std * self.tangential_std)
                     - torch.log(jacobian.abs()))
        log_p = scatter_logsumexp(log_terms, point, len(x))
        return log_p - math.log(self.num_arms * self.scale**2)

    def _bracket(self, rho: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cells [lo, hi] of a psi grid in which u crosses an integer ``target``, and their points.

        Each point gets a power-of-two number of cells with |du| <= 1/2 per cell, from the bound
        |du/dpsi| <= num_arms / (2 pi) (1 + rate rho e^rho); points are swept by grid size, 2^22
        (point, node) pairs at a time.
        """
        need = 2 * self.num_arms * (1 + self.rate * rho * torch.exp(rho))
        cells = torch.exp2(torch.ceil(torch.log2(need))).clamp(64, self.max_grid).long()
        found = []
        for size in cells.unique().tolist():
            psi = torch.linspace(-math.pi, math.pi, size + 1, dtype=rho.dtype, device=rho.device)
            for rows in torch.nonzero(cells == size)[:, 0].split(2**22 // (size + 1)):
                u, _ = self._arm_coordinate(psi, rho[rows, None], beta[rows, None])
                level = torch.floor(u)  # (rows, size + 1)
                point, cell = torch.nonzero(level[:, 1:] != level[:, :-1], as_tuple=True)
                target = torch.maximum(level[point, cell], level[point, cell + 1])
                found.append((rows[point], psi[cell], psi[cell + 1], target))
        return tuple(torch.cat(parts) for parts in zip(*found))

    def _refine(self, lo: Tensor, hi: Tensor, target: Tensor, rho: Tensor,
                beta: Tensor) -> Tensor:
        """Roots of u = target in [lo, hi]: Newton steps, bisecting when one leaves the bracket."""
        sign_lo = torch.sign(self._arm_coordinate(lo, rho, beta)[0] - target)
        root = (lo + hi) / 2
        for _ in range(self.newton_steps):
            value, slope = self._arm_coordinate(root, rho, beta)
            right = torch.sign(value - target) == sign_lo  # the root lies right of the guess
            lo, hi = torch.where(right, root, lo), torch.where(right, hi, root)
            step = root - (value - target) / slope
            root = torch.where((step >= lo) & (step <= hi), step, (lo + hi) / 2)
        return root
