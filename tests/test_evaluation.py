"""The bound report: the paired gap to the data entropy is the mean of bound(x_i) + log p(x_i) over
the very points the bound is averaged on, and pairing is what makes its standard error small."""
import math

import pytest
import torch

from pdiff.data import fit_rescaling, get_toy
from pdiff.data.toy import entropy_mc
from pdiff.distributions.reverse import ReverseProcess
from pdiff.elbo import full_bound
from pdiff.evaluation import bound_report
from pdiff.oracle import MixtureDenoiser
from pdiff.schedules import make_schedule
from tests.stats import Z, assert_within_stderr

T, N = 20, 500


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["none", "standardize"])
def oracle_case(request):
    """(the oracle on the rescaled mixture, the rescaling, the data, N points of the data in
    its own units)."""
    data = get_toy("mixture1d")
    rescaling = fit_rescaling(request.param, data, 1)
    s = make_schedule("cosine", T)
    model = ReverseProcess(MixtureDenoiser(rescaling.mixture(data), s), s, prediction="x0",
                           variance="fixed_large")
    return model, rescaling, data, data.sample((N,), generator=gen(1))


def test_paired_gap_is_the_mean_of_bound_plus_log_density(oracle_case):
    model, rescaling, data, x = oracle_case
    y, log_jac, log_px = rescaling.apply(x), rescaling.log_abs_det, data.log_prob(x)
    # an entropy that is wildly off: the paired estimate must not use it
    r = bound_report(model, y, log_jacobian=log_jac, entropy=(123.0, 1.0), data_log_prob=log_px,
                     generator=gen(2))
    bound = full_bound(model, y, generator=gen(2)).total - log_jac  # bound_i in data units
    diff = bound + log_px
    assert r.nll_nats == pytest.approx(bound.mean().item(), rel=1e-12)
    assert r.gap_nats == pytest.approx(diff.mean().item(), rel=1e-12, abs=1e-12)
    assert r.gap_nats == pytest.approx(r.nll_nats - (-log_px).mean().item(), rel=1e-10, abs=1e-10)
    assert r.gap_stderr == pytest.approx(diff.std().item() / math.sqrt(N), rel=1e-12)
    assert r.entropy_nats == 123.0  # reported as given, unused by the gap
    # E[bound] >= H: the paired gap is non-negative within its standard error
    assert r.gap_nats > -Z * r.gap_stderr
    # the oracle's bound tracks -log p(x) point by point, so pairing removes the spread of
    # -log p(x) (the rest is the bound's own Monte Carlo noise over x_t)
    assert r.gap_stderr < r.nll_stderr


def test_unpaired_gap_combines_the_two_standard_errors(oracle_case):
    model, rescaling, data, x = oracle_case
    y, log_jac = rescaling.apply(x), rescaling.log_abs_det
    h, h_se = entropy_mc(data, 20_000, generator=gen(3))
    r = bound_report(model, y, log_jacobian=log_jac, entropy=(h, h_se), generator=gen(2))
    assert r.gap_nats == pytest.approx(r.nll_nats - h, rel=1e-12)
    assert r.gap_stderr == pytest.approx(math.sqrt(r.nll_stderr**2 + h_se**2), rel=1e-12)
    paired = bound_report(model, y, log_jacobian=log_jac, entropy=(h, h_se),
                          data_log_prob=data.log_prob(x), generator=gen(2))
    assert paired.gap_stderr < r.gap_stderr
    # both estimate the same E[bound] - H
    assert abs(paired.gap_nats - r.gap_nats) < Z * r.gap_stderr
    none = bound_report(model, y, log_jacobian=log_jac, generator=gen(2))
    assert none.gap_nats is None and none.gap_stderr is None


# -- chunks sized by memory, the stratified estimator ----------------------------------------

def test_chunks_follow_the_memory_budget(oracle_case):
    from pdiff.evaluation import chunk_for_budget, pair_bytes

    model, rescaling, _, x = oracle_case
    y = rescaling.apply(x)
    per = pair_bytes(model, y)
    assert per > 0
    for budget in (1 << 20, 4 << 20, 16 << 20):
        chunk = chunk_for_budget(model, y, budget)
        assert chunk * per <= budget < (chunk + 1) * per or chunk == N * T
    assert chunk_for_budget(model, y, 1) == 1  # at least one pair
    assert chunk_for_budget(model, y, 1 << 40) == N * T  # no more than there are
    r = bound_report(model, y, memory_budget=1 << 20, generator=gen(3))
    assert r.chunk_size == chunk_for_budget(model, y, 1 << 20)


def test_pair_bytes_of_a_unet_grows_with_its_pixels():
    """The dry run counts the network's activations: a U-Net's grow with the image's area."""
    from pdiff.evaluation import pair_bytes
    from pdiff.nets import UNet, unet_for

    per = {}
    for size in (16, 32):  # the same three levels at both sizes
        s = make_schedule("linear", 10)
        net = UNet(**unet_for(size, 1, base_channels=16)).float()
        model = ReverseProcess(net, s, decoder="discretized", num_levels=256, event_dims=3)
        per[size] = pair_bytes(model, torch.zeros(2, 1, size, size, dtype=torch.float32))
    assert 3.5 < per[32] / per[16] < 4.5


def test_stratified_report_says_so_and_agrees_with_all_terms(oracle_case):
    model, rescaling, _, x = oracle_case
    y = rescaling.apply(x)
    full = bound_report(model, y, generator=gen(4))
    strat = bound_report(model, y, timestep_samples=5, generator=gen(5))
    assert (full.estimator, full.timestep_samples) == ("all_terms", None)
    assert (strat.estimator, strat.timestep_samples, strat.terms_nats) == ("stratified", 5, None)
    assert_within_stderr(strat.nll_nats, full.nll_nats,
                         math.sqrt(strat.nll_stderr**2 + full.nll_stderr**2))


def test_a_respaced_oracle_is_the_oracle_of_the_respaced_schedule(oracle_case):
    """model.respaced(steps) feeds the network the original steps, whose alpha_bar the respaced
    schedule keeps: the same chain as an oracle built on that schedule directly, draw for draw.
    With every step kept it is the original chain."""
    from pdiff.schedules import spaced_steps

    model, rescaling, data, x = oracle_case
    y = rescaling.apply(x)
    schedule, _ = model.schedule.respace(spaced_steps(T, 7))
    direct = ReverseProcess(MixtureDenoiser(rescaling.mixture(data), schedule), schedule,
                            prediction="x0", variance="fixed_large")
    a = bound_report(model.respaced(spaced_steps(T, 7)), y, generator=gen(6))
    b = bound_report(direct, y, generator=gen(6))
    assert len(a.terms_nats) == 7
    assert a.nll_nats == pytest.approx(b.nll_nats, rel=1e-10)
    every = bound_report(model.respaced(spaced_steps(T, T)), y, generator=gen(7))
    assert every.nll_nats == pytest.approx(bound_report(model, y, generator=gen(7)).nll_nats,
                                           rel=1e-9)
