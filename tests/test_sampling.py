"""Ancestral and DDIM sampling: with the Bayes-optimal denoiser the samples have the data's moments.

The model error of the oracle chain was measured once with 200k samples (seed 1, cosine T = 100,
fixed_large, the analytic x0 oracle for ``mixture1d``, data mean 4/3 and variance 137/9 = 15.22):

    steps   mean - 4/3          variance - 137/9    P(x > 0) - 2/3     component means   component vars
    100     +0.028 +- 0.009     -0.22 +- 0.03       +0.004 +- 0.001    3.984, -3.970     1.014, 1.027
    20      +0.14  +- 0.008     -1.22 +- 0.03       +0.019             3.909, -3.843     1.053, 1.077

The bias is the chain's discretization error, not noise: the modes shrink towards the overall mean
by ~0.02 at 100 steps (~0.1 at 20 respaced steps), which removes 2 * 4 * 0.016 ~ 0.13 of variance,
and the heavier mode gains a little weight; at T = 1000 the same comparison gives
-0.018 +- 0.04 for the variance. Each ``atol`` below is about twice the measured bias, so the tests
fail for a wrong chain (missing noise, a wrong coefficient or time index moves these moments by
whole units) but not for the model's own small error.
"""
import pytest
import torch

from pdiff.data import GaussianMixture, get_toy
from pdiff.distributions import DECODERS, FIXED_VARIANCES, VARIANCES, ReverseProcess
from pdiff.oracle import MixtureDenoiser
from pdiff.distributions.discretized import quantize
from pdiff.parameterization import PREDICTIONS, eps_from_x0, posterior_mean, v_from_x0
from pdiff.sampling import (SAMPLING_METHODS, ancestral_sample, ddim_mean, ddim_sample, ddim_sigma,
                            sample)
from pdiff.schedules import make_schedule, spaced_steps
from tests.stats import assert_within_stderr


@pytest.fixture(autouse=True)
def _one_thread():
    # Each sampling step runs ~50 tiny tensor ops; with intra-op threads on a busy 2-core
    # machine every op waits for a descheduled worker and the loop is 10-50x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _moments(x):
    n = x.shape[0]
    mean = x.mean(0)
    c = x - mean
    var = c.pow(2).mean(0)
    return mean, (var / n).sqrt(), var, ((c.pow(4).mean(0) - var**2) / n).sqrt()


def _oracle_model(T=100, variance="fixed_large", **kwargs):
    data = get_toy("mixture1d")
    s = make_schedule("cosine", T)
    return data, ReverseProcess(MixtureDenoiser(data, s), s, prediction="x0", variance=variance,
                                **kwargs)


def _check_mixture1d(x, data, atol_mean, atol_var, atol_weight, atol_component):
    x = x[:, 0]
    n = x.numel()
    mean, mean_se, var, var_se = _moments(x)
    assert_within_stderr(mean, data.mean[0], mean_se, atol=atol_mean)
    assert_within_stderr(var, data.variance[0], var_se, atol=atol_var)
    pos = x > 0
    w = pos.double().mean()
    assert_within_stderr(w, data.weights[1], (w * (1 - w) / n).sqrt(), atol=atol_weight)
    for side, mu in ((pos, 4.0), (~pos, -4.0)):
        m, m_se, v, v_se = _moments(x[side])
        assert_within_stderr(m, mu, m_se, atol=atol_component)
        assert_within_stderr(v, 1.0, v_se, atol=2 * atol_component)


def test_oracle_samples_have_the_data_moments():
    data, model = _oracle_model()
    n = 20_000
    out = ancestral_sample(model, (n, 1), generator=torch.Generator().manual_seed(0))
    assert out.x0.shape == (n, 1) and out.trajectory is None
    _check_mixture1d(out.x0, data, atol_mean=0.06, atol_var=0.45, atol_weight=0.008,
                     atol_component=0.04)


