"""The bound, term by term: analytic KLs against Monte Carlo, closed forms, and the three estimators
of the bound (all-T, t-sampled, trajectory) agreeing in expectation.

Estimators are compared per example: for each x_0^(i) the difference d_i of two unbiased estimators
of the same bound B(x_0^(i)) has mean zero, the d_i are independent across i, so the mean of d is
tested against zero with standard error std(d) / sqrt(N) (the data's own spread cancels).
"""
import math

import pytest
import torch
from torch.distributions import kl_divergence

from pdiff.data.mixture import GaussianMixture
from pdiff.data.toy import clusters8, mixture1d
from pdiff.distributions import VARIANCES, q_posterior, quantize
from pdiff.distributions.reverse import ReverseProcess
from pdiff.elbo import (Bound, bits_per_dim, full_bound, prior_term, sample_xt, sampled_bound,
                        step_term, stratified_bound, trajectory_bound)
from pdiff.objectives import ImportanceSampler, UniformSampler
from pdiff.nets import MLPDenoiser, UNet
from pdiff.oracle import MixtureDenoiser
from pdiff.schedules import make_schedule
from tests.stats import assert_within_stderr


def gen(seed):
    return torch.Generator().manual_seed(seed)


class SmoothNet:
    """A fixed nonlinear net(x_t, t); a pair (mean output, variance output) when the variance is
    learned. Its outputs are O(1) so the KLs are neither tiny nor huge."""

    def __init__(self, num_timesteps, learned, event_dims=1):
        self.T, self.learned, self.event_dims = num_timesteps, learned, event_dims

    def __call__(self, xt, t):
        tt = (t.to(xt.dtype) / self.T).reshape(t.shape + (1,) * self.event_dims)
        mean_out = 0.5 * torch.tanh(xt) + 0.3 * tt
        if not self.learned:
            return mean_out
        return mean_out, 0.5 * torch.sin(xt + tt)


def smooth_model(T, variance, prediction="eps", event_dims=1, **kwargs):
    schedule = make_schedule("linear", T)
    net = SmoothNet(T, variance in ("learned", "learned_range", "learned_softplus"), event_dims)
    return ReverseProcess(net, schedule, prediction=prediction, variance=variance,
                          event_dims=event_dims, **kwargs)


def oracle_model(mixture, T, *, variance="fixed_large", schedule="cosine", **kwargs):
    s = make_schedule(schedule, T)
    return ReverseProcess(MixtureDenoiser(mixture, s), s, prediction="x0", variance=variance,
                          **kwargs)


def grid_mixture():
    """A mixture inside [-1, 1] whose samples are quantized to K = 17 levels (as the digits are)."""
    return GaussianMixture(means=[[-0.5, 0.2], [0.4, -0.3]], stds=[0.2, 0.25], weights=[1.0, 2.0])


# -- single terms ------------------------------------------------------------------------------

@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "mean"])
def test_analytic_kl_matches_monte_carlo(variance, prediction):
    """KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) = E_q[log q - log p], per example."""
    T, N, M = 20, 5, 20000
    p = smooth_model(T, variance, prediction)
    x0 = torch.randn(N, 2, generator=gen(1))
    for t_val in (2, 7, T):
        t = torch.full((N,), t_val)
        xt, _ = sample_xt(p, x0, t, gen(2))
        q = q_posterior(p.schedule, x0, xt, t, event_dims=1)
        pt = p.transition(xt, t)
        kl = kl_divergence(q, pt)
        y = q.sample((M,))  # (M, N, 2)
        log_ratio = q.log_prob(y) - pt.log_prob(y)  # (M, N)
        assert_within_stderr(log_ratio.mean(0), kl, log_ratio.std(0) / math.sqrt(M))
        assert (kl >= 0).all()
        torch.testing.assert_close(step_term(p, x0, xt, t), kl, rtol=1e-12, atol=0)


