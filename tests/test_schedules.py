"""Properties of the noise schedules: conventions at t = 0, derived quantities, validation, respacing."""
import math
import warnings

import pytest
import torch

from pdiff.schedules import GATHERED, MIN_BETA, SCHEDULES, NoiseSchedule, make_schedule, spaced_steps

EPS = torch.finfo(torch.float64).eps
TS = (1, 10, 1000)


def _quiet(name, T, **kwargs):
    # Short chains of some schedules legitimately leave alpha_bar_T far from 0; the warning is
    # tested on its own below.
    return make_schedule(name, T, warn=False, **kwargs)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_betas_valid_float64_and_indexed_by_t(name, T):
    s = _quiet(name, T)
    assert s.num_timesteps == T
    for field in ("betas", "alphas", "alpha_bar", "alpha_bar_prev", "beta_tilde",
                  "posterior_coef_x0", "posterior_coef_xt"):
        value = getattr(s, field)
        assert value.dtype == torch.float64, field
        assert value.shape == (T + 1,), field
        assert torch.isfinite(value).all(), field
    b = s.betas[1:]
    assert ((b > 0) & (b < 1)).all()
    # index 0 is t = 0, the data: beta_0 = 0, alpha_bar_0 = 1, posterior quantities 0.
    assert s.betas[0] == 0 and s.alphas[0] == 1 and s.alpha_bar[0] == 1
    assert s.beta_tilde[0] == 0 and s.posterior_coef_x0[0] == 0 and s.posterior_coef_xt[0] == 0


@pytest.mark.parametrize("name", SCHEDULES)
def test_float64_whatever_the_default_dtype(name):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        s = _quiet(name, 10)
        s32 = NoiseSchedule.from_betas(torch.full((5,), 0.9, dtype=torch.float32))
    finally:
        torch.set_default_dtype(old)
    assert s.betas.dtype == s.alpha_bar.dtype == s32.alpha_bar.dtype == torch.float64


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_derived_quantities(name, T):
    s = _quiet(name, T)
    b = s.betas
    # alpha_bar is the cumulative product, computed here by an explicit loop.
    ab = [1.0]
    for t in range(1, T + 1):
        ab.append(ab[-1] * (1 - b[t].item()))
    ab = torch.tensor(ab)
    # Each factor carries relative round-off ~eps, so the product carries ~t eps.
    tol = 4 * EPS * torch.arange(1, T + 2) * ab
    assert ((s.alpha_bar - ab).abs() <= tol).all()
    assert torch.equal(s.alphas, 1 - b)
    assert torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1]) and s.alpha_bar_prev[0] == 1
    t = slice(1, None)
    ab, ab_prev = s.alpha_bar[t], s.alpha_bar_prev[t]
    # Ho et al. eq. 7, written out independently.
    beta_tilde = (1 - ab_prev) / (1 - ab) * b[t]
    c0 = ab_prev.sqrt() * b[t] / (1 - ab)
    ct = (1 - b[t]).sqrt() * (1 - ab_prev) / (1 - ab)
    torch.testing.assert_close(s.beta_tilde[t], beta_tilde, rtol=16 * EPS, atol=0)
    torch.testing.assert_close(s.posterior_coef_x0[t], c0, rtol=16 * EPS, atol=0)
    torch.testing.assert_close(s.posterior_coef_xt[t], ct, rtol=16 * EPS, atol=0)
    # beta_tilde_1 = 0 and the posterior mean at t = 1 is x_0 itself.
    assert s.beta_tilde[1] == 0 and s.posterior_coef_xt[1] == 0
    # c0_1 = beta_1 / (1 - alpha_bar_1) = 1 up to the cancellation in 1 - (1 - beta_1).
    assert abs(s.posterior_coef_x0[1].item() - 1) <= 4 * EPS / s.betas[1].item()
    # 0 <= beta_tilde_t <= beta_t, and the snr decreases.
    assert (s.beta_tilde[t] <= b[t] * (1 + 4 * EPS)).all()
    assert (s.snr[1:].diff() < 0).all()
    assert s.snr[0] == math.inf


@pytest.mark.parametrize("T", TS)
def test_log_beta_tilde_clipped(T):
    s = make_schedule("cosine", T)
    out = s.log_beta_tilde_clipped
    assert out[0] == -math.inf
    if T >= 2:
        torch.testing.assert_close(out[2:], s.beta_tilde[2:].log(), rtol=0, atol=0)
        assert out[1] == out[2]
    else:  # no beta_tilde_2: beta_1 instead
        assert out[1] == s.betas[1].log()


def _f_cosine(t, T, s=0.008):
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


