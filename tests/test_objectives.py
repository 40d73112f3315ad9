"""Training objectives and timestep samplers.

Every prediction, variance and objective trains a small MLP on mixture1d to a lower full bound
(paired per example on a fixed test set with fixed draws, by more than 5 standard errors); the
importance sampler follows Nichol & Dhariwal sec. 3.3 and its weights keep the estimator unbiased;
the hybrid loss's bound term trains only the variance.
"""
import math

import pytest
import torch

from pdiff.data.toy import mixture1d
from pdiff.distributions import VARIANCES
from pdiff.distributions.reverse import ReverseProcess
from pdiff.elbo import full_bound, step_term
from pdiff.nets import MeanVarianceNets, MLPDenoiser
from pdiff.objectives import (LOSSES, OBJECTIVES, SAMPLERS, ImportanceSampler, UniformSampler,
                              get_objective, hybrid_loss, make_sampler, simple_loss, vlb_loss)
from pdiff.parameterization import (PREDICTIONS, eps_from_x0, posterior_mean, v_from_x0,
                                    v_from_x0_eps, xt_from_x0)
from pdiff.schedules import make_schedule
from tests.stats import Z, assert_within_stderr

T = 20


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_process(prediction="eps", variance="fixed_large", seed=0, hidden=64):
    torch.manual_seed(seed)
    if variance == "learned_softplus":
        net = MeanVarianceNets(MLPDenoiser(1, T, hidden=hidden, depth=2),
                               MLPDenoiser(1, T, hidden=hidden, depth=2))
    else:
        multiplier = 2 if variance in ("learned", "learned_range") else 1
        net = MLPDenoiser(1, T, hidden=hidden, depth=2, out_multiplier=multiplier)
    return ReverseProcess(net, make_schedule("cosine", T), prediction=prediction, variance=variance)


def assert_training_lowers_bound(p, objective, sampler_name="uniform", steps=300, lr=2e-3):
    """Adam on batches of 128 from mixture1d; the full bound on 2000 test points (fixed draws)
    must fall by more than Z standard errors of the paired per-example difference."""
    data = mixture1d()
    x_test = data.sample((2000,), generator=gen(1))
    before = full_bound(p, x_test, generator=gen(2)).total
    loss_fn, sampler = get_objective(objective), make_sampler(sampler_name, T)
    opt = torch.optim.Adam(p.net.parameters(), lr=lr)
    batches = gen(3)
    for _ in range(steps):
        out = loss_fn(p, data.sample((128,), generator=batches), sampler=sampler, generator=batches)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
        if out.term is not None:
            sampler.update(out.t, out.term)
    after = full_bound(p, x_test, generator=gen(2)).total
    d = before - after
    assert torch.isfinite(after).all()
    assert d.mean() > Z * d.std() / math.sqrt(len(d)), (before.mean().item(), after.mean().item())
    return sampler


# -- every option value trains ---------------------------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_prediction_trains_with_vlb(prediction):
    assert_training_lowers_bound(make_process(prediction, "fixed_large"), "vlb")


@pytest.mark.parametrize("prediction", ("eps", "v"))
@pytest.mark.parametrize("variance", VARIANCES)
def test_each_variance_trains_with_vlb(variance, prediction):
    assert_training_lowers_bound(make_process(prediction, variance), "vlb")


@pytest.mark.parametrize("objective,variance", [("simple", "fixed_large"),
                                                ("hybrid", "learned_range")])