def test_respaced_oracle_samples_have_the_data_moments():
    data, model = _oracle_model()
    n = 20_000
    calls = []
    net = model.net
    model = model.replace(net=lambda xt, t: calls.append(t[0].item()) or net(xt, t))
    out = sample(model, n, sampling_timesteps=20, event_shape=(1,), return_trajectory=True,
                 generator=torch.Generator().manual_seed(0))
    # 20 network calls at 20 distinct original steps, from T down
    assert len(calls) == 20 and calls[0] == 100 and calls == sorted(set(calls), reverse=True)
    assert out.trajectory.shape == (21, n, 1)
    _check_mixture1d(out.x0, data, atol_mean=0.3, atol_var=2.5, atol_weight=0.04,
                     atol_component=0.3)


@pytest.mark.parametrize("shape", [(4, 1), (2, 3, 1), (5, 2, 3, 3)])
def test_trajectory(shape):
    event_dims = 3 if len(shape) == 4 else 1
    T = 7
    s = make_schedule("cosine", T)
    model = ReverseProcess(lambda xt, t: 0.5 * xt, s, event_dims=event_dims)
    out = ancestral_sample(model, shape, return_trajectory=True,
                           generator=torch.Generator().manual_seed(3))
    assert out.trajectory.shape == (T + 1,) + shape
    assert torch.equal(out.trajectory[0], out.x0)
    # the same generator seed gives the same chain; x_T is the first draw
    again = ancestral_sample(model, shape, return_trajectory=True,
                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.trajectory, out.trajectory)
    first = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.trajectory[-1], first)


@pytest.mark.parametrize("variance", VARIANCES)
def test_each_step_draws_from_the_transition(variance):
    """x_T ~ N(0, I); each step is a draw from p_theta(x_{t-1} | x_t); the last from the decoder.

    Checked through the standardized residuals (x_{t-1} - mu_theta) / sigma_t, which are N(0, I)
    whatever x_t is.
    """
    T = 3
    s = make_schedule("cosine", T)

    def net(xt, t):
        pred = 0.5 * xt + 0.1
        return pred if variance in FIXED_VARIANCES else (pred, torch.full_like(xt, -0.3))
    model = ReverseProcess(net, s, variance=variance)
    n = 100_000
    traj = ancestral_sample(model, (n, 2), return_trajectory=True,
                            generator=torch.Generator().manual_seed(0)).trajectory
    zero, one = torch.zeros(2), torch.ones(2)
    mean, mean_se, var, var_se = _moments(traj[T])
    assert_within_stderr(mean, zero, mean_se)
    assert_within_stderr(var, one, var_se)
    for t in range(T, 1, -1):
        p = model.transition(traj[t], torch.full((n,), t))
        mean, mean_se, var, var_se = _moments((traj[t - 1] - p.mean) / p.stddev)
        assert_within_stderr(mean, zero, mean_se)
        assert_within_stderr(var, one, var_se)
    dec = model.decoder(traj[1])
    mean, mean_se, var, var_se = _moments((traj[0] - dec.mean) / dec.stddev)
    assert_within_stderr(mean, zero, mean_se)
    assert_within_stderr(var, one, var_se)


