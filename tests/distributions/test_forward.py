"""The forward process q: closed form against iteration, the posterior against Bayes' rule, shapes."""
import pytest
import torch

from pdiff.distributions import DiagNormal, ForwardChain, q_marginal, q_posterior, q_step
from pdiff.schedules import SCHEDULES, make_schedule
from tests.stats import assert_within_stderr

EPS = torch.finfo(torch.float64).eps
SHAPES = [(), (4,), (2, 3)]
EVENTS = {1: (3,), 3: (2, 2, 3)}


def _moments(x, dim=0):
    """Sample mean and variance along ``dim`` with their standard errors.

    The variance's standard error uses the sample fourth central moment,
    se^2 = (m4 - var^2) / n, valid for any distribution with a finite fourth moment.
    """
    n = x.shape[dim]
    mean = x.mean(dim)
    c = x - mean.unsqueeze(dim)
    var = c.pow(2).mean(dim)
    m4 = c.pow(4).mean(dim)
    return mean, (var / n).sqrt(), var, ((m4 - var**2) / n).clamp_min(0).sqrt()


@pytest.mark.parametrize("shape", SHAPES)
def test_marginal_matches_iterated_steps_by_monte_carlo(shape):
    s = make_schedule("cosine", 10)
    x0 = torch.randn(shape + (2,))
    n = 200_000
    x = x0.expand((n,) + x0.shape)
    for t in range(1, 6):
        x = q_step(s, x, t).sample()
        q = q_marginal(s, x0, t)
        mean, mean_se, var, var_se = _moments(x)
        assert_within_stderr(mean, q.mean, mean_se)
        assert_within_stderr(var, q.variance, var_se)


@pytest.mark.parametrize("name", SCHEDULES)
def test_marginal_is_the_composition_of_steps_exactly(name):
    """Composing Gaussians: m_t = sqrt(alpha_t) m_{t-1}, v_t = alpha_t v_{t-1} + beta_t, from (x0, 0)."""
    T = 1000
    s = make_schedule(name, T, warn=False)
    x0 = torch.randn(4, 3)
    m, v = x0.clone(), torch.zeros(())
    means, variances = [], []
    for t in range(1, T + 1):
        # q_step's own parameters drive the recursion, so this checks q_step and q_marginal agree.
        step = q_step(s, torch.ones(1), t)
        m = step.mean * m
        v = step.mean.pow(2) * v + step.variance
        means.append(m)
        variances.append(v.expand_as(m))
    t = torch.arange(1, T + 1)
    q = q_marginal(s, x0.expand(T, 4, 3).transpose(0, 1), t.expand(4, T))  # batch (4, T)
    torch.testing.assert_close(q.mean.transpose(0, 1), torch.stack(means), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.variance.transpose(0, 1), torch.stack(variances), rtol=0, atol=1e-12)


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_is_bayes_rule(name, shape, event_dims):
    """log q(x_{t-1}|x_t,x_0) = log q(x_t|x_{t-1}) + log q(x_{t-1}|x_0) - log q(x_t|x_0)."""
    T = 1000
    s = make_schedule(name, T, warn=False)
    x0 = torch.randn(shape + EVENTS[event_dims])
    x_prev = torch.randn_like(x0)
    xt = torch.randn_like(x0)
    t = torch.randint(2, T + 1, shape)
    t.view(-1)[0] = 2
    t.view(-1)[-1] = T
    d = event_dims
    lhs = q_posterior(s, x0, xt, t, event_dims=d).log_prob(x_prev)
    terms = (q_step(s, x_prev, t, event_dims=d).log_prob(xt),
             q_marginal(s, x0, t - 1, event_dims=d).log_prob(x_prev),
             -q_marginal(s, x0, t, event_dims=d).log_prob(xt))
    rhs = sum(terms)
    assert lhs.shape == rhs.shape == shape
    # Exact up to round-off: each term is a sum of quadratic forms with relative error ~eps,
    # except that 1 - alpha_bar_{t-1} (in beta_tilde and in q(x_{t-1}|x_0)) is computed with
    # relative error ~eps / (1 - alpha_bar_{t-1}); at t = 2 that is eps / beta_1, large for
    # schedules with a tiny beta_1 (polynomial: ~2e-6). Measured errors stay below 16x this bound.
    scale = lhs.abs() + sum(term.abs() for term in terms)
    tol = 1e-10 + 128 * EPS * scale / (1 - s.alpha_bar[t - 1])
    assert ((lhs - rhs).abs() <= tol).all(), (lhs - rhs).abs().max()


