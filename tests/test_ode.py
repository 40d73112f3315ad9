"""The probability-flow ODE likelihood: closed forms on Gaussian data, the true density of the
mixture oracle, Hutchinson against the exact trace, dequantized images, and the refusals."""
import math

import pytest
import torch

from pdiff.continuous import DiscreteLogSNR
from pdiff.data.mixture import GaussianMixture
from pdiff.data.toy import get_toy
from pdiff.distributions.reverse import ReverseProcess
from pdiff.elbo import bits_per_dim
from pdiff.nets.mlp import MLPDenoiser
from pdiff.nets.unet import UNet, unet_for
from pdiff.ode import ode_nll, ode_report
from pdiff.oracle import MixtureDenoiser
from pdiff.schedules import make_schedule
from tests.stats import assert_within_stderr

MU, S = (0.7, -0.4, 1.2), 0.5
U0 = 1e-5


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian():
    return GaussianMixture(torch.tensor([MU]), torch.tensor([S]), torch.ones(1))


def oracle(data, schedule):
    return ReverseProcess(MixtureDenoiser(data, schedule), schedule, prediction="x0")


def alpha_bar_ends(schedule, u0=U0):
    """alpha_bar at u0 and at u = 1 on the schedule's continuous-time view."""
    return DiscreteLogSNR(schedule).log_alpha_bar(torch.tensor([u0, 1.0])).exp()


def gaussian_flow(schedule, x):
    """The PF flow of N(mu, S^2 I) is affine, (x - m_u) / sqrt(v_u) constant along it:
    x(1) = m_1 + sqrt(v_1 / v_0) (x - m_0), and NLL = -log N(x(1); 0, I) - D/2 log(v_1 / v_0)."""
    ab = alpha_bar_ends(schedule)
    m0, m1 = ab.sqrt()[:, None] * torch.tensor(MU)
    v0, v1 = ab * S**2 + 1 - ab
    z = m1 + (v1 / v0).sqrt() * (x - m0)
    D = x.shape[-1]
    nll = 0.5 * (z**2).sum(-1) + 0.5 * D * math.log(2 * math.pi) - 0.5 * D * torch.log(v1 / v0)
    return z, nll


@pytest.mark.parametrize("T", [10, 1000])
def test_gaussian_data_match_the_closed_form_flow(T):
    s = make_schedule("linear", T, warn=False)
    x = gaussian().sample((16,), generator=gen(0))
    z, nll = gaussian_flow(s, x)
    errors = []
    for tol in (1e-4, 1e-6, 1e-8):
        r = ode_nll(oracle(gaussian(), s), x, rtol=tol, atol=tol)
        assert r.divergence == "exact" and r.probes is None and r.probe_nll is None
        scale = tol * (1 + nll.abs().max())  # the solver's local tolerance at the state's size
        torch.testing.assert_close(r.nll, nll, rtol=0, atol=float(20 * scale))
        torch.testing.assert_close(r.latent, z, rtol=0, atol=float(20 * scale))
        errors.append((r.nll - nll).abs().max().item())
    assert errors[2] < errors[1] < errors[0]  # converges as the tolerance tightens


def test_chunks_are_independent_solves_of_the_same_flow():
    s = make_schedule("linear", 100)
    x = gaussian().sample((10,), generator=gen(1))
    _, nll = gaussian_flow(s, x)
    whole = ode_nll(oracle(gaussian(), s), x, rtol=1e-7, atol=1e-7)
    parts = ode_nll(oracle(gaussian(), s), x, rtol=1e-7, atol=1e-7, chunk_size=4)
    assert len(whole.nfe_per_chunk) == 1 and len(parts.nfe_per_chunk) == 3
    assert parts.nfe == sum(parts.nfe_per_chunk)
    torch.testing.assert_close(parts.nll, whole.nll, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.nll, nll, rtol=0, atol=1e-5)


