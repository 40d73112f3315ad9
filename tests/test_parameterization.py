"""eps <-> x0 <-> v <-> posterior mean: mutual inverses, eq. 11 against eq. 7, v against its
definition (Salimans & Ho 2022), the t = 1 conventions.

Tolerances come from float64 round-off: each conversion divides by a schedule coefficient
(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) or c0_t), which amplifies the ~eps relative error of
its inputs; ``_tol`` writes that bound out.
"""
import pytest
import torch

from pdiff.parameterization import (PREDICTIONS, check_prediction, eps_from_v, eps_from_x0,
                                    mean_from_eps, posterior_mean, v_from_eps, v_from_x0,
                                    v_from_x0_eps, x0_from_eps, x0_from_posterior_mean, x0_from_v,
                                    xt_from_x0)
from pdiff.schedules import SCHEDULES, make_schedule

EPS = torch.finfo(torch.float64).eps
SHAPES = [(), (4,), (2, 3)]
EVENTS = {1: (5,), 3: (2, 3, 3)}


def _tol(s, t, event_dims, scale, *names):
    """64 eps * scale / prod(coefficients), broadcast like the data."""
    denom = torch.ones(t.shape, dtype=torch.float64)
    for name in names:
        denom = denom * {"a": s.alpha_bar[t].sqrt(), "s": (1 - s.alpha_bar[t]).sqrt(),
                         "c0": s.posterior_coef_x0[t]}[name]
    return (64 * EPS / denom).reshape(t.shape + (1,) * event_dims) * scale