def test_posterior_refuses_t1_and_out_of_range():
    s = make_schedule("linear", 10)
    x = torch.zeros(3, 2)
    for t in (1, torch.tensor([2, 1, 3]), 0, 11):
        with pytest.raises(ValueError):
            q_posterior(s, x, x, t)


@pytest.mark.parametrize("t_shape", ("scalar", "batch"))
@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(shape, event_dims, t_shape):
    s = make_schedule("cosine", 10)
    event = EVENTS[event_dims]
    x = torch.randn(shape + event)
    t = torch.tensor(3) if t_shape == "scalar" else torch.randint(2, 11, shape)
    for q in (q_step(s, x, t, event_dims=event_dims), q_marginal(s, x, t, event_dims=event_dims),
              q_posterior(s, x, x, t, event_dims=event_dims)):
        assert q.batch_shape == shape and q.event_shape == event
        assert q.log_prob(x).shape == shape
        assert q.sample((5,)).shape == (5,) + shape + event


def test_step_parameters():
    s = make_schedule("linear", 100)
    x = torch.randn(4, 3)
    t = torch.tensor([1, 20, 50, 100])
    q = q_step(s, x, t)
    torch.testing.assert_close(q.mean, (1 - s.betas[t])[:, None].sqrt() * x)
    torch.testing.assert_close(q.variance, s.betas[t][:, None].expand(4, 3))
    assert isinstance(q, DiagNormal) and q.batch_shape == (4,) and q.event_shape == (3,)


# -- the whole chain ------------------------------------------------------------------------------

@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
def test_chain_shapes(shape, event_dims):
    s = make_schedule("cosine", 7)
    event = EVENTS[event_dims]
    chain = ForwardChain(s, torch.randn(shape + event), event_dims=event_dims)
    assert chain.batch_shape == shape and chain.event_shape == (7,) + event
    traj = chain.sample((5,))
    assert traj.shape == (5,) + shape + (7,) + event
    assert chain.log_prob(traj).shape == (5,) + shape
    assert chain.rsample().shape == shape + (7,) + event


@pytest.mark.parametrize("shape", SHAPES)
def test_chain_marginals_match_q_marginal(shape):
    s = make_schedule("cosine", 6)
    x0 = torch.randn(shape + (2,))
    n = 100_000
    traj = ForwardChain(s, x0).sample((n,))  # (n,) + shape + (T, 2)
    time_axis = 1 + len(shape)
    for t in range(1, 7):
        xt = traj.select(time_axis, t - 1)
        q = q_marginal(s, x0, t)
        mean, mean_se, var, var_se = _moments(xt)
        assert_within_stderr(mean, q.mean, mean_se)
        assert_within_stderr(var, q.variance, var_se)


