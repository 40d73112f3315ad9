"""Continuous time: a discrete schedule seen at real u, the denoiser there, and the continuous-time
bound of Variational Diffusion Models as the limit of the discrete bound (T' -> infinity)."""
import math

import pytest
import torch

from pdiff.continuous import (ContinuousDenoiser, DiscreteLogSNR, alpha_sigma, continuous_bound,
                              discretize, gaussian_discrete_diffusion,
                              gaussian_mmse_integral)
from pdiff.data.mixture import GaussianMixture
from pdiff.distributions.reverse import ReverseProcess
from pdiff.elbo import full_bound, prior_term
from pdiff.nets.mlp import MLPDenoiser
from pdiff.oracle import MixtureDenoiser
from pdiff.schedules import make_schedule
from tests.stats import assert_within_stderr

MU, S, D = (0.7, -0.4), 0.5, 2


def gaussian():
    return GaussianMixture(torch.tensor([MU]), torch.tensor([S]), torch.ones(1))


def oracle(schedule, data=None):
    return ReverseProcess(MixtureDenoiser(data or gaussian(), schedule), schedule, prediction="x0",
                          variance="fixed_small", decoder_variance="beta1")


@pytest.mark.parametrize("name", ["linear", "cosine", "const"])
def test_the_schedule_at_its_own_steps(name):
    s = make_schedule(name, 50, warn=False)
    lam = DiscreteLogSNR(s)
    u = torch.arange(1, 51, dtype=torch.float64) / 50
    torch.testing.assert_close(lam(u), torch.log(s.snr[1:]), rtol=1e-10, atol=1e-10)
    # beta(u) = -d log alpha_bar / du: T log(1 / alpha_t) on step t's segment
    mid = u - 0.5 / 50
    torch.testing.assert_close(lam.beta(mid), -50 * torch.log(s.alphas[1:]))
    # lambda'(u) against a central difference inside each segment
    h = 1e-7
    fd = (lam(mid + h) - lam(mid - h)) / (2 * h)
    torch.testing.assert_close(lam.derivative(mid), fd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_discretizing_on_the_schedules_grid_gives_the_schedule_back(name):
    s = make_schedule(name, 40, warn=False)
    back = discretize(DiscreteLogSNR(s), 40, 1 / 40)
    torch.testing.assert_close(back.betas, s.betas, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_the_continuous_denoiser_is_the_network_at_integer_steps(prediction):
    torch.manual_seed(1)
    s = make_schedule("linear", 20)
    net = MLPDenoiser(D, 20, hidden=16, depth=2).double()
    torch.nn.init.normal_(net.head.weight, std=0.3)
    model = ReverseProcess(net, s, prediction=prediction)
    t = torch.randint(1, 21, (64,))
    xt = torch.randn(64, D)
    expected = model.output(xt, t).eps
    torch.testing.assert_close(ContinuousDenoiser(model)(xt, t / 20.0), expected)


def test_the_oracle_is_exact_between_steps():
    """At u between steps the oracle's eps is E[eps | x_u] at alpha_bar(u): for Gaussian data
    (x_u - sqrt(ab) mu) sigma / (ab s^2 + sigma^2)."""
    s = make_schedule("linear", 30)
    den = ContinuousDenoiser(oracle(s))
    u = torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    xt = torch.randn(100, D)
    a, sig = alpha_sigma(den.log_snr(u))
    mu = torch.tensor(MU)
    expected = (xt - a[:, None] * mu) * sig[:, None] / (a[:, None] ** 2 * S**2 + sig[:, None] ** 2)
    torch.testing.assert_close(den(xt, u), expected)


def test_refusals():
    s = make_schedule("linear", 10)
    with pytest.raises(ValueError, match="eps, x0 or v"):
        ContinuousDenoiser(ReverseProcess(MLPDenoiser(D, 10), s, prediction="mean"))
    with pytest.raises(ValueError, match="sinusoidal"):
        ContinuousDenoiser(ReverseProcess(MLPDenoiser(D, 10, embedding="onehot"), s))
    with pytest.raises(ValueError, match="respaced"):
        ContinuousDenoiser(ReverseProcess(MLPDenoiser(D, 10), s).respaced([2, 5, 10]))
    with pytest.raises(ValueError, match="num_u"):
        continuous_bound(oracle(s), torch.zeros(3, D), num_u=0)
    with pytest.raises(ValueError, match="u_first"):
        discretize(DiscreteLogSNR(s), 5, 0.0)


def expected_discrete_bound(schedule):
    """E[sum_{t>=2} L_{t-1}] of the Gaussian oracle in closed form (checked against the library's
    full bound below)."""
    return D * gaussian_discrete_diffusion(schedule, S**2)


def test_the_continuous_bound_of_the_oracle_against_quadrature():
    s = make_schedule("linear", 100)
    model = oracle(s)
    x0 = gaussian().sample((4000,), generator=torch.Generator().manual_seed(3))
    b = continuous_bound(model, x0, num_u=8, generator=torch.Generator().manual_seed(4))
    exact = D * gaussian_mmse_integral(DiscreteLogSNR(s), 1 / 100, S**2)
    assert_within_stderr(b.diffusion.mean(), exact, b.diffusion.std() / math.sqrt(len(x0)))
    torch.testing.assert_close(b.prior, prior_term(model, x0))
    # the decoder term is the discrete chain's L_0: same draw-free expectation
    discrete = full_bound(model, x0[:500], generator=torch.Generator().manual_seed(5))
    assert_within_stderr(b.decoder.mean() - discrete.terms[:, 0].mean(), 0.0,
                         math.hypot(b.decoder.std() / math.sqrt(4000),
                                    discrete.terms[:, 0].std() / math.sqrt(500)))


def test_the_discrete_bound_decreases_to_the_continuous_bound():
    """VDM sec. 4: on a fixed continuous schedule (decoder at u_1, prior at 1) the T'-step bound
    is above the continuous one and converges to it, the gap falling like 1/T'."""
    lam = DiscreteLogSNR(make_schedule("linear", 1000))
    u1 = 1e-3
    continuous = D * gaussian_mmse_integral(lam, u1, S**2)
    gaps = []
    for steps in (10, 40, 160, 640, 2560, 10240):
        schedule = discretize(lam, steps, u1)
        gaps.append(expected_discrete_bound(schedule) - continuous)
    assert all(g > 0 for g in gaps)
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    for a, b in zip(gaps[3:], gaps[4:]):  # 1/T' at large T': each fourfold T' cuts it fourfold
        assert 3.5 < a / b < 5.0, gaps


def test_the_library_bound_matches_the_closed_form_it_converges_from():
    """The closed form used above is the library's full bound of the oracle on that chain."""
    schedule = discretize(DiscreteLogSNR(make_schedule("linear", 1000)), 40, 1e-3)
    x0 = gaussian().sample((3000,), generator=torch.Generator().manual_seed(6))
    b = full_bound(oracle(schedule), x0, generator=torch.Generator().manual_seed(7))
    diffusion = b.terms[:, 1:].sum(1)
    assert_within_stderr(diffusion.mean(), expected_discrete_bound(schedule),
                         diffusion.std() / math.sqrt(len(x0)))


def test_the_continuous_bound_of_a_mixture_oracle_bounds_its_entropy():
    from pdiff.data.toy import get_toy

    data = get_toy("mixture1d")
    s = make_schedule("linear", 200)
    x0 = data.sample((3000,), generator=torch.Generator().manual_seed(8))
    b = continuous_bound(oracle(s, data), x0, num_u=4, generator=torch.Generator().manual_seed(9))
    gap = b.total + data.log_prob(x0)  # paired: bound(x) + log p(x) >= 0 in expectation
    assert gap.mean() > -5 * gap.std() / math.sqrt(len(x0))


def test_the_continuous_loss_is_an_unbiased_bound_estimate():
    from pdiff.objectives import continuous_loss

    s = make_schedule("linear", 100)
    model = oracle(s)
    x0 = gaussian().sample((20000,), generator=torch.Generator().manual_seed(10))
    loss = continuous_loss(model, x0, generator=torch.Generator().manual_seed(11)).loss
    exact = (prior_term(model, x0).mean() + D * gaussian_mmse_integral(DiscreteLogSNR(s), 0.01, S**2))
    decoder = full_bound(model, x0[:2000], generator=torch.Generator().manual_seed(12)).terms[:, 0]
    assert_within_stderr(loss.mean(), exact + decoder.mean(),
                         math.hypot(loss.std() / math.sqrt(len(x0)),
                                    decoder.std() / math.sqrt(len(decoder))))


def test_a_learned_schedule_keeps_its_ends_and_the_bound_and_lowers_the_variance():
    """VDM eq. 19: with fixed ends the diffusion integral does not depend on the schedule, only
    its estimator's variance does; training the schedule on the squared loss lowers it."""
    from pdiff.continuous import LearnedLogSNR
    from pdiff.objectives import continuous_loss

    s = make_schedule("linear", 100)
    base = DiscreteLogSNR(s)
    learned = LearnedLogSNR(base)
    u = torch.linspace(0.01, 1, 200, dtype=torch.float64)
    with torch.no_grad():
        lam = learned(u)
    torch.testing.assert_close(lam[[0, -1]], base(u[[0, -1]]))
    assert (lam[1:] < lam[:-1]).all()
    model = oracle(s)
    data = gaussian()

    def estimate(seed):
        x0 = data.sample((20000,), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            loss = continuous_loss(model, x0, log_snr=learned,
                                   generator=torch.Generator().manual_seed(seed + 1)).loss
        return loss.mean(), loss.var(), loss.std() / math.sqrt(len(x0))

    mean0, var0, se0 = estimate(20)
    opt = torch.optim.Adam(learned.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(30)
    for _ in range(150):
        x0 = data.sample((256,), generator=gen)
        opt.zero_grad()
        continuous_loss(model, x0, log_snr=learned, generator=gen).loss.mean().backward()
        opt.step()
    mean1, var1, se1 = estimate(20)
    assert var1 < 0.5 * var0, (var0, var1)
    assert_within_stderr(mean1 - mean0, 0.0, math.hypot(se0, se1))
    with torch.no_grad():
        torch.testing.assert_close(learned(u[[0, -1]]), base(u[[0, -1]]))