def test_noiseless_last_step_returns_the_decoder_mean():
    s = make_schedule("cosine", 5)
    model = ReverseProcess(lambda xt, t: 0.5 * xt, s)
    out = ancestral_sample(model, (6, 2), return_trajectory=True, noiseless_last_step=True)
    x1 = out.trajectory[1]
    torch.testing.assert_close(out.x0, model.output(x1, torch.ones(6, dtype=torch.long)).mean)


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("event_dims", (1, 3))
def test_discretized_decoder_samples_on_grid(variance, event_dims):
    K = 17
    s = make_schedule("cosine", 20)
    data = GaussianMixture(means=[[-0.5], [0.5]], stds=[0.1, 0.1], weights=[1.0, 1.0])
    oracle = MixtureDenoiser(data, s)

    def net(xt, t):
        # the 1-D oracle applied to every coordinate independently
        x0 = oracle(xt.reshape(-1, 1), t.reshape(-1, 1).expand(-1, xt[0].numel()).reshape(-1))
        x0 = x0.reshape(xt.shape)
        if variance in FIXED_VARIANCES:
            return x0
        # sigma ~ 0.05 (learned, learned_softplus) or between sqrt(beta_tilde) and sqrt(beta)
        return x0, torch.full_like(xt, {"learned": -6.0, "learned_range": 0.0,
                                        "learned_softplus": -3.0}[variance])
    model = ReverseProcess(net, s, prediction="x0", variance=variance, decoder="discretized",
                           num_levels=K, event_dims=event_dims)
    event = (1,) if event_dims == 1 else (1, 2, 2)
    x = sample(model, 500, event_shape=event, generator=torch.Generator().manual_seed(0)).x0
    assert x.shape == (500,) + event
    k = (x + 1) * (K - 1) / 2
    assert ((k - k.round()).abs() <= 1e-12).all()
    assert ((k.round() >= 0) & (k.round() <= K - 1)).all()
    # the decoder assigns the samples a finite log-probability (they lie in its support)
    x1 = torch.zeros((500,) + event)
    assert torch.isfinite(model.decoder(x1).log_prob(x)).all()
    # most samples sit near the two modes at -+0.5 (levels 4 and 12 of 17)
    near = ((x.abs() - 0.5).abs() <= 0.25).double().mean()
    assert near > 0.9


@pytest.mark.parametrize("decoder", DECODERS)
def test_sample_shapes_dtype_and_steps(decoder):
    s = make_schedule("cosine", 10)
    model = ReverseProcess(lambda xt, t: torch.zeros_like(xt), s, decoder=decoder, num_levels=5)
    for K in (None, 10, 3, 1):
        out = sample(model, 4, sampling_timesteps=K, event_shape=(2,), return_trajectory=True,
                     dtype=torch.float32)
        steps = 10 if K is None else K
        assert out.x0.shape == (4, 2) and out.x0.dtype == torch.float32
        assert out.trajectory.shape == (steps + 1, 4, 2)
    with pytest.raises(ValueError, match="1..10"):
        sample(model, 4, sampling_timesteps=11, event_shape=(2,))


# -- DDIM (Song et al. 2021) -----------------------------------------------------------------------

MU, SD = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 2.0])


def _gaussian_denoiser(schedule, mu, sd):
    """E[x_0 | x_t] for x_0 ~ N(mu, diag sd^2): mu + sqrt(ab) sd^2 / (ab sd^2 + 1 - ab)
    (x_t - sqrt(ab) mu), ab = alpha_bar_t of the training chain ``schedule``."""
    def net(xt, t):
        ab = schedule.alpha_bar[t][:, None]
        return mu + ab.sqrt() * sd**2 / (ab * sd**2 + 1 - ab) * (xt - ab.sqrt() * mu)
    return net


def _ddim_chain_moments(ab, mu, sd, eta):
    """Mean and variance of DDIM's samples for N(mu, sd^2) data and the exact denoiser, each step
    being linear in x_t: y = x_t - sqrt(ab_t) mu goes to k y + sigma z with
    k = (sqrt(ab_t ab_prev) sd^2 + sqrt(1 - ab_prev - sigma^2) sqrt(1 - ab_t)) / (ab_t sd^2 + 1 - ab_t).
    ``ab``: alpha_bar at the chain's steps, ab[0] = 1 then ab_1..ab_K; sigma by eq. 16 written out
    here, independently of ``ddim_sigma``."""
    K = len(ab) - 1
    m, v = -ab[K].sqrt() * mu, torch.ones_like(mu)  # x_K ~ N(0, I)
    for k in range(K, 1, -1):
        a, b = ab[k], ab[k - 1]
        sigma2 = eta**2 * (1 - b) / (1 - a) * (1 - a / b)
        gain = ((a * b).sqrt() * sd**2 + (1 - b - sigma2).sqrt() * (1 - a).sqrt()) / (a * sd**2 + 1 - a)
        m, v = gain * m, gain**2 * v + sigma2
    g = ab[1].sqrt() * sd**2 / (ab[1] * sd**2 + 1 - ab[1])  # the last step returns x0_hat
    return mu + g * m, g**2 * v