def test_chain_consecutive_steps_are_q_step():
    """The covariance of x_{t-1} and x_t is sqrt(alpha_t) Var(x_{t-1}), as q_step says."""
    s = make_schedule("cosine", 4)
    x0 = torch.tensor([0.5, -1.0])
    n = 200_000
    traj = ForwardChain(s, x0).sample((n,))  # (n, T, 2)
    for t in range(2, 5):
        a, b = traj[:, t - 2], traj[:, t - 1]
        prod = (a - a.mean(0)) * (b - b.mean(0))
        target = s.alphas[t].sqrt() * (1 - s.alpha_bar[t - 1])
        assert_within_stderr(prod.mean(0), target.expand(2), prod.std(0) / n**0.5)


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
def test_chain_log_prob_is_sum_of_steps(shape, event_dims):
    T = 5
    s = make_schedule("cosine", T)
    event = EVENTS[event_dims]
    x0 = torch.randn(shape + event)
    chain = ForwardChain(s, x0, event_dims=event_dims)
    traj = chain.sample((3,))
    time_axis = 1 + len(shape)
    total = torch.zeros((3,) + shape)
    x_prev = x0.expand((3,) + x0.shape)
    for t in range(1, T + 1):
        xt = traj.select(time_axis, t - 1)
        total = total + q_step(s, x_prev, t, event_dims=event_dims).log_prob(xt)
        x_prev = xt
    torch.testing.assert_close(chain.log_prob(traj), total, rtol=1e-12, atol=1e-12)


def test_chain_rsample_is_differentiable():
    s = make_schedule("cosine", 3)
    x0 = torch.randn(2, requires_grad=True)
    ForwardChain(s, x0).rsample((4,)).sum().backward()
    # d sum_t x_t / d x0 = 4 sum_t sqrt(alpha_bar_t) per coordinate
    torch.testing.assert_close(x0.grad, 4 * s.alpha_bar[1:].sqrt().sum().expand(2))


@pytest.mark.parametrize("event_dims", (1, 3))
def test_chain_expand(event_dims):
    s = make_schedule("cosine", 4)
    event = EVENTS[event_dims]
    x0 = torch.randn(event)
    chain = ForwardChain(s, x0, event_dims=event_dims)
    big = chain.expand((2, 3))
    assert big.batch_shape == (2, 3) and big.event_shape == chain.event_shape
    traj = big.sample()
    assert traj.shape == (2, 3, 4) + event
    # every batch member has the same x0, so the same log density as the original chain
    torch.testing.assert_close(big.log_prob(traj), torch.stack(
        [chain.log_prob(traj[i, j]) for i in range(2) for j in range(3)]).reshape(2, 3))
    again = ForwardChain(s, torch.randn((3,) + event), event_dims=event_dims).expand((2, 3))
    assert again.batch_shape == (2, 3)


def test_chain_validates_trajectory_shape():
    s = make_schedule("cosine", 4)
    chain = ForwardChain(s, torch.zeros(3, 2))
    with pytest.raises(ValueError):
        chain.log_prob(torch.zeros(3, 5, 2))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("shape", SHAPES)
def test_chain_rsample_is_the_recursion_on_its_noise(name, shape):
    """rsample unrolls x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps_t into one cumulative sum;
    on the same noise (drawn time-major, T x shape) it is the recursion, and it is differentiable
    in x_0 with d x_t / d x_0 = sqrt(alpha_bar_t)."""
    s, T = make_schedule(name, 50), 50
    x0 = torch.randn(shape + (3,), requires_grad=True)
    traj = ForwardChain(s, x0).rsample(generator=torch.Generator().manual_seed(3))
    eps = torch.randn((T,) + x0.shape, generator=torch.Generator().manual_seed(3))
    x, steps = x0, []
    for t in range(1, T + 1):
        x = s.alphas[t].sqrt() * x + s.betas[t].sqrt() * eps[t - 1]
        steps.append(x)
    want = torch.stack(steps, dim=len(shape))
    assert traj.shape == want.shape == shape + (T, 3)
    torch.testing.assert_close(traj, want, rtol=0, atol=1e-12)
    grad, = torch.autograd.grad(traj.select(len(shape), T - 1).sum(), x0)
    torch.testing.assert_close(grad, s.alpha_bar[T].sqrt().expand_as(x0), rtol=1e-12, atol=0)