def _f_polynomial(t, T, p=2.0):
    return (1 - 2e-4) * (1 - (t / T) ** p) ** 2 + 1e-4


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name, f", [("cosine", _f_cosine), ("polynomial", _f_polynomial)])
def test_alpha_bar_from_f_until_the_first_capped_beta(name, f, T):
    max_beta = 0.999
    s = _quiet(name, T, max_beta=max_beta)
    target = torch.tensor([f(t, T) / f(0, T) for t in range(T + 1)])
    capped = (s.betas[1:] >= max_beta).nonzero()
    first_capped = int(capped[0]) + 1 if len(capped) else T + 1
    t = torch.arange(first_capped)
    # Relative round-off of the ratio/cumprod round trip grows like t eps (times 1/alpha_t, the
    # amplification of computing alpha = 1 - (1 - ratio)).
    amp = torch.cumsum(1 / s.alphas[t], 0)
    rel = ((s.alpha_bar[t] - target[t]) / target[t]).abs()
    assert (rel <= 16 * EPS * (1 + amp)).all(), rel.max()
    # Past a capped step the chain keeps more signal than f prescribes, never less.
    assert (s.betas[1:] <= max_beta).all()


@pytest.mark.parametrize("T", (2, 10, 100, 1000, 4000))
def test_linear_ends_scale_with_T(T):
    s = make_schedule("linear", T, warn=False)
    scale = 1000 / T
    assert math.isclose(s.betas[1].item(), 1e-4 * scale, rel_tol=4 * EPS)
    assert math.isclose(s.betas[T].item(), min(0.02 * scale, 0.999), rel_tol=4 * EPS)
    assert (s.betas[1:].diff() > 0).all()


def test_linear_explicit_ends_not_scaled():
    s = make_schedule("linear", 10, beta_start=0.1, beta_end=0.3, warn=False)
    assert math.isclose(s.betas[1].item(), 0.1) and math.isclose(s.betas[10].item(), 0.3)


