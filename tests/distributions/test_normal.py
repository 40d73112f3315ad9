"""DiagNormal, the Gaussian behind q and p_theta: against torch's Normal, its KL against torch's
and against Monte Carlo, shapes, validation."""
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from pdiff.distributions import DiagNormal, diag_normal, standard_normal
from tests.stats import assert_within_stderr

SHAPES = [(), (4,), (2, 3)]
EVENTS = [(3,), (2, 2, 3)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def pair(batch, event, seed):
    """A DiagNormal and the torch Normal.to_event it stands for; the variance per example."""
    shape = batch + event
    loc = torch.randn(shape, generator=gen(seed))
    log_var = torch.randn(batch + (1,) * len(event), generator=gen(seed + 1))
    d = DiagNormal(loc, log_var, len(event))
    ref = Independent(Normal(loc, torch.exp(0.5 * log_var).expand(shape)), len(event))
    return d, ref


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("batch", SHAPES)
def test_matches_torch_normal(batch, event):
    d, ref = pair(batch, event, 1)
    assert d.batch_shape == ref.batch_shape and d.event_shape == ref.event_shape
    x = torch.randn((5,) + batch + event, generator=gen(3))
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    for name in ("mean", "variance", "stddev"):
        torch.testing.assert_close(getattr(d, name), getattr(ref, name), rtol=1e-12, atol=0)
    torch.testing.assert_close(d.entropy(), ref.entropy(), rtol=1e-12, atol=1e-12)
    wide = d.expand((7,) + batch)
    assert wide.batch_shape == (7,) + batch
    torch.testing.assert_close(wide.log_prob(x[:1]), ref.expand((7,) + batch).log_prob(x[:1]))


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("batch", SHAPES)
def test_kl_matches_torch_and_monte_carlo(batch, event):
    (q, q_ref), (p, p_ref) = pair(batch, event, 5), pair(batch, event, 7)
    kl = kl_divergence(q, p)
    torch.testing.assert_close(kl, kl_divergence(q_ref, p_ref), rtol=1e-12, atol=1e-12)
    assert kl.shape == batch and (kl >= 0).all()
    torch.manual_seed(9)
    n = 20000
    y = q.rsample((n,))
    ratio = q.log_prob(y) - p.log_prob(y)
    assert_within_stderr(ratio.mean(0), kl, ratio.std(0) / math.sqrt(n))


def test_diag_normal_takes_a_variance_or_its_log():
    loc, var = torch.randn(4, 3), torch.rand(4, 1) + 0.1
    a = diag_normal(loc, var, event_dims=1)
    b = diag_normal(loc, log_variance=var.log(), event_dims=1)
    x = torch.randn(4, 3)
    torch.testing.assert_close(a.log_prob(x), b.log_prob(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(kl_divergence(a, standard_normal(loc, 1)),
                               kl_divergence(b, standard_normal(loc, 1)), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        diag_normal(loc, var, log_variance=var.log(), event_dims=1)


def test_validation_refuses_bad_parameters_and_values():
    with pytest.raises(ValueError):
        diag_normal(torch.full((2, 3), math.nan), torch.ones(2, 3), event_dims=1)
    with pytest.raises(ValueError, match="positive"):
        diag_normal(torch.zeros(2, 3), torch.zeros(2, 3), event_dims=1)
    with pytest.raises(ValueError):
        DiagNormal(torch.zeros(2, 3), torch.zeros(2, 3), 1).log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="event dimensions"):
        DiagNormal(torch.zeros(3), torch.zeros(3), 2)
    # unchecked when asked: the hot paths' choice
    DiagNormal(torch.full((2, 3), math.nan), torch.zeros(2, 3), 1, validate_args=False)