def test_mixture1d_oracle_recovers_the_data_density():
    """With the exact score the flow carries p_{u0} onto the true p_1, so per point

        nll_ode(x) + log p_{u0}(x) = log p_1(x(1)) - log N(x(1); 0, I)

    (the prior mismatch of alpha_bar_T != 0) up to the solver's error, which falls with rtol.
    Averaged over x ~ p_data the mismatch is KL(p_1 || N(0, I)) <= sum_k w_k KL(N(a mu_k, v_k) ||
    N(0, 1)) (convexity), and p_{u0} differs from p_data by less than computed here."""
    data = get_toy("mixture1d")
    s = make_schedule("linear", 1000)
    x = data.sample((200,), generator=gen(2))
    ab0, ab1 = alpha_bar_ends(s)

    def log_p(y, ab):  # the data's marginal at alpha_bar = ab
        return torch.logsumexp(data.component_log_prob(y, ab.sqrt(), 1 - ab), -1)
    log_p0 = log_p(x, ab0)
    errors = []
    for tol in (1e-3, 1e-5, 1e-7):
        r = ode_nll(oracle(data, s), x, rtol=tol, atol=tol)
        mismatch = log_p(r.latent, ab1) + r.prior
        errors.append((r.nll + log_p0 - mismatch).abs().mean().item())
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-5

    gap = r.nll + data.log_prob(x)  # paired: nll_ode + log p_data
    var1 = ab1 * data.stds[:, 0] ** 2 + 1 - ab1
    kl_bound = (data.weights * 0.5 * (var1 + ab1 * data.means[:, 0] ** 2 - 1 - var1.log())).sum()
    shift = (log_p0 - data.log_prob(x)).abs().max()  # p_{u0} against p_data
    se = gap.std() / math.sqrt(len(gap))
    assert -5 * se - shift <= gap.mean() <= kl_bound + 5 * se + shift
    # the mismatch itself averages to KL(p_1 || N(0, I)), at most the bound
    assert mismatch.mean() <= kl_bound + 5 * mismatch.std() / math.sqrt(len(mismatch))


def random_mlp(D, T, dtype=torch.float64):
    torch.manual_seed(1)
    net = MLPDenoiser(D, T, hidden=32, depth=2).to(dtype)
    torch.nn.init.normal_(net.head.weight, std=0.3)  # not the zero-initialized head: eps_hat != 0
    return net


def test_hutchinson_is_the_exact_divergence_in_expectation():
    D, T = 4, 100
    model = ReverseProcess(random_mlp(D, T), make_schedule("linear", T), prediction="eps")
    x = torch.randn(4, D, generator=gen(3))
    exact = ode_nll(model, x, divergence="exact")
    assert exact.divergence == "exact"
    P = 16
    hutch = ode_nll(model, x, divergence="hutchinson", probes=P, generator=gen(4))
    assert hutch.divergence == "hutchinson" and hutch.probe_nll.shape == (4, P)
    torch.testing.assert_close(hutch.nll, hutch.probe_nll.mean(1))
    assert (hutch.probe_nll.std(1) > 0).all()
    # each point's mean over its probes, within its standard error (+ the solvers' own error)
    assert_within_stderr(hutch.nll, exact.nll, hutch.probe_nll.std(1) / math.sqrt(P), atol=1e-3)


