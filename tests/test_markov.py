"""The Pyro model and guides over the whole chain: their ELBOs are the bound's estimators.

TraceMeanField_ELBO with the posterior guide is exactly -(L_T + sum_t L_{t-1} + L_0) at the
guide's draws; Trace_ELBO with the forward guide is exactly the trajectory estimator at the guide's
trajectory. Both are checked by replaying a traced guide, in expectation, and by training with SVI.
"""
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

import pdiff.elbo
from pdiff import markov
from pdiff.data.toy import mixture1d
from pdiff.distributions import quantize
from pdiff.distributions.reverse import ReverseProcess
from pdiff.elbo import full_bound, prior_term, step_term, trajectory_bound
from pdiff.nets import MLPDenoiser
from pdiff.schedules import make_schedule
from tests.stats import assert_within_stderr


@pytest.fixture(autouse=True)
def _clear_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_mlp(dim, T, out_multiplier=1, seed=0):
    """An MLPDenoiser with a non-zero last layer, so the chain's terms depend on the network."""
    torch.manual_seed(seed)
    net = MLPDenoiser(dim, T, hidden=32, depth=2, out_multiplier=out_multiplier)
    torch.nn.init.normal_(net.head.weight, std=0.3)
    return net


CONFIGS = {
    "eps-fixed_small": dict(prediction="eps", variance="fixed_small"),
    "x0-fixed_large": dict(prediction="x0", variance="fixed_large", decoder_variance="beta1"),
    "mean-learned_range": dict(prediction="mean", variance="learned_range"),
    "eps-learned-discretized": dict(prediction="eps", variance="learned", decoder="discretized",
                                    num_levels=17),
}


def process_and_data(config, T=8, N=16, D=2):
    kwargs = CONFIGS[config]
    learned = kwargs["variance"].startswith("learned")
    p = ReverseProcess(random_mlp(D, T, 2 if learned else 1), make_schedule("cosine", T), **kwargs)
    x0 = torch.randn(N, D, generator=gen(1)) * 0.5
    if kwargs.get("decoder") == "discretized":
        x0 = quantize(x0, 17)
    return p, x0


def chain_values(trace, T):
    """{t: x_t} for t = 1..T from a traced guide."""
    return {t: trace.nodes[f"x_{t}"]["value"] for t in range(1, T + 1)}


def bound_at(p, x0, x):
    """L_T + sum_{t=1}^T (term of step t at the given x_t), summed over the batch."""
    N = x0.shape[0]
    terms = [step_term(p, x0, x[t], torch.full((N,), t)) for t in range(1, p.num_timesteps + 1)]
    return (prior_term(p, x0) + sum(terms)).sum()