def test_v_prediction_trains_with_simple_and_hybrid(objective, variance):
    assert_training_lowers_bound(make_process("v", variance), objective)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_simple_regresses_on_what_the_network_predicts(prediction):
    """L_simple's target is the true eps, x0, mean or v of the draw (same t and x_t), and under v it
    is the x0 loss weighted by SNR_t + 1 (Salimans & Ho 2022): with nets whose x0_hat is the same,
    ||v - v_hat||^2 = (1 + SNR_t) ||x0 - x0_hat||^2."""
    s = make_schedule("cosine", T)
    x0 = mixture1d().sample((256,), generator=gen(30))

    def x0_hat(xt, t):
        return torch.tanh(xt) * (1 + t[:, None] / T)

    def net(xt, t):
        return {"x0": x0_hat(xt, t), "eps": eps_from_x0(s, xt, t, x0_hat(xt, t), 1),
                "v": v_from_x0(s, xt, t, x0_hat(xt, t), 1),
                "mean": posterior_mean(s, x0_hat(xt, t), xt, t, 1)}[prediction]
    loss = {}
    for name in (prediction, "x0"):
        p = ReverseProcess(lambda xt, t: net(xt, t) if name == prediction else x0_hat(xt, t), s,
                           prediction=name)
        loss[name] = simple_loss(p, x0, sampler=UniformSampler(T), generator=gen(31))
    # the same draws as simple_loss makes: t, then eps
    g = gen(31)
    t, _ = UniformSampler(T).sample(256, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt = xt_from_x0(s, x0, t, eps, 1)
    target = {"x0": x0, "eps": eps, "v": v_from_x0_eps(s, x0, t, eps, 1),
              "mean": posterior_mean(s, x0, xt, t, 1)}[prediction]
    out = loss[prediction]
    assert torch.equal(out.t, t)
    torch.testing.assert_close(out.loss, ((net(xt, t) - target) ** 2).mean(-1), rtol=1e-12,
                               atol=1e-15)
    if prediction == "v":
        snr = s.snr[t]
        torch.testing.assert_close(out.loss, (1 + snr) * loss["x0"].loss, rtol=1e-9, atol=0)


@pytest.mark.parametrize("objective,variance,sampler", [
    ("simple", "fixed_large", "uniform"),  # simple does not train a learned variance
    ("vlb", "learned_range", "importance"),
    ("hybrid", "learned_range", "uniform"),
    ("hybrid", "learned_range", "importance"),
    ("trajectory", "learned_range", "uniform"),
])
def test_each_objective_trains(objective, variance, sampler):
    s = assert_training_lowers_bound(make_process("eps", variance), objective, sampler)
    if sampler == "importance":
        assert s.warmed_up()  # 300 x 128 draws fill every step's history: p_t was not uniform


def test_objective_names():
    assert set(OBJECTIVES) == set(LOSSES)
    for name in OBJECTIVES:
        assert get_objective(name) is LOSSES[name]
    assert SAMPLERS == ("uniform", "importance")
    assert type(make_sampler("uniform", T)) is UniformSampler
    assert type(make_sampler("importance", T)) is ImportanceSampler
    with pytest.raises(ValueError, match="valid: simple, vlb, hybrid, trajectory, elbo, snr, "
                                         "min_snr, p2, edm, continuous"):
        get_objective("loss-aware")
    with pytest.raises(ValueError, match="valid: uniform, importance"):
        make_sampler("loss-aware", T)


def test_losses_are_per_example():
    p, x0 = make_process("eps", "learned_range"), mixture1d().sample((9,), generator=gen(4))
    for name in OBJECTIVES:
        out = get_objective(name)(p, x0, sampler=UniformSampler(T), generator=gen(5))
        assert out.loss.shape == (9,), name
        # the trajectory and the continuous-time bound draw no single discrete step t
        assert (out.t is None) == (name in ("trajectory", "continuous"))


# -- the importance sampler -------------------------------------------------------------------

def test_importance_sampler_uniform_until_every_step_has_its_history():
    sampler = ImportanceSampler(5, history=10)
    uniform = torch.full((5,), 0.2, dtype=torch.float64)
    values = torch.rand(10, 5, generator=gen(6)) * 3
    steps = torch.arange(1, 6)
    for k in range(9):
        sampler.update(steps, values[k])
    sampler.update(steps[:4], values[9, :4])  # t = 5 still has only 9 values
    assert not sampler.warmed_up()
    torch.testing.assert_close(sampler.probs(), uniform, rtol=0, atol=0)
    t, w = sampler.sample(1000, generator=gen(7))
    torch.testing.assert_close(w, torch.ones(1000), rtol=0, atol=0)
    sampler.update(steps[4:], values[9, 4:])
    assert sampler.warmed_up()
    rms = values.pow(2).mean(0).sqrt()
    want = 0.999 * rms / rms.sum() + 0.001 / 5
    torch.testing.assert_close(sampler.probs(), want, rtol=1e-12, atol=0)
    assert sampler.probs().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_importance_sampler_keeps_the_last_values_of_each_step():
    sampler = ImportanceSampler(3, history=10)
    values = torch.randn(25, 3, generator=gen(8)) * torch.tensor([1.0, 5.0, 0.1])
    for k in range(25):
        sampler.update(torch.tensor([3, 1, 2]), values[k, [2, 0, 1]])  # any order of steps
    rms = values[-10:].pow(2).mean(0).sqrt()
    torch.testing.assert_close(sampler.probs(), 0.999 * rms / rms.sum() + 0.001 / 3)
    clone = ImportanceSampler(3, history=10)
    clone.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(clone.probs(), sampler.probs(), rtol=0, atol=0)


def test_importance_weights_make_the_estimator_unbiased():
    """With w_t = 1 / (T p_t): sum_t p_t T w_t L_t = sum_t L_t exactly, and the sample mean of
    T w_t L_t over t ~ p estimates it within standard errors; t is drawn with probabilities p."""
    n = 200_000
    terms = torch.tensor([3.0, -1.0, 0.5, 0.2, 0.05, 2.0], dtype=torch.float64)
    K = len(terms)
    sampler = ImportanceSampler(K)
    history = terms * (1 + 0.1 * torch.randn(10, K, generator=gen(9)))
    for row in history:
        sampler.update(torch.arange(1, K + 1), row)
    p = sampler.probs()
    assert p.max() / p.min() > 10
    t, w = sampler.sample(n, generator=gen(10))
    torch.testing.assert_close(w, 1 / (K * p[t - 1]), rtol=1e-12, atol=0)
    torch.testing.assert_close((p * K * (1 / (K * p)) * terms).sum(), terms.sum())
    est = K * w * terms[t - 1]
    assert_within_stderr(est.mean(), terms.sum(), est.std() / math.sqrt(n))
    freq = torch.bincount(t - 1, minlength=K).double() / n
    assert_within_stderr(freq, p, (p * (1 - p) / n).sqrt())


# -- hybrid: the bound term trains only the variance -------------------------------------------

def randomize(net, seed):
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, MLPDenoiser):
            torch.nn.init.normal_(module.head.weight, std=0.3)


