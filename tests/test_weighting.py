"""The weighted losses of Kingma & Gao (2023): weights as pure functions of the schedule, and the
objectives built on them.

The fixed_small bound's term is 1/2 Delta_t ||eps - eps_hat||^2 for every prediction; the ``elbo``
objective is that bound (exactly ``vlb`` for fixed_small, draw for draw, and the full bound in
expectation); every weighted loss equals its definition written out independently here, and is the
same function of the implied eps for every prediction; the EDM weights reproduce EDM's log-normal
noise levels (Monte Carlo); the implied weightings have Kingma & Gao's closed forms up to a
discretization error bounded per step; every new objective trains.
"""
import math

import pytest
import torch

from pdiff.data.toy import mixture1d
from pdiff.distributions.reverse import ReverseProcess
from pdiff.elbo import full_bound, step_term
from pdiff.nets import MeanVarianceNets, MLPDenoiser
from pdiff.objectives import (LOSSES, MEAN_ONLY_OBJECTIVES, OBJECTIVES, ImportanceSampler,
                              UniformSampler, elbo_loss, get_objective, simple_loss, vlb_loss)
from pdiff.parameterization import PREDICTIONS, posterior_mean, v_from_x0, x0_from_eps, xt_from_x0
from pdiff.schedules import SCHEDULES, make_schedule
from pdiff.weighting import (OPTIONS, WEIGHTINGS, implied_weighting, log_snr, plot_weightings,
                             reference_value, snr_ratio_minus_one, step_weights, step_weights_like)
from tests.stats import assert_within_stderr
from tests.test_objectives import assert_training_lowers_bound, make_process

T = 20
NEW = ("elbo", "snr", "min_snr", "p2", "edm")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def eps_hat(xt, t):
    """A fixed, imperfect noise prediction (the 'oracle' every parameterization is built from)."""
    return torch.tanh(xt) * (1 + t[..., None] / T) + 0.1 * xt.sum(-1, keepdim=True) / xt.shape[-1]


def process_from_eps_hat(schedule, prediction, variance="fixed_small", event_dims=1):
    """p_theta whose network outputs ``prediction`` so that its implied eps is ``eps_hat``."""
    def net(xt, t):
        t_ = t.reshape(t.shape + (1,) * (event_dims - 1)) if event_dims > 1 else t
        e = eps_hat(xt, t_)
        x0 = x0_from_eps(schedule, xt, t, e, event_dims)
        return {"eps": e, "x0": x0, "v": v_from_x0(schedule, xt, t, x0, event_dims),
                "mean": posterior_mean(schedule, x0, xt, t, event_dims)}[prediction]
    return ReverseProcess(net, schedule, prediction=prediction, variance=variance,
                          event_dims=event_dims)