def test_hutchinson_is_exact_for_an_isotropic_jacobian():
    """On N(mu, S^2 I) the oracle's d eps_hat / dx is c I, and z^T (c I) z = c D for every
    Rademacher z: each probe gives the exact NLL."""
    s = make_schedule("linear", 100)
    x = gaussian().sample((5,), generator=gen(5))
    _, nll = gaussian_flow(s, x)
    r = ode_nll(oracle(gaussian(), s), x, divergence="hutchinson", probes=3, generator=gen(6),
                rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(r.probe_nll, nll[:, None].expand(5, 3), rtol=0, atol=1e-5)


def image_model(K=256, T=1000):
    torch.manual_seed(0)
    net = UNet(**unet_for(8, 1, base_channels=8)).double().eval()
    s = make_schedule("linear", T)
    return ReverseProcess(net, s, prediction="eps", decoder="discretized", num_levels=K,
                          event_dims=3), s


def test_dequantized_images_with_a_zero_network_follow_the_closed_form():
    """With eps_hat = 0 (the zero-initialized output layer) dx/dtau = -x/2, so x(1) =
    sqrt(ab_1 / ab_0) z and the integral of the divergence is -D/2 (tau_1 - tau_0), tau =
    -log alpha_bar; z is the dequantized point, within half a bin of x; the offset is
    -D log(2 / (K - 1))."""
    K = 256
    model, s = image_model(K)
    x = -1 + 2 * torch.randint(0, K, (3, 1, 8, 8), generator=gen(7)) / (K - 1)
    r = ode_nll(model, x, generator=gen(8), atol=1e-9)  # x(1) ~ 0.006 x: atol well below it
    D = 64
    assert r.divergence == "hutchinson" and r.probes == 1
    assert r.dequantization_nats == pytest.approx(-D * math.log(2 / (K - 1)))
    ab0, ab1 = alpha_bar_ends(s)
    w = (r.latent / (ab1 / ab0).sqrt() - x) * (K - 1)  # U(-1, 1): in half-bins, up to rtol
    assert w.abs().max() <= 1.01 and w.max() > 0.9 and w.min() < -0.9
    assert_within_stderr(w.mean(), 0.0, (1 / 3 / w.numel()) ** 0.5)
    tau = -torch.log(torch.stack([ab0, ab1]))
    expected = r.prior + 0.5 * D * (tau[1] - tau[0]) + r.dequantization_nats
    torch.testing.assert_close(r.nll, expected, rtol=1e-7, atol=1e-6)


def test_dequantized_report_on_images():
    K = 256
    model, _ = image_model(K, T=100)
    torch.nn.init.normal_(model.net.out[-1].weight, std=0.05)
    x = -1 + 2 * torch.randint(0, K, (2, 1, 8, 8), generator=gen(9)) / (K - 1)
    rep = ode_report(model, x, rtol=1e-3, atol=1e-3, generator=gen(10))
    d = rep.to_dict()
    assert all(math.isfinite(d[k])
               for k in ("nll_nats", "nll_stderr", "bits_per_dim", "prior_nats"))
    assert d["dequantization"] == "uniform" and d["divergence"] == "hutchinson"
    assert d["dim"] == 64 and d["num_samples"] == 2 and d["nfe"] == d["nfe_max"] > 0
    assert d["bits_per_dim"] == pytest.approx(d["nll_nats"] / (64 * math.log(2)))
    assert d["dequantization_nats"] == pytest.approx(-64 * math.log(2 / 255))


def test_report_summarizes_like_the_bound_report():
    s = make_schedule("linear", 100)
    x = gaussian().sample((6,), generator=gen(11))
    model = oracle(gaussian(), s)
    r = ode_nll(model, x)
    logp = gaussian().log_prob(x)
    rep = ode_report(model, x, log_jacobian=0.25, data_log_prob=logp - 0.25)
    total = r.nll - 0.25
    assert rep.nll_nats == pytest.approx(total.mean().item())
    assert rep.nll_stderr == pytest.approx(total.std().item() / math.sqrt(6))
    assert rep.bits_per_dim == pytest.approx(bits_per_dim(rep.nll_nats, 3))
    assert rep.gap_nats == pytest.approx((total + logp - 0.25).mean().item())
    assert rep.dequantization is None and rep.dequantization_nats == 0
    assert rep.divergence == "exact" and rep.probes is None and rep.log_jacobian_nats == 0.25
    one = ode_report(model, x[:1], entropy=(1.0, 0.1))
    assert one.nll_stderr is None and one.gap_stderr is None
    assert one.gap_nats == pytest.approx(one.nll_nats - 1.0)


def test_float32_network_and_data():
    D, T = 3, 50
    model = ReverseProcess(random_mlp(D, T, torch.float32), make_schedule("linear", T))
    x = torch.randn(5, D, dtype=torch.float32, generator=gen(12))
    r = ode_nll(model, x)
    assert r.latent.dtype == torch.float32 and r.nll.dtype == torch.float64
    assert torch.isfinite(r.nll).all()


@pytest.mark.parametrize("option, value, match", [
    ("divergence", "trace", "auto, exact, hutchinson"),
    ("method", "Euler", "RK45"),
    ("rtol", 0.0, "rtol"), ("atol", -1e-5, "atol"), ("rtol", float("nan"), "rtol"),
    ("probes", 0, "probes"), ("chunk_size", 0, "chunk_size"),
    ("u_start", 0.0, "u_start"), ("u_start", 1.0, "u_start"),
])
def test_bad_options_are_refused(option, value, match):
    model = oracle(gaussian(), make_schedule("linear", 10, warn=False))
    with pytest.raises(ValueError, match=match):
        ode_nll(model, torch.zeros(2, 3), **{option: value})


@pytest.mark.parametrize("kind", ["mean", "onehot"])
def test_models_without_a_continuous_time_view_are_refused(kind):
    T = 10
    s = make_schedule("linear", T, warn=False)
    if kind == "mean":
        model = ReverseProcess(MLPDenoiser(2, T, hidden=8, depth=1), s, prediction="mean")
    else:
        model = ReverseProcess(MLPDenoiser(2, T, hidden=8, depth=1, embedding="onehot"), s)
    with pytest.raises(ValueError, match="continuous time"):
        ode_nll(model, torch.zeros(2, 2))