@pytest.mark.parametrize("eta", (0.0, 1.0))
def test_ddim_with_the_exact_denoiser_has_the_data_moments(eta):
    """N(mu, diag sd^2) data and its exact E[x_0 | x_t], all T = 1000 steps of the cosine chain:
    the samples' mean and variance are the data's within standard errors. The chain's own bias,
    in closed form (``_ddim_chain_moments``: variance -0.3% at eta = 0, -0.8% at eta = 1), is
    checked to be below one standard error first, so the test cannot pass or fail by it."""
    s = make_schedule("cosine", 1000)
    model = ReverseProcess(_gaussian_denoiser(s, MU, SD), s, prediction="x0")
    n = 20_000
    mean_c, var_c = _ddim_chain_moments(torch.cat([torch.ones(1), s.alpha_bar[1:]]), MU, SD, eta)
    var = SD**2
    assert ((mean_c - MU).abs() < (var / n).sqrt()).all()
    assert ((var_c - var).abs() < (2 / n) ** 0.5 * var).all()
    x = ddim_sample(model, (n, 2), eta=eta, generator=torch.Generator().manual_seed(0)).x0
    mean, mean_se, v, v_se = _moments(x)
    assert_within_stderr(mean, MU, mean_se)
    assert_within_stderr(v, var, v_se)


@pytest.mark.parametrize("eta", (0.0, 0.5, 1.0))
def test_respaced_ddim_has_its_closed_form_moments(eta):
    """On 8 evenly spaced steps of T = 1000 the chain is biased (its variance 20-40% low) but known
    in closed form from alpha_bar at the kept steps: the samples match it within standard errors,
    and the network is asked about the kept training steps, from T down."""
    s = make_schedule("cosine", 1000)
    kept = spaced_steps(1000, 8)
    calls = []
    net = _gaussian_denoiser(s, MU, SD)
    model = ReverseProcess(lambda xt, t: calls.append(int(t[0])) or net(xt, t), s, prediction="x0")
    n = 20_000
    out = sample(model, n, sampling_timesteps=8, event_shape=(2,), sampler="ddim", eta=eta,
                 generator=torch.Generator().manual_seed(1))
    assert calls == kept.flip(0).tolist()
    mean_c, var_c = _ddim_chain_moments(torch.cat([torch.ones(1), s.alpha_bar[kept]]), MU, SD, eta)
    assert ((var_c - SD**2).abs() > 0.1 * SD**2).all()  # far from the data: the test has teeth
    mean, mean_se, v, v_se = _moments(out.x0)
    assert_within_stderr(mean, mean_c, mean_se)
    assert_within_stderr(v, var_c, v_se)


def _smooth_net(schedule, prediction, event_dims=1):
    """A net whose x0_hat is 1.5 tanh(x_t) + 0.1 t / T, output as ``prediction`` would have it."""
    T = schedule.num_timesteps

    def net(xt, t):
        d = event_dims
        x0 = 1.5 * torch.tanh(xt) + 0.1 * t.reshape(t.shape + (1,) * d).to(xt.dtype) / T
        return {"x0": lambda: x0, "eps": lambda: eps_from_x0(schedule, xt, t, x0, d),
                "v": lambda: v_from_x0(schedule, xt, t, x0, d),
                "mean": lambda: posterior_mean(schedule, x0, xt, t, d)}[prediction]()
    return net