def assert_same_gradients(loss, want, net):
    params = list(net.parameters())
    for a, b in zip(torch.autograd.grad(loss, params, retain_graph=True),
                    torch.autograd.grad(want, params, retain_graph=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
def test_mean_field_elbo_is_the_bound_at_the_guides_draws(config):
    T, N = 8, 16
    p, x0 = process_and_data(config, T, N)
    guide_trace = poutine.trace(markov.posterior_guide).get_trace(p, x0)
    replayed = poutine.replay(markov.posterior_guide, trace=guide_trace)
    loss = TraceMeanField_ELBO().differentiable_loss(markov.model, replayed, p, x0)
    x = chain_values(guide_trace, T)
    want = bound_at(p, x0, x)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=0)
    assert_same_gradients(loss, want, p.net)
    # The same under a common seed instead of a replay: the guide's draws come first.
    pyro.set_rng_seed(7)
    loss = TraceMeanField_ELBO().differentiable_loss(markov.model, markov.posterior_guide, p, x0)
    pyro.set_rng_seed(7)
    x = chain_values(poutine.trace(markov.posterior_guide).get_trace(p, x0), T)
    torch.testing.assert_close(loss, bound_at(p, x0, x), rtol=1e-9, atol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_trace_elbo_with_forward_guide_is_the_trajectory_estimator(config, monkeypatch):
    """Replayed on one trajectory, Trace_ELBO's loss is trajectory_bound at that trajectory."""
    T, N = 8, 16
    p, x0 = process_and_data(config, T, N)
    guide_trace = poutine.trace(markov.forward_guide).get_trace(p, x0)
    replayed = poutine.replay(markov.forward_guide, trace=guide_trace)
    loss = Trace_ELBO().differentiable_loss(markov.model, replayed, p, x0)
    x = chain_values(guide_trace, T)
    trajectory = torch.stack([x[t] for t in range(1, T + 1)], dim=1)  # (N, T, D), index t-1 is x_t
    monkeypatch.setattr(pdiff.elbo.ForwardChain, "rsample",
                        lambda self, sample_shape=torch.Size(), generator=None: trajectory)
    want = trajectory_bound(p, x0).sum()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=0)
    assert_same_gradients(loss, want, p.net)


def test_elbos_match_the_bound_estimators_in_expectation():
    """Over R independent draws on a fixed batch: mean Trace_ELBO loss (forward guide) = mean
    trajectory_bound sum, and mean TraceMeanField loss (posterior guide) = mean full_bound sum."""
    T, N, R = 8, 32, 100
    p, x0 = process_and_data("eps-fixed_small", T, N)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        pairs = {
            "trajectory": (
                [Trace_ELBO().loss(markov.model, markov.forward_guide, p, x0) for _ in range(R)],
                [trajectory_bound(p, x0, generator=gen(100 + r)).sum() for r in range(R)]),
            "mean-field": (
                [TraceMeanField_ELBO().loss(markov.model, markov.posterior_guide, p, x0)
                 for _ in range(R)],
                [full_bound(p, x0, generator=gen(1000 + r)).total.sum() for r in range(R)]),
        }
    for label, (elbo, bound) in pairs.items():
        elbo, bound = torch.tensor(elbo, dtype=torch.float64), torch.stack(bound)
        se = math.sqrt(elbo.var() / R + bound.var() / R)
        assert_within_stderr(elbo.mean(), bound.mean(), se)


@pytest.mark.parametrize("elbo,guide", [(TraceMeanField_ELBO, markov.posterior_guide),
                                        (Trace_ELBO, markov.forward_guide)])
def test_svi_trains_the_denoiser(elbo, guide):
    """200 SVI steps on mixture1d (T = 10) lower the full bound on a fixed test set, by more than 5
    standard errors of the paired per-example difference (same test draws before and after)."""
    T = 10
    torch.manual_seed(0)
    net = MLPDenoiser(1, T, hidden=64, depth=2)
    p = ReverseProcess(net, make_schedule("cosine", T), prediction="eps", variance="fixed_large")
    data = mixture1d()
    x_test = data.sample((2000,), generator=gen(2))
    before = full_bound(p, x_test, generator=gen(3)).total
    svi = SVI(markov.model, guide, pyro.optim.Adam({"lr": 3e-3}), loss=elbo())
    batches = gen(4)
    losses = [svi.step(p, data.sample((128,), generator=batches)) for _ in range(200)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) < sum(losses[:20])
    after = full_bound(p, x_test, generator=gen(3)).total
    d = before - after
    assert d.mean() > 5 * d.std() / math.sqrt(len(d)), (before.mean().item(), after.mean().item())


# -- the whole chain as one site -------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_trace_elbo_with_chain_sites_is_the_trajectory_estimator(config, monkeypatch):
    """chain_model/chain_guide: replayed on one trajectory, Trace_ELBO's loss and its gradient are
    trajectory_bound's at that trajectory, as with the per-step sites."""
    T, N = 8, 16
    p, x0 = process_and_data(config, T, N)
    guide_trace = poutine.trace(markov.chain_guide).get_trace(p, x0)
    trajectory = guide_trace.nodes[markov.TRAJECTORY]["value"]
    assert trajectory.shape == (N, T) + x0.shape[1:]
    replayed = poutine.replay(markov.chain_guide, trace=guide_trace)
    loss = Trace_ELBO().differentiable_loss(markov.chain_model, replayed, p, x0)
    monkeypatch.setattr(pdiff.elbo.ForwardChain, "rsample",
                        lambda self, sample_shape=torch.Size(), generator=None: trajectory)
    want = trajectory_bound(p, x0).sum()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=0)
    assert_same_gradients(loss, want, p.net)


@pytest.mark.parametrize("config", CONFIGS)
def test_reverse_chain_log_prob_is_the_sum_of_the_model_sites(config):
    """ReverseChain.log_prob = log p(x_T) + sum_{t>=2} log p_theta(x_{t-1} | x_t), the latent
    sites of the per-step model at the same values; its samples have the trajectory's shape."""
    T, N = 8, 6
    p, x0 = process_and_data(config, T, N)
    chain = markov.ReverseChain(p, x0)
    assert chain.batch_shape == (N,) and chain.event_shape == (T,) + x0.shape[1:]
    pyro.set_rng_seed(4)
    trajectory = chain.sample()
    assert trajectory.shape == (N, T) + x0.shape[1:]
    steps = {f"x_{t}": trajectory[:, t - 1] for t in range(1, T + 1)}
    tr = poutine.trace(poutine.condition(markov.model, data=steps)).get_trace(p, x0)
    want = sum(tr.nodes[f"x_{t}"]["fn"].log_prob(steps[f"x_{t}"]) for t in range(1, T + 1))
    torch.testing.assert_close(chain.log_prob(trajectory), want, rtol=1e-10, atol=1e-10)
    wide = chain.expand((3, N))
    assert wide.batch_shape == (3, N)
    torch.testing.assert_close(wide.log_prob(trajectory.expand((3,) + trajectory.shape))[1],
                               want, rtol=1e-10, atol=1e-10)


def test_svi_trains_through_the_chain_sites():
    T = 10
    torch.manual_seed(0)
    net = MLPDenoiser(1, T, hidden=64, depth=2)
    p = ReverseProcess(net, make_schedule("cosine", T), prediction="eps", variance="fixed_large")
    data = mixture1d()
    x_test = data.sample((2000,), generator=gen(2))
    before = full_bound(p, x_test, generator=gen(3)).total
    svi = SVI(markov.chain_model, markov.chain_guide, pyro.optim.Adam({"lr": 3e-3}),
              loss=Trace_ELBO())
    batches = gen(4)
    losses = [svi.step(p, data.sample((128,), generator=batches)) for _ in range(200)]
    assert all(math.isfinite(v) for v in losses)
    after = full_bound(p, x_test, generator=gen(3)).total
    d = before - after
    assert d.mean() > 5 * d.std() / math.sqrt(len(d)), (before.mean().item(), after.mean().item())