@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
@pytest.mark.parametrize("variance", VARIANCES)
def test_step_term_is_decoder_nll_at_t1_and_kl_after(variance, decoder):
    T, N = 10, 12
    p = smooth_model(T, variance, decoder=decoder, num_levels=17)
    x0 = quantize(torch.rand(N, 3, generator=gen(3)) * 2 - 1, 17)
    t = torch.arange(N) % T + 1  # mixes t = 1 with t >= 2 in one call
    xt, _ = sample_xt(p, x0, t, gen(4))
    got = step_term(p, x0, xt, t)
    first = t == 1
    want = torch.empty(N)
    want[first] = -p.decoder(xt[first]).log_prob(x0[first])
    rest = ~first
    want[rest] = kl_divergence(q_posterior(p.schedule, x0[rest], xt[rest], t[rest]),
                               p.transition(xt[rest], t[rest]))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (N,)


def test_prior_term_closed_form():
    """L_T = KL(N(sqrt(ab_T) x_0, 1 - ab_T) || N(0, 1)) summed over dimensions."""
    for name, T in (("linear", 10), ("cosine", 50), ("const", 5)):
        p = smooth_model(T, "fixed_small").replace(schedule=make_schedule(name, T, warn=False))
        x0 = torch.randn(7, 3, generator=gen(5)) * 2
        ab = p.schedule.alpha_bar[T]
        want = 0.5 * (ab * x0**2 + (1 - ab) - 1 - torch.log(1 - ab)).sum(-1)
        torch.testing.assert_close(prior_term(p, x0), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("event_shape", [(2,), (1, 2, 2)])
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("variance,decoder", [("fixed_large", "gaussian"),
                                              ("learned_range", "discretized")])
def test_terms_are_per_example_for_any_batch_shape(batch_shape, event_shape, variance, decoder):
    """Every term has shape batch_shape, and equals the flat (N,) computation reshaped."""
    T = 6
    p = smooth_model(T, variance, event_dims=len(event_shape), decoder=decoder, num_levels=17)
    x0 = quantize(torch.rand(batch_shape + event_shape, generator=gen(30)) * 2 - 1, 17)
    flat = x0.reshape((-1,) + event_shape)
    t = torch.randint(1, T + 1, batch_shape, generator=gen(31))
    xt, _ = sample_xt(p, x0, t, gen(32))
    flat_xt = xt.reshape(flat.shape)
    pairs = [(prior_term(p, x0), prior_term(p, flat)),
             (step_term(p, x0, xt, t), step_term(p, flat, flat_xt, t.reshape(-1))),
             (trajectory_bound(p, x0, generator=gen(33)),
              trajectory_bound(p, flat, generator=gen(33)))]
    for got, want in pairs:
        assert got.shape == batch_shape
        torch.testing.assert_close(got.reshape(-1), want, rtol=1e-12, atol=1e-12)
    estimate, term = sampled_bound(p, x0, t, torch.ones(batch_shape), generator=gen(34))
    assert estimate.shape == term.shape == batch_shape


def test_bits_per_dim_and_bound_shapes():
    T, N, D = 8, 6, 3
    p = smooth_model(T, "fixed_large")
    bound = full_bound(p, torch.randn(N, D, generator=gen(6)), generator=gen(7))
    assert isinstance(bound, Bound)
    assert bound.prior.shape == (N,) and bound.terms.shape == (N, T) and bound.total.shape == (N,)
    torch.testing.assert_close(bound.total, bound.prior + bound.terms.sum(-1))
    torch.testing.assert_close(bits_per_dim(bound.total, D), bound.total / (D * math.log(2)))
    assert bits_per_dim(math.log(2) * 12, 3) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        full_bound(p, torch.randn(2, N, D))


# -- full_bound: chunking ----------------------------------------------------------------------

class TimeOnlyX0:
    """x0-predicting net that ignores x_t. Then mu_theta - mu_tilde = c0_t (x0_hat(t) - x_0) does
    not depend on x_t, so under fixed variances every term of the bound is a deterministic function
    of (x_0, t) and full_bound has no Monte Carlo noise at all."""

    def __call__(self, xt, t):
        return (0.1 * t.to(xt.dtype) - 0.5)[..., None].expand_as(xt) + 0.2 * torch.arange(
            xt.shape[-1], dtype=xt.dtype)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_full_bound_chunking_exact_on_deterministic_terms(variance):
    """With noise-free terms, chunk sizes that split rows and steps differently give the same
    (N, T) array, and each entry is the closed-form term of its own (x_0, t)."""
    T, N, D = 9, 11, 2
    s = make_schedule("linear", T)
    p = ReverseProcess(TimeOnlyX0(), s, prediction="x0", variance=variance,
                       decoder_variance="beta_tilde2")
    x0 = torch.randn(N, D, generator=gen(8))
    bounds = [full_bound(p, x0, chunk_size=c, generator=gen(9)) for c in (1, 7, T, 64, 65536)]
    for b in bounds[1:]:
        torch.testing.assert_close(b.terms, bounds[0].terms, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.prior, bounds[0].prior, rtol=0, atol=0)
    # Closed form: 0.5 sum_d [r - 1 - log r + c0^2 (x0_hat - x0)^2 / sigma^2],
    # r = beta_tilde / sigma^2.
    t = torch.arange(1, T + 1)
    x0_hat = TimeOnlyX0()(torch.zeros(T, D), t)  # (T, D)
    # sigma_t^2: beta_tilde_t or beta_t for t >= 2; beta_tilde_2 at t = 1 (decoder_variance).
    var = (s.beta_tilde if variance == "fixed_small" else s.betas).clone()
    var[1] = s.beta_tilde[2]
    log_var = var[1:].log().unsqueeze(-1)  # (T, 1)
    err2 = (x0_hat[None] - x0[:, None]) ** 2  # (N, T, D)
    c0 = s.posterior_coef_x0[1:].unsqueeze(-1)
    r = s.beta_tilde[1:].unsqueeze(-1) / log_var.exp()
    kl = 0.5 * (r - 1 - torch.log(r) + c0**2 * err2 / log_var.exp()).sum(-1)  # (N, T)
    nll1 = 0.5 * (math.log(2 * math.pi) + log_var[0] + err2[:, 0] / log_var[0].exp()).sum(-1)
    torch.testing.assert_close(bounds[0].terms[:, 1:], kl[:, 1:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bounds[0].terms[:, 0], nll1, rtol=1e-10, atol=1e-12)


def test_full_bound_chunking_same_expectation_with_noise():
    """With a real denoiser the draws depend on the chunking; the expectation must not."""
    m = clusters8()
    p = oracle_model(m, 10)
    x0 = m.sample((3000,), generator=gen(10))
    a = full_bound(p, x0, chunk_size=65536, generator=gen(11)).total
    b = full_bound(p, x0, chunk_size=997, generator=gen(12)).total
    d = a - b
    assert_within_stderr(d.mean(), 0.0, d.std() / math.sqrt(len(d)))


# -- stratified_bound: an unbiased estimate from K + 1 terms ----------------------------------

def time_only_model(T, variance="fixed_large"):
    return ReverseProcess(TimeOnlyX0(), make_schedule("linear", T), prediction="x0",
                          variance=variance, decoder_variance="beta_tilde2")


def test_stratified_bound_with_one_step_per_stratum_is_the_full_bound():
    """K = T - 1: every step 2..T is its own stratum, drawn once with weight 1, plus L_0. On
    noise-free terms that is every term exactly."""
    T, N = 12, 7
    p = time_only_model(T)
    x0 = torch.randn(N, 2, generator=gen(20))
    full = full_bound(p, x0, generator=gen(21))
    strat = stratified_bound(p, x0, T - 1, generator=gen(22))
    torch.testing.assert_close(strat.total, full.total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(strat.terms[:, 0], full.terms[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 3, 10])
def test_stratified_bound_is_unbiased_on_noise_free_terms(K):
    """Its only randomness is then the draw of t_k in each stratum: the mean over many draws is
    the full bound, within the estimate's standard error."""
    T, M = 40, 4000
    p = time_only_model(T)
    x0 = torch.randn(3, 2, generator=gen(23))
    full = full_bound(p, x0, generator=gen(24)).total  # exact here
    many = stratified_bound(p, x0.repeat_interleave(M, 0), K, generator=gen(25)).total.reshape(3, M)
    assert_within_stderr(many.mean(1), full, many.std(1) / math.sqrt(M))
    assert many.std(1).max() > 0  # the draw of t does vary the estimate


def test_stratified_bound_agrees_with_the_full_bound_on_a_real_denoiser():
    m = clusters8()
    p = oracle_model(m, 50)
    x0 = m.sample((3000,), generator=gen(26))
    a = full_bound(p, x0, generator=gen(27)).total
    b = stratified_bound(p, x0, 7, chunk_size=500, generator=gen(28)).total
    d = a - b  # paired: same points, independent draws
    assert_within_stderr(d.mean(), 0.0, d.std() / math.sqrt(len(d)))


def test_stratified_bound_refuses_k_outside_its_range():
    p = time_only_model(10)
    for K in (0, 10):
        with pytest.raises(ValueError, match="timestep_samples must be in 1..T - 1 = 9"):
            stratified_bound(p, torch.zeros(2, 2), K)


# -- the three estimators of the bound agree -------------------------------------------------

def fed_importance_sampler(p, x0, generator):
    """An ImportanceSampler fed a history whose root mean square for each t is that of the term
    over many examples, so its probs are far from uniform and close to the variance-minimizing
    choice (a 10-example history of heavy-tailed terms can miss the rare large values and give
    an estimator whose sample standard error is unreliable)."""
    T = p.num_timesteps
    sampler = ImportanceSampler(T)
    rms = full_bound(p, x0, generator=generator).terms.pow(2).mean(0).sqrt()  # (T,)
    sampler.update(torch.arange(1, T + 1).repeat(sampler.history), rms.repeat(sampler.history))
    assert sampler.warmed_up()
    probs = sampler.probs()
    assert probs.max() / probs.min() > 2
    return sampler


CASES = [
    ("mixture1d", 10, dict()),
    ("mixture1d", 50, dict(variance="fixed_small")),
    ("clusters8", 20, dict()),
    ("clusters8", 10, dict(variance="fixed_small", decoder_variance="beta1")),
    ("grid17", 20, dict(decoder="discretized", num_levels=17)),
]


def case_model_and_data(name, T, kwargs, n, seed):
    if name == "grid17":
        m = grid_mixture()
        x0 = quantize(m.sample((n,), generator=gen(seed)), 17)
    else:
        m = {"mixture1d": mixture1d, "clusters8": clusters8}[name]()
        x0 = m.sample((n,), generator=gen(seed))
    return oracle_model(m, T, **kwargs), x0


@pytest.mark.parametrize("name,T,kwargs", CASES)
def test_sampled_and_trajectory_estimators_match_full_bound(name, T, kwargs):
    N = 6000
    p, x0 = case_model_and_data(name, T, kwargs, N, 13)
    full = full_bound(p, x0, generator=gen(14)).total
    with torch.no_grad():
        estimates = {"trajectory": trajectory_bound(p, x0, generator=gen(15))}
        for label, sampler in (("uniform", UniformSampler(T)),
                               ("importance", fed_importance_sampler(p, x0[:2000], gen(16)))):
            t, w = sampler.sample(N, generator=gen(17))
            estimates[label], term = sampled_bound(p, x0, t, w, generator=gen(18))
            torch.testing.assert_close(estimates[label], prior_term(p, x0) + T * w * term)
    for label, est in estimates.items():
        d = est - full
        assert torch.isfinite(d).all(), label
        assert_within_stderr(d.mean(), 0.0, d.std() / math.sqrt(N))



# -- step_term on whole batches (torch.where) against the masked definition --------------------

def masked_step_term(p, x0, xt, t, out):
    """The term of step t by its definition, the t = 1 entries and the others selected by boolean
    masks: the reference for step_term, which computes both on the whole batch instead."""
    result = x0.new_empty(t.shape)
    first = t == 1
    if first.any():
        result[first] = -p.decoder(xt[first], out=out[first]).log_prob(x0[first])
    rest = ~first
    if rest.any():
        q = q_posterior(p.schedule, x0[rest], xt[rest], t[rest], event_dims=p.event_dims)
        result[rest] = kl_divergence(q, p.transition(xt[rest], None, out=out[rest]))
    return result


def random_net_model(variance, decoder, T, event_dims=1):
    torch.manual_seed(5)
    learned = variance in ("learned", "learned_range", "learned_softplus")
    if event_dims == 1:
        net = MLPDenoiser(3, T, hidden=16, depth=2, out_multiplier=2 if learned else 1)
        torch.nn.init.normal_(net.head.weight, std=0.3)
    else:
        net = UNet(1, 4, base_channels=8, channel_mults=(1,), attention_resolutions=(4,),
                   groups=4, out_multiplier=2 if learned else 1)
        torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    return ReverseProcess(net, make_schedule("linear", T), variance=variance, decoder=decoder,
                          num_levels=17, event_dims=event_dims)


@pytest.mark.parametrize("steps", ["mixed", "all_first", "none_first"])
@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
@pytest.mark.parametrize("variance", VARIANCES)
def test_step_term_equals_the_masked_definition_values_and_gradients(variance, decoder, steps):
    """Same values and the same (finite) gradients for the network, whatever mix of t = 1 and
    t >= 2 a batch holds: the discarded branch contributes nothing, not even a NaN."""
    T, N = 10, 24
    p = random_net_model(variance, decoder, T)
    x0 = quantize(torch.rand(N, 3, generator=gen(40)) * 2 - 1, 17)
    t = {"mixed": torch.arange(N) % T + 1, "all_first": torch.ones(N, dtype=torch.long),
         "none_first": torch.arange(N) % (T - 1) + 2}[steps]
    xt, _ = sample_xt(p, x0, t, gen(41))
    got = step_term(p, x0, xt, t)
    want = masked_step_term(p, x0, xt, t, p.output(xt, t))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = list(p.net.parameters())
    for a, b in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_step_term_on_images_equals_the_masked_definition():
    T, N = 6, 5
    p = random_net_model("learned_range", "discretized", T, event_dims=3)
    x0 = quantize(torch.rand(N, 1, 4, 4, generator=gen(42)) * 2 - 1, 17)
    t = torch.tensor([1, 2, 1, 6, 3])
    xt, _ = sample_xt(p, x0, t, gen(43))
    torch.testing.assert_close(step_term(p, x0, xt, t),
                               masked_step_term(p, x0, xt, t, p.output(xt, t)), rtol=1e-12,
                               atol=1e-12)


def test_full_bound_rows_are_step_terms_at_their_own_draws():
    """full_bound's chunk loop is the row-major (example, step) order: with one chunk holding
    everything, its terms are step_term at x_t drawn from the same stream in that order."""
    T, N, D = 7, 5, 3
    p = random_net_model("learned_range", "gaussian", T)
    x0 = torch.randn(N, D, generator=gen(44))
    bound = full_bound(p, x0, chunk_size=10**6, generator=gen(45))
    t = torch.arange(1, T + 1).repeat(N)
    x0_rep = x0.repeat_interleave(T, 0)
    xt, _ = sample_xt(p, x0_rep, t, gen(45))
    with torch.no_grad():
        want = step_term(p, x0_rep, xt, t).reshape(N, T)
    torch.testing.assert_close(bound.terms, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bound.prior, prior_term(p, x0), rtol=0, atol=0)


def test_off_grid_data_refused_once_per_call():
    """The hot paths skip the decoder's support check; the public entry points make it once."""
    T = 5
    p = random_net_model("learned_range", "discretized", T)
    x0 = quantize(torch.rand(4, 3, generator=gen(46)) * 2 - 1, 17)
    off = x0 + 0.01
    t = torch.tensor([1, 2, 3, 4])
    for call in (lambda x: full_bound(p, x), lambda x: step_term(p, x, x, t),
                 lambda x: sampled_bound(p, x, t, torch.ones(4))):
        call(x0)
        with pytest.raises(ValueError, match="17 levels"):
            call(off)


def test_prior_term_is_the_kl_of_the_distributions():
    """prior_term (written out for speed) equals kl_divergence(q(x_T | x_0), N(0, I)) computed by
    torch's own Normal, for vector and image-shaped events."""
    from torch.distributions import Independent, Normal
    for event_shape in ((3,), (1, 2, 2)):
        p = smooth_model(20, "fixed_small", event_dims=len(event_shape))
        x0 = torch.randn((5,) + event_shape, generator=gen(6), dtype=torch.float64)
        ab = p.schedule.alpha_bar[-1]
        q = Independent(Normal(ab.sqrt() * x0, (1 - ab).sqrt().expand_as(x0)), len(event_shape))
        prior = Independent(Normal(torch.zeros_like(x0), torch.ones_like(x0)), len(event_shape))
        torch.testing.assert_close(prior_term(p, x0), kl_divergence(q, prior), rtol=1e-12, atol=1e-14)