@pytest.mark.parametrize("respaced", (None, 7))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_with_eta_1_is_the_fixed_small_step(prediction, respaced):
    """eta = 1: sigma_t^2 = beta_tilde_t of the chain and the mean sqrt(ab_{t-1}) x0_hat +
    sqrt(1 - ab_{t-1} - sigma_t^2) eps_hat = mu_tilde_t(x_t, x0_hat), so each DDIM step is the
    fixed_small transition p_theta(x_{t-1} | x_t) (on a respaced chain, that chain's beta_tilde), to
    1e-12; at t = 1 (sigma_1 = 0) it is the decoder's mean, x0_hat."""
    s = make_schedule("cosine", 50)
    model = ReverseProcess(_smooth_net(s, prediction), s, prediction=prediction,
                           variance="fixed_small")
    if respaced:
        model = model.respaced(spaced_steps(50, respaced))
    K = model.num_timesteps
    sigma = ddim_sigma(model.schedule, 1.0)
    assert sigma.dtype == torch.float64 and sigma.shape == (K + 1,) and sigma[1] == 0
    xt = torch.randn(K, 3) * 1.5
    t = torch.arange(1, K + 1)
    out = model.output(xt, t)
    p = model.transition(xt, t)
    mean = ddim_mean(model, out, sigma)
    torch.testing.assert_close(mean[1:], p.mean[1:], rtol=0, atol=1e-12)
    torch.testing.assert_close((sigma[2:] ** 2)[:, None].expand(K - 1, 3), p.variance[1:],
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(mean[0], out.x0[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(mean[0], model.decoder(xt[:1]).mean[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", (0.5, 1.0))
def test_each_ddim_step_draws_around_its_mean_with_sigma(eta):
    """(x_{t-1} - ddim_mean) / sqrt(beta_tilde_t) along sampled trajectories is N(0, eta^2)
    whatever x_t is: the noise is sigma_t z with sigma_t = eta sqrt(beta_tilde_t), fresh at each
    step; x_T ~ N(0, I); the last step adds no noise."""
    T, n = 4, 100_000
    s = make_schedule("cosine", T)
    model = ReverseProcess(_smooth_net(s, "eps"), s, prediction="eps")
    traj = ddim_sample(model, (n, 2), eta=eta, return_trajectory=True,
                       generator=torch.Generator().manual_seed(2)).trajectory
    assert traj.shape == (T + 1, n, 2)
    zero, one = torch.zeros(2), torch.ones(2)
    mean, mean_se, var, var_se = _moments(traj[T])
    assert_within_stderr(mean, zero, mean_se)
    assert_within_stderr(var, one, var_se)
    sigma = ddim_sigma(s, eta)
    for t in range(T, 1, -1):
        out = model.output(traj[t], torch.full((n,), t))
        z = (traj[t - 1] - ddim_mean(model, out, sigma)) / s.beta_tilde[t].sqrt()
        mean, mean_se, var, var_se = _moments(z)
        assert_within_stderr(mean, zero, mean_se)
        assert_within_stderr(var, eta**2 * one, var_se)
    torch.testing.assert_close(traj[0], model.output(traj[1], torch.ones(n, dtype=torch.long)).x0,
                               rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 1), (2, 3, 2), (5, 2, 3, 3)])
def test_ddim_with_eta_0_is_a_deterministic_map_of_xT(shape):
    """eta = 0: the same x_T gives the same samples whatever the generator, and no noise is drawn;
    eta > 0 draws noise, so two generators differ; without x_T the first draw is x_T."""
    event_dims = 3 if len(shape) == 4 else 1
    s = make_schedule("cosine", 10)
    model = ReverseProcess(_smooth_net(s, "v", event_dims), s, prediction="v",
                           event_dims=event_dims)
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = g1.get_state()
    a = ddim_sample(model, shape, eta=0.0, xT=xT, generator=g1, return_trajectory=True)
    b = ddim_sample(model, shape, eta=0.0, xT=xT, generator=g2)
    assert torch.equal(a.x0, b.x0) and torch.equal(g1.get_state(), state)
    assert a.trajectory.shape == (11,) + shape and torch.equal(a.trajectory[-1], xT)
    assert torch.equal(a.trajectory[0], a.x0)
    noisy = [ddim_sample(model, shape, eta=0.5, xT=xT, generator=g).x0 for g in (g1, g2)]
    assert not torch.equal(noisy[0], noisy[1])
    drawn = ddim_sample(model, shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(drawn.x0, a.x0)
    with pytest.raises(ValueError, match="xT has shape"):
        ddim_sample(model, shape, xT=xT[:1])


@pytest.mark.parametrize("event_dims", (1, 3))
def test_ddim_last_step_clipping_and_discretized_decoder(event_dims):
    """The last step returns x0_hat: clipped to [-c, c] under clip_x0, and for a discretized decoder
    rounded to its K levels (where ancestral sampling's decoder draws lie)."""
    K = 17
    s = make_schedule("cosine", 10)
    event = (2,) if event_dims == 1 else (1, 2, 2)
    net = _smooth_net(s, "eps", event_dims)  # x0_hat up to 1.6 in size
    clipped = ReverseProcess(net, s, prediction="eps", clip_x0=0.5, event_dims=event_dims)
    x = sample(clipped, 300, event_shape=event, sampler="ddim",
               generator=torch.Generator().manual_seed(0)).x0
    assert x.abs().max() <= 0.5 and (x.abs() == 0.5).any()
    disc = ReverseProcess(net, s, prediction="eps", clip_x0=1.0, decoder="discretized",
                          num_levels=K, event_dims=event_dims)
    out = sample(disc, 300, event_shape=event, sampler="ddim", eta=1.0, return_trajectory=True,
                 generator=torch.Generator().manual_seed(0))
    k = (out.x0 + 1) * (K - 1) / 2
    assert ((k - k.round()).abs() <= 1e-12).all()
    x0_hat = disc.output(out.trajectory[1], torch.ones(300, dtype=torch.long)).x0
    assert torch.equal(out.x0, quantize(x0_hat, K))
    assert torch.isfinite(disc.decoder(out.trajectory[1]).log_prob(out.x0)).all()


def test_sampler_and_eta_are_checked():
    s = make_schedule("cosine", 10)
    model = ReverseProcess(_smooth_net(s, "x0"), s, prediction="x0")
    for K in (None, 10, 3, 1):
        out = sample(model, 4, sampling_timesteps=K, event_shape=(2,), sampler="ddim",
                     return_trajectory=True, dtype=torch.float32)
        assert out.x0.dtype == torch.float32 and out.trajectory.shape == ((K or 10) + 1, 4, 2)
    assert SAMPLING_METHODS == ("ddpm", "ddim")
    for kwargs, match in [(dict(sampler="ddim_fast"), "unknown sampler 'ddim_fast'; valid: ddpm, ddim"),
                          (dict(sampler="ddpm", eta=0.0), "eta applies to the ddim sampler"),
                          (dict(sampler="ddim", eta=-1.0), "finite number >= 0"),
                          (dict(sampler="ddim", eta=float("nan")), "finite number >= 0"),
                          (dict(sampler="ddim", eta=float("inf")), "finite number >= 0"),
                          (dict(sampler="ddim", eta=50.0), "eta must be at most")]:
        with pytest.raises(ValueError, match=match):
            sample(model, 4, event_shape=(2,), **kwargs)
    # eta above 1 is allowed where sigma_t^2 <= 1 - alpha_bar_{t-1} at every step
    assert torch.isfinite(sample(model, 4, event_shape=(2,), sampler="ddim", eta=1.0001).x0).all()