def grads(module):
    return [None if q.grad is None else q.grad.clone() for q in module.parameters()]


@pytest.mark.parametrize("variance", ["learned", "learned_range", "learned_softplus"])
def test_hybrid_bound_term_gives_no_gradient_to_the_mean(variance):
    """Two nets: the mean net's gradients under hybrid equal those under simple alone (same t and
    x_t draws); the variance net gets gradients only from the bound term."""
    x0 = mixture1d().sample((256,), generator=gen(11))
    torch.manual_seed(0)
    net = MeanVarianceNets(MLPDenoiser(1, T, hidden=32, depth=2),
                           MLPDenoiser(1, T, hidden=32, depth=2))
    randomize(net, 1)
    p = ReverseProcess(net, make_schedule("cosine", T), prediction="eps", variance=variance)
    results = {}
    for name, loss_fn in (("simple", simple_loss), ("hybrid", hybrid_loss), ("vlb", vlb_loss)):
        net.zero_grad(set_to_none=True)
        out = loss_fn(p, x0, sampler=UniformSampler(T), generator=gen(12))
        out.loss.mean().backward()
        results[name] = out, grads(net.mean_net), grads(net.variance_net)
    simple, mean_simple, var_simple = results["simple"]
    hybrid, mean_hybrid, var_hybrid = results["hybrid"]
    for a, b in zip(mean_simple, mean_hybrid):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
    assert all(g is None for g in var_simple)
    assert any(g is not None and g.abs().sum() > 0 for g in var_hybrid)
    # The check has teeth: without the detach the bound's gradient reaches the mean net.
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(results["vlb"][1], mean_simple))
    # The hybrid loss is simple + 0.001 T L_t / (D ln 2) (uniform t, so w = 1).
    torch.testing.assert_close(hybrid.t, simple.t)
    torch.testing.assert_close(hybrid.loss - simple.loss, 0.001 * T * hybrid.term / math.log(2))