@pytest.mark.parametrize("T", TS)
def test_const_default_and_explicit(T):
    assert (_quiet("const", T).betas[1:] == 0.02).all()
    assert (_quiet("const", T, beta=0.3).betas[1:] == 0.3).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_default_schedules_reach_noise_at_T_1000(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = make_schedule(name, 1000)
    assert s.alpha_bar[-1] < 1e-2


def test_warns_when_alpha_bar_T_far_from_zero():
    with pytest.warns(UserWarning, match="alpha_bar_T"):
        make_schedule("const", 10, beta=1e-4)
    with pytest.warns(UserWarning, match="alpha_bar_T"):
        NoiseSchedule.from_betas([1e-4] * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_schedule("const", 10, beta=1e-4, warn=False)


@pytest.mark.parametrize("betas, match", [
    ([0.1, 0.0, 0.2], "strictly between 0 and 1"),
    ([0.1, -0.2], "strictly between 0 and 1"),
    ([0.1, 1.0], "strictly between 0 and 1"),
    ([0.1, 1.5], "strictly between 0 and 1"),
    ([0.1, math.nan], "finite"),
    ([0.1, math.inf], "finite"),
    ([[0.1, 0.2], [0.1, 0.2]], "1-D"),
    ([], "non-empty"),
    (0.1, "1-D"),
])
def test_from_betas_refuses(betas, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_betas(betas)


@pytest.mark.parametrize("tiny", [1e-300, 1e-17, 5e-17])
def test_from_betas_refuses_betas_too_small_for_float64(tiny):
    """1 - beta rounds to 1 below about 1e-16: alpha_bar would stay 1 and the posterior variance be
    0/0. The message names the valid range."""
    with pytest.raises(ValueError, match=r"\[1e-16, 1\)"):
        NoiseSchedule.from_betas([0.1, tiny, 0.2])


@pytest.mark.parametrize("T", [1, 2, 7])
def test_smallest_betas_give_a_finite_schedule(T):
    """At the smallest beta every derived quantity is finite, and 0 < 1 - alpha_bar_t, so the
    posterior variance and L_T's constants exist; respacing keeps the betas valid."""
    s = NoiseSchedule.from_betas([MIN_BETA] * T, warn=False)
    for name in ("alphas", "alpha_bar", "beta_tilde", "posterior_coef_x0", "posterior_coef_xt",
                 "sqrt_one_minus_alpha_bar", "log_beta_tilde_clipped"):
        assert torch.isfinite(getattr(s, name)[1:]).all(), name
    assert (s.alpha_bar[1:] < 1).all()
    ab, log1m = s.final_alpha_bar
    assert math.isfinite(log1m)
    if T > 1:
        new, _ = s.respace([1, T])
        assert (new.betas[1:] >= MIN_BETA).all()


def test_from_betas_prepends_beta_0():
    s = NoiseSchedule.from_betas([0.1, 0.5, 0.9], warn=False)
    assert s.betas.tolist() == [0.0, 0.1, 0.5, 0.9]


def test_unknown_schedule_names_valid_ones():
    with pytest.raises(ValueError) as info:
        make_schedule("cosinus", 10)
    for name in SCHEDULES:
        assert name in str(info.value)


@pytest.mark.parametrize("T", [0, -3, 10.0, 2.5, "10", True, None])
def test_bad_T_refused(T):
    with pytest.raises(ValueError, match="T"):
        make_schedule("linear", T)


@pytest.mark.parametrize("name", SCHEDULES)
def test_respace_keeps_alpha_bar(name):
    s = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(0)
    kept = torch.randperm(1000, generator=g)[:37] + 1
    new, timestep_map = s.respace(kept.flip(0))  # unsorted input is sorted
    kept = kept.sort().values
    assert new.num_timesteps == 37
    assert timestep_map.tolist() == [0] + kept.tolist()
    # Recomputing alpha = (ab_k / ab_{k-1}) and multiplying back loses ~eps/alpha per step.
    amp = torch.cumsum(1 / new.alphas[1:], 0)
    rel = ((new.alpha_bar[1:] - s.alpha_bar[kept]) / s.alpha_bar[kept]).abs()
    assert (rel <= 16 * EPS * (1 + amp)).all(), rel.max()
    assert ((new.betas[1:] > 0) & (new.betas[1:] < 1)).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_respace_to_all_steps_is_identity(name):
    s = _quiet(name, 100)
    new, timestep_map = s.respace(torch.arange(1, 101))
    assert torch.equal(timestep_map, torch.arange(101))
    torch.testing.assert_close(new.betas, s.betas, rtol=1e-12, atol=0)
    torch.testing.assert_close(new.alpha_bar, s.alpha_bar, rtol=1e-12, atol=0)


def test_respace_refuses_steps_outside_chain():
    s = make_schedule("linear", 10)
    for kept in ([0, 5, 10], [1, 11]):
        with pytest.raises(ValueError):
            s.respace(kept)


@pytest.mark.parametrize("T", (1, 2, 7, 10, 50, 1000))
def test_spaced_steps(T):
    for K in sorted({1, 2, 3, T // 3, T // 2, T - 1, T} & set(range(1, T + 1))):
        steps = spaced_steps(T, K)
        assert steps.dtype == torch.long
        assert len(steps) == K, (T, K)
        assert int(steps.max()) == T and int(steps.min()) >= 1
        assert (steps.diff() > 0).all()
        # evenly spaced: each step is the nearest integer to its point of linspace(T, 1, K)
        ideal = torch.linspace(T, 1, K, dtype=torch.float64).flip(0)
        assert ((steps - ideal).abs() <= 0.5 + 1e-9).all(), (T, K)


def test_spaced_steps_exhaustive_counts():
    for T in range(1, 61):
        for K in range(1, T + 1):
            steps = spaced_steps(T, K)
            assert len(steps) == K and int(steps[-1]) == T, (T, K)


@pytest.mark.parametrize("K", (0, 11, -1))
def test_spaced_steps_refuses_bad_counts(K):
    with pytest.raises(ValueError, match="1..10"):
        spaced_steps(10, K)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_check_t(shape):
    s = make_schedule("linear", 10)
    for t in (1, 10):
        out = s.check_t(torch.full(shape, t))
        assert out.dtype == torch.long and out.shape == shape
    for bad in (0, 11, -1):
        with pytest.raises(ValueError, match="1..10"):
            s.check_t(torch.full(shape, bad))
    with pytest.raises(ValueError, match="integer"):
        s.check_t(torch.full(shape, 3.0))
    with pytest.raises(ValueError, match="integer"):
        s.check_t(torch.full(shape, True))
    with pytest.raises(ValueError):
        s.check_t(3.0)
    assert s.check_t(0, low=0) == 0


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_at_broadcasts(shape, event_dims):
    s = make_schedule("cosine", 10)
    like = torch.zeros(shape + (2,) * event_dims)
    t = torch.randint(1, 11, shape)
    value = s.at("alpha_bar", t, like, event_dims)
    assert value.shape == shape + (1,) * event_dims
    assert torch.equal(value.reshape(shape), s.alpha_bar[t])


def test_at_gathers_again_when_t_changes():
    """``at`` gathers the entries of GATHERED together once per t tensor, and only while t is
    unchanged: another tensor, an in-place change, another dtype or event_dims gathers afresh."""
    s = make_schedule("linear", 10)
    like = torch.zeros(3, 2)

    def want(name, t, d=1):
        return getattr(s, name)[t].reshape(t.shape + (1,) * d)

    t = torch.tensor([1, 5, 10])
    for name in GATHERED + ("betas", "alphas"):
        torch.testing.assert_close(s.at(name, t, like, 1), want(name, t), rtol=0, atol=0)
    t[0] = 7
    torch.testing.assert_close(s.at("alpha_bar", t, like, 1), want("alpha_bar", t), rtol=0, atol=0)
    other = torch.tensor([2, 2, 2])
    torch.testing.assert_close(s.at("log_beta", other, like, 1), want("log_beta", other))
    assert s.at("log_beta", other, like.float(), 1).dtype == torch.float32
    assert s.at("log_beta", other, like, 2).shape == (3, 1, 1)
    grid = torch.tensor([[1, 2], [3, 4]])
    torch.testing.assert_close(s.at("beta_tilde", grid, torch.zeros(2, 2, 5), 1),
                               want("beta_tilde", grid))
    with torch.inference_mode():
        frozen = torch.tensor([3, 4, 5])
        torch.testing.assert_close(s.at("alpha_bar", frozen, like, 1), want("alpha_bar", frozen))
