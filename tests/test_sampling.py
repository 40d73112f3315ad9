"""Ancestral sampling: with the Bayes-optimal denoiser the samples have the data's moments.

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
from pdiff.sampling import ancestral_sample, sample
from pdiff.schedules import make_schedule
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