def test_hybrid_detach_with_one_net_and_doubled_output():
    """One net with 2 D outputs: the head's mean rows get the same gradient as under simple."""
    p = make_process("eps", "learned_range", hidden=32)
    randomize(p.net, 2)
    x0 = mixture1d().sample((256,), generator=gen(13))
    head = {}
    for name, loss_fn in (("simple", simple_loss), ("hybrid", hybrid_loss)):
        p.net.zero_grad(set_to_none=True)
        loss_fn(p, x0, sampler=UniformSampler(T), generator=gen(14)).loss.mean().backward()
        head[name] = p.net.head.weight.grad.clone(), p.net.head.bias.grad.clone()
    for a, b in zip(head["simple"], head["hybrid"]):
        torch.testing.assert_close(b[:1], a[:1], rtol=1e-12, atol=1e-15)  # mean rows
        assert a[1:].abs().max() == 0 and b[1:].abs().max() > 0  # variance rows


def test_step_term_detach_mean_changes_gradients_not_values():
    p = make_process("x0", "learned_range", hidden=32)
    randomize(p.net, 3)
    x0 = mixture1d().sample((64,), generator=gen(15))
    t = torch.randint(1, T + 1, (64,), generator=gen(16))
    xt = x0 + 0.3 * torch.randn(64, 1, generator=gen(17))
    torch.testing.assert_close(step_term(p, x0, xt, t, detach_mean=True), step_term(p, x0, xt, t))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_hybrid_with_a_fixed_variance_trains_exactly_as_simple(variance):
    """With sigma fixed and mu detached, the hybrid bound term has no parameter left: ten AdamW
    steps from the same start with the same draws give identical weights (and the loss values
    still differ, so the two objectives are not the same function)."""
    data = mixture1d().sample((512,), generator=gen(3)).float()
    weights, losses = [], []
    for loss_fn in (simple_loss, hybrid_loss):
        p = make_process(variance=variance, seed=4)
        p.net.float()
        opt = torch.optim.AdamW(p.net.parameters(), lr=1e-2)
        g, sampler = gen(5), UniformSampler(T)
        for i in range(10):
            loss = loss_fn(p, data[64 * (i % 8): 64 * (i % 8 + 1)], sampler=sampler,
                           generator=g).loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append(torch.cat([q.detach().flatten() for q in p.net.parameters()]))
        losses.append(loss.item())
    assert torch.equal(weights[0], weights[1])
    assert losses[0] != losses[1]


# -- the samplers' vectorized paths against their definitions --------------------------------

def loop_update(values, counts, t, term, history):
    """The definition of ImportanceSampler.update, one entry at a time: each step keeps its last
    ``history`` values, oldest first (the reference the vectorized update must reproduce)."""
    values, counts = values.clone(), counts.clone()
    for step, value in zip(t.tolist(), term.double().tolist()):
        i = step - 1
        if counts[i] >= history:
            values[i] = torch.roll(values[i], -1)
            values[i, -1] = value
        else:
            values[i, counts[i]] = value
            counts[i] += 1
    return values, counts


@pytest.mark.parametrize("num_timesteps,history,batch", [(5, 3, 1), (5, 3, 4), (7, 4, 40),
                                                         (3, 10, 64), (50, 10, 256)])
def test_importance_update_matches_the_one_at_a_time_definition(num_timesteps, history, batch):
    """Batches with repeated steps, several entries of one step in one batch (more than the
    history holds, so the oldest fall out within the batch), any order, partly filled histories."""
    sampler = ImportanceSampler(num_timesteps, history=history)
    values, counts = sampler.values.clone(), sampler.counts.clone()
    g = gen(20)
    for _ in range(12):
        high = int(torch.randint(1, num_timesteps + 1, (), generator=g))  # uneven coverage
        t = torch.randint(1, high + 1, (batch,), generator=g)
        term = torch.randn(batch, generator=g)
        sampler.update(t, term)
        values, counts = loop_update(values, counts, t, term, history)
        assert torch.equal(sampler.counts, counts)
        assert torch.equal(sampler.values, values)
    clone = ImportanceSampler(num_timesteps, history=history)
    clone.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(clone.probs(), sampler.probs(), rtol=0, atol=0)


def test_uniform_sampler_draws_every_step_equally_with_weight_one():
    n, K = 200_000, 7
    t, w = UniformSampler(K).sample(n, generator=gen(21))
    assert t.dtype == torch.long and int(t.min()) == 1 and int(t.max()) == K
    assert torch.equal(w, torch.ones(n))
    freq = torch.bincount(t - 1, minlength=K).double() / n
    p = torch.full((K,), 1 / K, dtype=torch.float64)
    assert_within_stderr(freq, p, (p * (1 - p) / n).sqrt())