def same_draws(x0, seed, schedule):
    """(t, eps, x_t) exactly as the objectives draw them: t from the uniform sampler, then eps."""
    g = gen(seed)
    t, _ = UniformSampler(schedule.num_timesteps).sample(x0.shape[0], generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return t, eps, xt_from_x0(schedule, x0, t, eps, 1)


# -- the eps form of the fixed_small bound ----------------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("event_shape", [(1,), (3,), (2, 3)])
def test_fixed_small_term_is_half_delta_times_the_eps_error(prediction, schedule, event_shape):
    """L_{t-1} = KL(q || p_theta) = 1/2 (SNR_{t-1}/SNR_t - 1) ||eps - eps_hat||^2
    for t >= 2 under sigma_t^2 = beta_tilde_t, eps_hat the implied eps of any prediction; and
    Delta_t = beta_t / (alpha_t (1 - alpha_bar_{t-1})), written from the betas."""
    s = make_schedule(schedule, T)
    d = len(event_shape)
    p = process_from_eps_hat(s, prediction, event_dims=d)
    n = 64
    x0 = torch.randn((n,) + event_shape, generator=gen(1))
    t = torch.randint(2, T + 1, (n,), generator=gen(2))
    eps = torch.randn(x0.shape, generator=gen(3))
    xt = xt_from_x0(s, x0, t, eps, d)
    delta = snr_ratio_minus_one(s)
    direct = s.betas / (s.alphas * (1 - s.alpha_bar_prev))
    torch.testing.assert_close(delta[1:], direct[2:], rtol=1e-9, atol=0)
    assert math.isinf(delta[0])
    err = ((eps - p.output(xt, t).eps) ** 2).flatten(1).sum(-1)
    torch.testing.assert_close(step_term(p, x0, xt, t), 0.5 * delta[t - 1] * err, rtol=1e-9,
                               atol=1e-12)


def test_log_snr_matches_the_schedule():
    for name in SCHEDULES:
        s = make_schedule(name, 50, warn=False)
        lam = log_snr(s)
        assert lam[0] == math.inf and bool((lam[1:-1] > lam[2:]).all())  # decreasing in t
        torch.testing.assert_close(lam[1:], torch.log(s.snr[1:]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_elbo_is_vlb_for_fixed_small_draw_for_draw(prediction):
    """Same draws, same per-example values: the eps form is the KL, and t = 1 is the decoder."""
    s = make_schedule("cosine", T)
    p = process_from_eps_hat(s, prediction)
    x0 = mixture1d().sample((500,), generator=gen(4))
    a = elbo_loss(p, x0, sampler=UniformSampler(T), generator=gen(5))
    b = vlb_loss(p, x0, sampler=UniformSampler(T), generator=gen(5))
    assert torch.equal(a.t, b.t) and bool((a.t == 1).any())
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.term, b.term, rtol=1e-9, atol=1e-9)


def test_elbo_mean_is_the_full_bound_for_fixed_small():
    """E_t,eps[elbo loss] = L_T + sum_t L_{t-1} (the full bound, every term drawn once): the paired
    per-example difference has mean 0 within Z standard errors."""
    p = make_process("eps", "fixed_small", seed=3)
    torch.nn.init.normal_(p.net.head.weight, std=0.3)  # not the eps = 0 start: errors vary with t
    x0 = mixture1d().sample((500,), generator=gen(6)).repeat(20, 1)  # 10,000 draws, 500 points
    with torch.no_grad():
        est = elbo_loss(p, x0, sampler=UniformSampler(T), generator=gen(7)).loss
        bound = full_bound(p, x0, generator=gen(8)).total
    d = est - bound
    assert_within_stderr(d.mean(), 0.0, d.std() / math.sqrt(len(d)))


def test_elbo_for_fixed_large_is_the_fixed_small_bound_of_the_same_mean():
    """Its terms t >= 2 do not depend on sigma_t (w = 1 is the beta_tilde bound), and step 1 uses
    the decoder variance both share (beta_1)."""
    s = make_schedule("cosine", T)
    x0 = mixture1d().sample((300,), generator=gen(9))
    small, large = (elbo_loss(process_from_eps_hat(s, "eps", variance), x0,
                              sampler=UniformSampler(T), generator=gen(10)).loss
                    for variance in ("fixed_small", "fixed_large"))
    torch.testing.assert_close(small, large, rtol=0, atol=0)


# -- each loss against its definition ---------------------------------------------------------

def definition(name, s, x0, t, eps, xt, options):
    """Each loss written from its paper's formula, with alpha_bar from the schedule."""
    ab = s.alpha_bar[t][:, None]
    snr = (ab / (1 - ab))[:, 0]
    e = eps_hat(xt, t)
    mse = ((eps - e) ** 2).mean(-1)
    if name == "snr":
        x0_hat = (xt - (1 - ab).sqrt() * e) / ab.sqrt()
        return ((x0 - x0_hat) ** 2).mean(-1)
    if name == "min_snr":
        gamma = options.get("gamma", 5.0)
        return torch.clamp(snr, max=gamma) / snr * mse
    if name == "p2":
        k, gamma = options.get("k", 1.0), options.get("gamma", 1.0)
        return mse / (k + snr) ** gamma
    assert name == "elbo"
    a, b, ab_prev = s.alphas[t], s.betas[t], s.alpha_bar_prev[t]
    diffusion = b / (2 * a * (1 - ab_prev).clamp_min(1e-300)) * ((eps - e) ** 2).sum(-1)
    mean1 = (xt - b[:, None] / (1 - ab).sqrt() * e) / a[:, None].sqrt()  # Ho et al. eq. 11
    nll = -torch.distributions.Normal(mean1, s.betas[1].sqrt()).log_prob(x0).sum(-1)
    ab_T = s.alpha_bar[-1]
    prior = 0.5 * (ab_T * x0**2 - ab_T - torch.log1p(-ab_T)).sum(-1)
    return prior + T * torch.where(t == 1, nll, diffusion)


CASES = [("elbo", {}), ("snr", {}), ("min_snr", {}), ("min_snr", {"gamma": 0.5}), ("p2", {}),
         ("p2", {"k": 0.5, "gamma": 2.0}), ("edm", {}), ("edm", {"sigma_data": 1.0})]


@pytest.mark.parametrize("name,options", CASES)
def test_each_loss_is_the_same_function_of_eps_hat_for_every_prediction(name, options):
    """Nets of every prediction built from one eps_hat give equal losses, on the same draws; and
    the loss equals its definition (EDM's against c_t times the eps-MSE: its weights are checked
    against EDM's sampling below)."""
    s = make_schedule("cosine", T)
    x0 = mixture1d().sample((400,), generator=gen(11))
    t, eps, xt = same_draws(x0, 12, s)
    losses = {}
    for prediction in PREDICTIONS:
        p = process_from_eps_hat(s, prediction)
        out = get_objective(name)(p, x0, sampler=UniformSampler(T), generator=gen(12), **options)
        assert torch.equal(out.t, t)
        losses[prediction] = out.loss
    for prediction in PREDICTIONS:
        torch.testing.assert_close(losses[prediction], losses["eps"], rtol=1e-8, atol=1e-10)
    if name == "edm":
        c = step_weights("edm", s, **options)
        want = c[t - 1] * ((eps - eps_hat(xt, t)) ** 2).mean(-1)
    else:
        want = definition(name, s, x0, t, eps, xt, options)
    torch.testing.assert_close(losses["eps"], want, rtol=1e-9, atol=1e-12)


def test_v_mse_weight_is_simple_under_the_v_prediction():
    """||v - v_hat||^2 = (1 + SNR_t) / SNR_t ||eps - eps_hat||^2, v_hat from the same eps_hat."""
    s = make_schedule("linear", T)
    x0 = mixture1d().sample((400,), generator=gen(13))
    t, eps, xt = same_draws(x0, 14, s)
    v_loss = simple_loss(process_from_eps_hat(s, "v"), x0, sampler=UniformSampler(T),
                         generator=gen(14)).loss
    eps_mse = ((eps - eps_hat(xt, t)) ** 2).mean(-1)
    torch.testing.assert_close(v_loss, step_weights("v_mse", s)[t - 1] * eps_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(step_weights("v_mse", s), 1 / s.alpha_bar[1:], rtol=1e-12, atol=0)


def test_edm_weights_reproduce_edm_noise_sampling():
    """E_{t ~ U}[c_t m_t] = E over EDM's ln sigma ~ N(-1.2, 1.2^2) of (sigma_t^2 + 0.5^2) /
    (sigma_t 0.5)^2 m_t / SNR_t, with lambda = -2 ln sigma rounded to the step t whose cell
    (lambda_t, lambda_{t-1}] holds it (sigma_t^2 = 1 / SNR_t) and m_t any eps-MSE profile:
    Monte Carlo with 400,000 draws, within Z standard errors."""
    for schedule in ("linear", "cosine"):
        s = make_schedule(schedule, T)
        lam = log_snr(s)
        m = 1 + torch.sin(torch.arange(1, T + 1, dtype=torch.float64))  # an arbitrary profile
        exact = (step_weights("edm", s) * m).mean()
        ln_sigma = -1.2 + 1.2 * torch.randn(400_000, generator=gen(15))
        lam_edm = -2 * ln_sigma
        t = 1 + (lam[None, 1:T] >= lam_edm[:, None]).sum(-1)  # steps 1..T-1 at or above it
        snr = s.snr[t]
        sigma2 = 1 / snr
        draws = (sigma2 + 0.25) / (sigma2 * 0.25) * m[t - 1] / snr
        assert_within_stderr(draws.mean(), exact, draws.std() / math.sqrt(len(draws)))


# -- weights and implied weightings -----------------------------------------------------------

@pytest.mark.parametrize("name", WEIGHTINGS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_step_weights_are_finite_and_positive(name, schedule):
    s = make_schedule(schedule, 100, warn=False)
    c = step_weights(name, s)
    assert c.shape == (100,) and c.dtype == torch.float64
    assert bool(torch.isfinite(c).all())
    assert bool((c[1:] > 0).all()) and (c[0] == 0 if name == "elbo" else c[0] > 0)
    lam, w = implied_weighting(name, s)
    assert lam.shape == w.shape == (99,) and bool((w > 0).all())


@pytest.mark.parametrize("gamma", [0.1, 1.0, 5.0, 1e3])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_snr_weight(gamma, schedule):
    """<= 1 everywhere, exactly 1 where SNR_t <= gamma, gamma / SNR_t (gamma times the x_0-MSE)
    elsewhere."""
    s = make_schedule(schedule, 1000)
    c, snr = step_weights("min_snr", s, gamma=gamma), s.snr[1:]
    assert bool((c <= 1).all())
    assert bool((c[snr <= gamma] == 1).all())
    torch.testing.assert_close(c[snr > gamma], gamma * step_weights("snr", s)[snr > gamma],
                               rtol=1e-12, atol=0)


def test_p2_limits():
    """gamma = 0 is L_simple; k = 0, gamma = 1 is the x_0-MSE; the default is 1 - alpha_bar_t."""
    s = make_schedule("cosine", 200)
    torch.testing.assert_close(step_weights("p2", s, gamma=0.0), step_weights("simple", s))
    torch.testing.assert_close(step_weights("p2", s, k=0.0), step_weights("snr", s), rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(step_weights("p2", s), 1 - s.alpha_bar[1:], rtol=1e-9, atol=0)


def test_elbo_implied_weighting_is_one():
    for schedule in ("linear", "cosine", "const"):
        lam, w = implied_weighting("elbo", make_schedule(schedule, 100, warn=False))
        torch.testing.assert_close(w, torch.ones_like(w), rtol=1e-15, atol=0)


def discretization_check(s, name, closed_form, slope, extra=lambda lam: 0.0, h_max=0.2):
    """|log(w_t / closed_form(lambda_t)) - that at the step nearest lambda = 0| within the
    first-order error of a cell of width h_t = lambda_{t-1} - lambda_t, doubled for the reference
    step, plus h_t^2: w_t averages over the cell and Delta_t = expm1(h_t) = h_t (1 + h_t / 2), so
    log w_t errs by (h_t / 2)(1 + |d log w / d lambda|) = slope(lambda_t) h_t to first order. Steps
    with h_t > h_max (the ends of the chain) and the last step (its cell is open below; the cosine
    schedule clips its beta) are left out. Returns the log-SNR range checked."""
    lam, w = implied_weighting(name, s)
    all_lam = log_snr(s)
    h = all_lam[1:-1] - all_lam[2:]  # (T - 1,) the cell of steps 2..T
    keep = h <= h_max
    keep[-1] = False
    err = torch.log(w / closed_form(lam))
    i = int(torch.argmin(lam.abs()))
    err = err - err[i]
    tol = slope(lam) * h + slope(lam[i]) * h[i] + h**2 + extra(lam) + extra(lam[i])
    bad = keep & (err.abs() > tol)
    assert not bool(bad.any()), (lam[bad], err[bad], tol[bad])
    return float(lam[keep].min()), float(lam[keep].max())


@pytest.mark.parametrize("cosine_s", [0.0, 0.008])
def test_simple_on_cosine_is_sech(cosine_s):
    """Kingma & Gao: eps-MSE with the cosine schedule has w(lambda) proportional to sech(lambda / 2)
    (|d log w / d lambda| <= 1/2). The offset s makes SNR_t = cos^2 phi / (sin^2 phi - a), a =
    sin^2(s / (1 + s) pi / 2): a relative change of about a (1 + SNR), allowed twice."""
    s = make_schedule("cosine", 1000, cosine_s=cosine_s)
    a = math.sin(cosine_s / (1 + cosine_s) * math.pi / 2) ** 2
    lo, hi = discretization_check(s, "simple", lambda lam: 1 / torch.cosh(lam / 2),
                                  lambda lam: 0.75, lambda lam: 2 * a * (1 + torch.exp(lam)))
    assert lo < -8 and hi > 7.5  # the check covers the bulk of the chain


@pytest.mark.parametrize("schedule", ["linear", "cosine", "quadratic", "sigmoid"])
def test_edm_implied_weighting(schedule):
    """Kingma & Gao: w(lambda) proportional to N(lambda; 2.4, 2.4^2) (e^-lambda + 0.5^2) /
    0.5^2. The cell probability carries the density's slope, |lambda - 2.4| / 2.4^2 (g is taken at
    lambda_t exactly)."""
    s = make_schedule(schedule, 1000)
    lo, hi = discretization_check(
        s, "edm", lambda lam: torch.exp(-(lam - 2.4)**2 / (2 * 2.4**2)) * (torch.exp(-lam) + 0.25),
        lambda lam: 0.5 * (1 + (lam - 2.4).abs() / 2.4**2))
    assert lo < -7 and hi > 6.5


def test_normalized_weighting():
    s = make_schedule("cosine", 1000)
    for name in WEIGHTINGS:
        lam, w = implied_weighting(name, s, normalize_at=0.0)
        assert reference_value(lam, w, 0.0).item() == pytest.approx(1.0, rel=1e-12)
        _, raw = implied_weighting(name, s)
        torch.testing.assert_close(w / raw, (w / raw)[:1].expand_as(w), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="outside"):
        implied_weighting("simple", s, normalize_at=50.0)


def test_weights_are_cached_per_schedule_device_and_dtype():
    s, like = make_schedule("cosine", T), torch.zeros(3)
    a = step_weights_like("p2", s, like)
    assert step_weights_like("p2", s, like) is a
    assert step_weights_like("p2", s, like, gamma=2.0) is not a
    assert step_weights_like("p2", s, like.float()).dtype == torch.float32


# -- names and options ------------------------------------------------------------------------

def test_new_objectives_are_registered():
    assert set(NEW) <= set(OBJECTIVES) and set(OBJECTIVES) == set(LOSSES)
    assert set(NEW) - {"elbo"} <= set(WEIGHTINGS) and "elbo" in WEIGHTINGS
    with pytest.raises(ValueError, match="valid: simple, vlb, hybrid, trajectory, elbo, snr, "
                                         "min_snr, p2, edm"):
        get_objective("min-snr")


def test_unknown_names_and_options_are_refused():
    s = make_schedule("cosine", T)
    with pytest.raises(ValueError, match="valid: " + ", ".join(WEIGHTINGS)):
        step_weights("truncated_snr", s)
    with pytest.raises(ValueError, match="valid: k, gamma"):
        step_weights("p2", s, gama=1.0)
    with pytest.raises(ValueError, match="valid: none"):
        step_weights("snr", s, gamma=1.0)
    p, x0 = make_process("eps", "fixed_small"), mixture1d().sample((4,), generator=gen(16))
    for name in NEW:
        with pytest.raises(ValueError, match="unknown option"):
            get_objective(name)(p, x0, sampler=UniformSampler(T), generator=gen(17), beta=1.0)
    for name, bad in (("min_snr", {"gamma": 0.0}), ("p2", {"k": -1.0}), ("edm", {"p_std": 0.0}),
                      ("edm", {"sigma_data": -0.5}), ("p2", {"gamma": math.nan})):
        with pytest.raises(ValueError, match=name):
            step_weights(name, s, **bad)
    assert OPTIONS["min_snr"] == {"gamma": 5.0} and OPTIONS["p2"] == {"k": 1.0, "gamma": 1.0}
    assert OPTIONS["edm"] == {"p_mean": -1.2, "p_std": 1.2, "sigma_data": 0.5}


# -- variances, samplers, training ------------------------------------------------------------

@pytest.mark.parametrize("name", OBJECTIVES)
def test_which_objectives_reach_a_learned_variance(name):
    """``MEAN_ONLY_OBJECTIVES`` (what a separate variance network under data parallelism needs to
    know) give the variance network no gradient; the others do (``elbo`` through t = 1)."""
    torch.manual_seed(0)
    net = MeanVarianceNets(MLPDenoiser(1, T, hidden=16, depth=1),
                           MLPDenoiser(1, T, hidden=16, depth=1))
    p = ReverseProcess(net, make_schedule("cosine", T), variance="learned_range")
    x0 = mixture1d().sample((256,), generator=gen(18))
    get_objective(name)(p, x0, sampler=UniformSampler(T), generator=gen(19)).loss.mean().backward()
    reached = any(q.grad is not None and q.grad.abs().sum() > 0
                  for q in net.variance_net.parameters())
    assert reached == (name not in MEAN_ONLY_OBJECTIVES)


def test_weighted_losses_are_unbiased_under_the_importance_sampler():
    """With a warmed-up, far from uniform p_t and weights 1 / (T p_t) the mean loss matches the
    uniform sampler's (two Monte Carlo means, within Z combined standard errors)."""
    s = make_schedule("cosine", T)
    p = process_from_eps_hat(s, "eps")
    sampler = ImportanceSampler(T)
    for _ in range(10):
        sampler.update(torch.arange(1, T + 1), torch.linspace(0.1, 3.0, T) ** 2)
    assert sampler.warmed_up() and sampler.probs().max() / sampler.probs().min() > 50
    x0 = mixture1d().sample((100_000,), generator=gen(20))
    for name in ("min_snr", "edm", "elbo"):
        a = get_objective(name)(p, x0, sampler=UniformSampler(T), generator=gen(21)).loss
        b = get_objective(name)(p, x0, sampler=sampler, generator=gen(22)).loss
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert_within_stderr(b.mean(), a.mean(), se)


@pytest.mark.parametrize("objective,prediction,variance,sampler", [
    ("elbo", "eps", "fixed_small", "uniform"),
    ("elbo", "v", "fixed_small", "importance"),
    ("snr", "x0", "fixed_large", "uniform"),
    ("min_snr", "eps", "fixed_large", "uniform"),
    ("p2", "v", "fixed_large", "uniform"),
    ("edm", "eps", "fixed_large", "uniform"),
])
def test_each_weighted_objective_trains(objective, prediction, variance, sampler):
    assert_training_lowers_bound(make_process(prediction, variance), objective, sampler)


# -- the figure -------------------------------------------------------------------------------

def test_plot_weightings_writes_a_png(tmp_path):
    path = plot_weightings(tmp_path / "sub" / "weightings.png", T=50)
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = plot_weightings(tmp_path / "cosine.png", schedule_names=("cosine",), T=50)
    assert one.stat().st_size > 1000
    with pytest.raises(ValueError, match="schedule"):
        plot_weightings(tmp_path / "none.png", schedule_names=())
    with pytest.raises(ValueError, match="T >= 3"):
        plot_weightings(tmp_path / "short.png", T=2)