def _setup(name, shape, event_dims, T=1000):
    s = make_schedule(name, T, warn=False)
    x0 = torch.randn(shape + EVENTS[event_dims])
    eps = torch.randn_like(x0)
    t = torch.randint(1, T + 1, shape)
    t.view(-1)[0] = 1  # always cover both ends
    t.view(-1)[-1] = T
    xt = xt_from_x0(s, x0, t, eps, event_dims)
    scale = 1 + x0.abs() + eps.abs() + xt.abs()
    return s, x0, eps, t, xt, scale


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_x0_eps_round_trips(name, shape, event_dims):
    s, x0, eps, t, xt, scale = _setup(name, shape, event_dims)
    d = event_dims
    x0_back = x0_from_eps(s, xt, t, eps, d)
    assert ((x0_back - x0).abs() <= _tol(s, t, d, scale, "a")).all()
    eps_back = eps_from_x0(s, xt, t, x0, d)
    assert ((eps_back - eps).abs() <= _tol(s, t, d, scale, "s")).all()
    # eps -> x0 -> eps and x0 -> eps -> x0
    assert ((eps_from_x0(s, xt, t, x0_back, d) - eps).abs() <= _tol(s, t, d, scale, "a", "s")).all()
    assert ((x0_from_eps(s, xt, t, eps_back, d) - x0).abs() <= _tol(s, t, d, scale, "a", "s")).all()


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_posterior_mean_round_trips(name, shape, event_dims):
    s, x0, eps, t, xt, scale = _setup(name, shape, event_dims)
    d = event_dims
    mean = posterior_mean(s, x0, xt, t, d)
    assert mean.shape == x0.shape
    x0_back = x0_from_posterior_mean(s, mean, xt, t, d)
    assert ((x0_back - x0).abs() <= _tol(s, t, d, scale, "c0")).all()
    # and back to the mean, and through eps
    assert ((posterior_mean(s, x0_back, xt, t, d) - mean).abs() <= _tol(s, t, d, scale, "c0")).all()
    eps_via_mean = eps_from_x0(s, xt, t, x0_back, d)
    assert ((eps_via_mean - eps).abs() <= _tol(s, t, d, scale, "c0", "s")).all()


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_mean_from_eps_is_posterior_mean_of_implied_x0(name, shape, event_dims):
    """Ho et al. eq. 11 is eq. 7 evaluated at x0_from_eps."""
    s, x0, eps, t, xt, scale = _setup(name, shape, event_dims)
    d = event_dims
    direct = mean_from_eps(s, xt, t, eps, d)
    via_x0 = posterior_mean(s, x0_from_eps(s, xt, t, eps, d), xt, t, d)
    assert ((direct - via_x0).abs() <= _tol(s, t, d, scale, "a", "s")).all()
    # and both are the true posterior mean given the true x0
    assert ((direct - posterior_mean(s, x0, xt, t, d)).abs() <= _tol(s, t, d, scale, "a", "s")).all()


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_t1_posterior_mean_is_x0(name, shape, event_dims):
    s, x0, eps, _, _, _ = _setup(name, shape, event_dims)
    d = event_dims
    t = torch.ones(shape, dtype=torch.long)
    xt = xt_from_x0(s, x0, t, eps, d)
    # c0_1 = 1 up to the cancellation in 1 - alpha_bar_1 = 1 - (1 - beta_1); ct_1 = 0 exactly.
    tol = 8 * EPS / s.betas[1] * (1 + x0.abs())
    assert ((posterior_mean(s, x0, xt, t, d) - x0).abs() <= tol).all()
    assert ((mean_from_eps(s, xt, t, eps, d) - x0).abs() <= tol * (1 + xt.abs() + eps.abs())).all()


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_v_round_trips(name, shape, event_dims):
    """v from (x0, eps), from x0 alone and from eps alone (given x_t) agree, and x0 and eps come
    back from v; x0_from_v and eps_from_v only multiply (no amplified round-off)."""
    s, x0, eps, t, xt, scale = _setup(name, shape, event_dims)
    d = event_dims
    v = v_from_x0_eps(s, x0, t, eps, d)
    assert v.shape == x0.shape
    scale = scale + v.abs()
    assert ((x0_from_v(s, xt, t, v, d) - x0).abs() <= _tol(s, t, d, scale)).all()
    assert ((eps_from_v(s, xt, t, v, d) - eps).abs() <= _tol(s, t, d, scale)).all()
    assert ((v_from_x0(s, xt, t, x0, d) - v).abs() <= _tol(s, t, d, scale, "s")).all()
    assert ((v_from_eps(s, xt, t, eps, d) - v).abs() <= _tol(s, t, d, scale, "a")).all()
    # v -> x0 -> v, v -> eps -> v, and v -> x0 -> eps against eps directly
    assert ((v_from_x0(s, xt, t, x0_from_v(s, xt, t, v, d), d) - v).abs()
            <= _tol(s, t, d, scale, "s")).all()
    assert ((v_from_eps(s, xt, t, eps_from_v(s, xt, t, v, d), d) - v).abs()
            <= _tol(s, t, d, scale, "a")).all()
    assert ((eps_from_x0(s, xt, t, x0_from_v(s, xt, t, v, d), d) - eps).abs()
            <= _tol(s, t, d, scale, "s")).all()
    # and the posterior mean of the x0 implied by v is the true one
    mean = posterior_mean(s, x0, xt, t, d)
    assert ((posterior_mean(s, x0_from_v(s, xt, t, v, d), xt, t, d) - mean).abs()
            <= _tol(s, t, d, scale)).all()


def test_v_is_its_definition():
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 = d x_t / d phi with
    x_t = cos(phi) x_0 + sin(phi) eps (Salimans & Ho 2022, app. D), by a central difference."""
    s = make_schedule("cosine", 100)
    x0, eps = torch.randn(6, 2), torch.randn(6, 2)
    t = torch.tensor([1, 2, 30, 50, 99, 100])
    ab = s.alpha_bar[t][:, None]
    v = v_from_x0_eps(s, x0, t, eps, 1)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=0, atol=4 * EPS)
    phi, h = torch.atan2((1 - ab).sqrt(), ab.sqrt()), 1e-5
    dxt = ((torch.cos(phi + h) - torch.cos(phi - h)) * x0
           + (torch.sin(phi + h) - torch.sin(phi - h)) * eps) / (2 * h)
    torch.testing.assert_close(v, dxt, rtol=0, atol=1e-9)


def test_xt_from_x0_is_eq4():
    s = make_schedule("linear", 100)
    x0, eps = torch.randn(6, 2), torch.randn(6, 2)
    t = torch.arange(1, 7) * 15
    ab = s.alpha_bar[t][:, None]
    torch.testing.assert_close(xt_from_x0(s, x0, t, eps, 1), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_check_prediction():
    for name in PREDICTIONS:
        assert check_prediction(name) == name
    with pytest.raises(ValueError) as info:
        check_prediction("velocity")
    for name in PREDICTIONS:
        assert repr(name) in str(info.value) or name in str(info.value)
