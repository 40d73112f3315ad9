"""p_theta around a network: each prediction and variance option does what the module says."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pdiff.distributions import (DECODER_VARIANCES, DECODERS, FIXED_VARIANCES, LEARNED_VARIANCES,
                                 VARIANCES, DiagNormal, DiscretizedGaussian, ReverseOutput, ReverseProcess,
                                 q_posterior)
from pdiff.data import GaussianMixture
from pdiff.distributions.discretized import quantize
from pdiff.elbo import full_bound
from pdiff.oracle import MixtureDenoiser
from pdiff.parameterization import (PREDICTIONS, eps_from_x0, posterior_mean, v_from_x0,
                                    xt_from_x0)
from pdiff.schedules import make_schedule

EPS = torch.finfo(torch.float64).eps
SHAPES = [(), (4,), (2, 3)]
EVENTS = {1: (3,), 3: (2, 3, 3)}


def _oracle(schedule, x0, prediction, event_dims):
    """A net returning the true eps / x0 / v / posterior mean for the known data x0."""
    def net(xt, t):
        assert t.dtype == torch.long and t.shape == xt.shape[: xt.dim() - event_dims]
        return _predict(schedule, prediction, x0, xt, t, event_dims)
    return net


def _predict(schedule, prediction, x0, xt, t, event_dims):
    """What a network of ``prediction`` outputs when its x0_hat is ``x0``."""
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps_from_x0(schedule, xt, t, x0, event_dims)
    if prediction == "v":
        return v_from_x0(schedule, xt, t, x0, event_dims)
    return posterior_mean(schedule, x0, xt, t, event_dims)


def _point(schedule, shape, event_dims):
    T = schedule.num_timesteps
    x0 = torch.randn(shape + EVENTS[event_dims])
    t = torch.randint(1, T + 1, shape)
    t.view(-1)[0] = 1
    t.view(-1)[-1] = T
    xt = xt_from_x0(schedule, x0, t, torch.randn_like(x0), event_dims)
    return x0, t, xt


def _bcast(values, t, event_dims):
    return values[t].reshape(t.shape + (1,) * event_dims)


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_true_prediction_gives_true_x0_eps_mean(prediction, shape, event_dims):
    s = make_schedule("cosine", 100)
    x0, t, xt = _point(s, shape, event_dims)
    model = ReverseProcess(_oracle(s, x0, prediction, event_dims), s, prediction=prediction,
                           event_dims=event_dims)
    out = model.output(xt, t)
    d = event_dims
    eps = eps_from_x0(s, xt, t, x0, d)
    mean = posterior_mean(s, x0, xt, t, d)
    for field in ("prediction", "x0", "eps", "mean", "log_variance"):
        assert getattr(out, field).shape == xt.shape
    # Round-off: recovering x0 from a mean divides by c0_t, eps from x0 by sqrt(1 - alpha_bar_t).
    scale = 1 + x0.abs() + xt.abs() + eps.abs()
    cond = 1 / (_bcast(s.posterior_coef_x0, t, d) * _bcast((1 - s.alpha_bar).sqrt(), t, d)
                * _bcast(s.alpha_bar.sqrt(), t, d))
    tol = 64 * EPS * scale * cond
    assert ((out.x0 - x0).abs() <= tol).all()
    assert ((out.eps - eps).abs() <= tol).all()
    assert ((out.mean - mean).abs() <= tol).all()
    # the mean is the mean of q(x_{t-1} | x_t, x_0) where that has a density
    t2 = t.clamp_min(2)
    torch.testing.assert_close(model.output(xt, t2).mean,
                               q_posterior(s, x0, xt, t2, event_dims=d).mean, rtol=0,
                               atol=float(tol.max()))


def _fixed_target(s, variance, decoder_variance):
    target = (s.betas if variance == "fixed_large" else s.beta_tilde).log().clone()
    if s.num_timesteps >= 2:
        target[1] = s.betas[1].log() if decoder_variance == "beta1" else s.beta_tilde[2].log()
    else:
        target[1] = s.betas[1].log()
    return target


@pytest.mark.parametrize("T", (1, 2, 100))
@pytest.mark.parametrize("decoder_variance", DECODER_VARIANCES)
@pytest.mark.parametrize("variance", FIXED_VARIANCES)
def test_fixed_variances(variance, decoder_variance, T):
    s = make_schedule("cosine", T)
    x = torch.randn(T, 2)
    t = torch.arange(1, T + 1)
    model = ReverseProcess(lambda xt, t: torch.zeros_like(xt), s, variance=variance,
                           decoder_variance=decoder_variance)
    lv = model.output(x, t).log_variance
    target = _fixed_target(s, variance, decoder_variance)[1:, None].expand(T, 2)
    torch.testing.assert_close(lv, target, rtol=0, atol=4 * EPS)
    # the transition at t and the Gaussian decoder carry that variance
    tr = model.transition(x, t)
    torch.testing.assert_close(tr.variance.log(), target, rtol=0, atol=16 * EPS)
    dec = model.decoder(x[:1])
    torch.testing.assert_close(dec.variance.log(), target[:1], rtol=0, atol=16 * EPS)


def _learned_net(pred, var_out, form, event_dims):
    if form == "pair":
        return lambda xt, t: (pred, var_out)
    dim = pred.dim() - event_dims
    return lambda xt, t: torch.cat([pred, var_out], dim=dim)


@pytest.mark.parametrize("form", ("pair", "doubled"))
@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variance", LEARNED_VARIANCES)
def test_learned_variances(variance, shape, event_dims, form):
    s = make_schedule("cosine", 50)
    x0, t, xt = _point(s, shape, event_dims)
    pred = torch.randn_like(xt)
    var_out = torch.rand_like(xt) * 2 - 1  # in [-1, 1], the range learned_range expects
    model = ReverseProcess(_learned_net(pred, var_out, form, event_dims), s, variance=variance,
                           event_dims=event_dims)
    out = model.output(xt, t)
    assert torch.equal(out.prediction, pred)
    d = event_dims
    if variance == "learned":
        target = var_out
    elif variance == "learned_range":
        v = (var_out + 1) / 2
        log_beta_tilde = s.beta_tilde.log()
        log_beta_tilde[1] = log_beta_tilde[2]  # beta_tilde_1 = 0: the reference code's clip
        target = v * _bcast(s.betas.log(), t, d) + (1 - v) * _bcast(log_beta_tilde, t, d)
    else:
        target = 2 * torch.log(F.softplus(var_out))
    torch.testing.assert_close(out.log_variance, target, rtol=0, atol=64 * EPS)
    # the transition's standard deviation follows
    torch.testing.assert_close(model.transition(xt, t).stddev,
                               torch.exp(0.5 * target), rtol=1e-14, atol=0)


def test_learned_range_ends():
    """o = 1 gives beta_t, o = -1 gives the clipped beta_tilde_t."""
    s = make_schedule("linear", 20)
    t = torch.arange(1, 21)
    x = torch.zeros(20, 2)
    for o, target in ((1.0, s.betas), (-1.0, s.log_beta_tilde_clipped.exp())):
        model = ReverseProcess(lambda xt, t: (torch.zeros_like(xt), torch.full_like(xt, o)), s,
                               variance="learned_range")
        lv = model.output(x, t).log_variance
        torch.testing.assert_close(lv, target[1:, None].log().expand(20, 2), rtol=0, atol=64 * EPS)


@pytest.mark.parametrize("variance", LEARNED_VARIANCES)
def test_learned_variance_bad_shapes(variance):
    s = make_schedule("cosine", 10)
    xt = torch.randn(4, 3)
    t = torch.full((4,), 5)
    cases = [
        (lambda xt, t: xt, "doubled"),  # 3 is odd: no room for a variance part
        (lambda xt, t: torch.cat([xt, xt, xt[:, :1], xt[:, :1]], 1), "mean output has shape"),
        (lambda xt, t: (xt, xt[:, :2]), "variance output has shape"),
        (lambda xt, t: (xt[:2], xt), "mean output has shape"),
    ]
    for net, match in cases:
        with pytest.raises(ValueError, match=match):
            ReverseProcess(net, s, variance=variance).output(xt, t)
    # images: the doubled dimension is the channel dimension
    xt = torch.randn(2, 3, 4, 4)
    net = lambda xt, t: torch.cat([xt, xt], dim=-1)  # doubled on the wrong axis
    with pytest.raises(ValueError):
        ReverseProcess(net, s, variance=variance, event_dims=3).output(xt, torch.full((2,), 5))


@pytest.mark.parametrize("variance", FIXED_VARIANCES)
def test_fixed_variance_bad_shapes(variance):
    s = make_schedule("cosine", 10)
    xt = torch.randn(4, 3)
    t = torch.full((4,), 5)
    with pytest.raises(ValueError, match="fixed"):
        ReverseProcess(lambda xt, t: (xt, xt), s, variance=variance).output(xt, t)
    with pytest.raises(ValueError, match=r"expected \(4, 3\)"):
        ReverseProcess(lambda xt, t: torch.cat([xt, xt], 1), s, variance=variance).output(xt, t)


@pytest.mark.parametrize("option, valid", [("prediction", PREDICTIONS), ("variance", VARIANCES),
                                           ("decoder", DECODERS),
                                           ("decoder_variance", DECODER_VARIANCES)])
def test_unknown_options_name_valid_ones(option, valid):
    s = make_schedule("cosine", 10)
    with pytest.raises(ValueError) as info:
        ReverseProcess(lambda xt, t: xt, s, **{option: "nonsense"})
    assert "nonsense" in str(info.value)
    for name in valid:
        assert name in str(info.value)


@pytest.mark.parametrize("num_levels", (None, 1, 0, 256.0))
def test_discretized_decoder_needs_levels(num_levels):
    with pytest.raises(ValueError, match="num_levels"):
        ReverseProcess(lambda xt, t: xt, make_schedule("cosine", 10), decoder="discretized",
                       num_levels=num_levels)


def test_bad_timestep_map_refused():
    with pytest.raises(ValueError, match="T \\+ 1"):
        ReverseProcess(lambda xt, t: xt, make_schedule("cosine", 10), timestep_map=torch.arange(10))


@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("variance", VARIANCES)
def test_decoder(decoder, variance, event_dims):
    s = make_schedule("cosine", 10)
    K = 5
    event = (2,) if event_dims == 1 else (1, 1, 2)
    x1 = torch.randn((3,) + event) * 0.5

    def net(xt, t):
        assert (t == 1).all()
        pred = 0.8 * xt
        if variance in FIXED_VARIANCES:
            return pred
        return pred, torch.full_like(xt, -0.5 if variance != "learned" else math.log(0.05))
    model = ReverseProcess(net, s, variance=variance, decoder=decoder, num_levels=K,
                           event_dims=event_dims, prediction="x0")
    dec = model.decoder(x1)
    assert dec.batch_shape == (3,) and dec.event_shape == event
    out = model.output(x1, torch.ones(3, dtype=torch.long))
    if decoder == "gaussian":
        assert isinstance(dec, DiagNormal)
        torch.testing.assert_close(dec.mean, out.mean)
        torch.testing.assert_close(dec.variance, out.log_variance.exp())
        return
    assert isinstance(dec.base_dist, DiscretizedGaussian) and dec.base_dist.num_levels == K
    torch.testing.assert_close(dec.base_dist.loc, out.mean)
    torch.testing.assert_close(dec.base_dist.scale, torch.exp(0.5 * out.log_variance))
    # the joint probabilities over all K^2 level pairs sum to 1 for every batch member
    levels = torch.linspace(-1, 1, K)
    grid = torch.tensor(list(itertools.product(levels.tolist(), repeat=2)))  # (K^2, 2)
    grid = grid.reshape((K * K, 1) + event).expand((K * K, 3) + event)
    total = dec.log_prob(grid).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(3), rtol=0, atol=1e-13)
    x0 = dec.sample()
    assert dec.support.check(x0).all()


@pytest.mark.parametrize("decoder", DECODERS)
def test_detach_mean(decoder):
    s = make_schedule("cosine", 10)
    w = torch.tensor(0.7, requires_grad=True)
    model = ReverseProcess(lambda xt, t: w * xt, s, prediction="x0", decoder=decoder,
                           num_levels=17)
    x1 = torch.randn(4, 2)
    t = torch.full((4,), 5)
    loc = (lambda d: d.base_dist.loc) if decoder == "discretized" else (lambda d: d.mean)
    assert loc(model.decoder(x1)).requires_grad
    assert not loc(model.decoder(x1, detach_mean=True)).requires_grad
    assert model.transition(x1, t).mean.requires_grad
    assert not model.transition(x1, t, detach_mean=True).mean.requires_grad


def _assert_same_alpha_bar(schedule, target):
    # recomputing alpha_k = 1 - (1 - ab_k / ab_{k-1}) costs ~eps / alpha_k relatively per step
    amp = torch.cumsum(1 / schedule.alphas[1:], 0)
    rel = ((schedule.alpha_bar[1:] - target) / target).abs()
    assert (rel <= 16 * EPS * (1 + amp)).all(), rel


def test_respaced_keeps_alpha_bar_and_maps_timesteps():
    s = make_schedule("cosine", 100)
    seen = []

    def net(xt, t):
        seen.append(t.clone())
        return torch.zeros_like(xt)
    model = ReverseProcess(net, s)
    kept = torch.tensor([100, 3, 50, 20, 77, 1])
    short = model.respaced(kept)
    kept = kept.sort().values
    assert short.num_timesteps == 6
    _assert_same_alpha_bar(short.schedule, s.alpha_bar[kept])
    assert short.timestep_map.tolist() == [0] + kept.tolist()
    # the network is asked about the original steps
    short.output(torch.zeros(6, 2), torch.arange(1, 7))
    assert seen[-1].tolist() == kept.tolist()
    # respacing composes
    shorter = short.respaced([2, 4, 6])
    assert shorter.timestep_map.tolist() == [0] + kept[[1, 3, 5]].tolist()
    _assert_same_alpha_bar(shorter.schedule, s.alpha_bar[kept[[1, 3, 5]]])
    # the copy shares the network and every other option
    assert short.net is model.net and short.prediction == model.prediction


@pytest.mark.parametrize("new_name, new_T", [("linear", 37), ("cosine", 1000), ("quadratic", 10),
                                             ("cosine", 100)])
def test_with_schedule_uses_nearest_log_snr(new_name, new_T):
    train = make_schedule("cosine", 100)
    new = make_schedule(new_name, new_T)
    model = ReverseProcess(lambda xt, t: torch.zeros_like(xt), train).with_schedule(new)
    assert model.schedule is new and model.timestep_map.shape == (new_T + 1,)
    assert model.timestep_map[0] == 0
    mapped = model.timestep_map[1:]
    assert ((mapped >= 1) & (mapped <= 100)).all()
    lsnr_train, lsnr_new = train.snr[1:].log(), new.snr[1:].log()
    chosen = (lsnr_new - lsnr_train[mapped - 1]).abs()
    best = (lsnr_new[:, None] - lsnr_train[None, :]).abs().min(1).values
    assert torch.equal(chosen, best)
    if new_name == "cosine" and new_T == 100:
        assert torch.equal(mapped, torch.arange(1, 101))


def test_with_schedule_after_respacing_maps_to_training_steps():
    train = make_schedule("cosine", 100)
    model = ReverseProcess(lambda xt, t: torch.zeros_like(xt), train).respaced(range(10, 101, 10))
    back = model.with_schedule(model.schedule)
    assert torch.equal(back.timestep_map, model.timestep_map)


@pytest.mark.parametrize("prediction", ("eps", "x0", "v"))
def test_clip_x0(prediction):
    s = make_schedule("cosine", 100)
    x0_true = torch.tensor([[-3.0, 0.5], [2.0, -0.2], [0.9, 1.7]])
    t = torch.tensor([2, 50, 100])
    xt = xt_from_x0(s, x0_true, t, torch.randn(3, 2), 1)
    net = _oracle(s, x0_true, prediction, 1)
    model = ReverseProcess(net, s, prediction=prediction, clip_x0=1.0)
    out = model.output(xt, t)
    clipped = x0_true.clamp(-1, 1)
    torch.testing.assert_close(out.x0, clipped)
    # eps and the mean are those implied by the clipped x0
    torch.testing.assert_close(out.eps, eps_from_x0(s, xt, t, clipped, 1))
    torch.testing.assert_close(out.mean, posterior_mean(s, clipped, xt, t, 1))
    # without clipping x0 comes back unchanged
    torch.testing.assert_close(ReverseProcess(net, s, prediction=prediction).output(xt, t).x0,
                               x0_true)


def test_clip_x0_does_not_touch_mean_prediction():
    s = make_schedule("cosine", 100)
    x0_true = torch.tensor([[-3.0, 0.5]])
    t = torch.tensor([50])
    xt = xt_from_x0(s, x0_true, t, torch.randn(1, 2), 1)
    out = ReverseProcess(_oracle(s, x0_true, "mean", 1), s, prediction="mean",
                         clip_x0=1.0).output(xt, t)
    torch.testing.assert_close(out.x0, x0_true)


def test_output_indexing_and_t_validation():
    s = make_schedule("cosine", 10)
    model = ReverseProcess(lambda xt, t: torch.zeros_like(xt), s)
    out = model.output(torch.randn(4, 3), torch.full((4,), 3))
    assert isinstance(out[1:3], ReverseOutput) and out[1:3].mean.shape == (2, 3)
    for bad in (torch.full((4,), 0), torch.full((4,), 11), torch.full((4,), 3.0)):
        with pytest.raises(ValueError):
            model.output(torch.randn(4, 3), bad)


def test_prior_is_standard_normal():
    s = make_schedule("cosine", 10)
    model = ReverseProcess(lambda xt, t: xt, s, event_dims=3)
    like = torch.zeros(2, 3, 4, 4)
    p = model.prior(like)
    assert p.batch_shape == (2,) and p.event_shape == (3, 4, 4)
    torch.testing.assert_close(p.log_prob(like), torch.full((2,), -0.5 * 48 * math.log(2 * math.pi)))


# -- the parameterizations are one model ---------------------------------------------------------

def _mixture_net(schedule, prediction, variance, event_dims):
    """E[x_0 | x_t] of a two-mode mixture, coordinate by coordinate, output as ``prediction``
    would have it, with a variance output (a smooth function of x_t) when ``variance`` is
    learned."""
    data = GaussianMixture(means=[[-0.5], [0.5]], stds=[0.2, 0.2], weights=[1.0, 2.0])
    oracle = MixtureDenoiser(data, schedule)

    def net(xt, t):
        steps = t.reshape(t.shape + (1,) * event_dims).expand(xt.shape).reshape(-1)
        x0 = oracle(xt.reshape(-1, 1), steps).reshape(xt.shape)
        pred = _predict(schedule, prediction, x0, xt, t, event_dims)
        return pred if variance in FIXED_VARIANCES else (pred, 0.9 * torch.tanh(xt))
    return net


@pytest.mark.parametrize("clip_x0", (None, 0.4))
@pytest.mark.parametrize("event_dims", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("variance", VARIANCES)
def test_predictions_of_one_x0_give_one_bound(variance, decoder, event_dims, clip_x0):
    """Networks predicting eps, x0, v or the mean from one x0_hat are one model: mu_theta and
    sigma_t agree at every step, so with the same draws of x_t every term of the bound agrees to
    1e-9 nats. Clipping (active here: the modes are at -+0.5) acts on x0_hat whatever the
    prediction (the mean prediction is not clipped and left out then)."""
    s = make_schedule("cosine", 50)
    K = 17
    event = (2,) if event_dims == 1 else (1, 2, 2)
    x0 = quantize(torch.randn((64,) + event) * 0.5, K)  # on the discretized decoder's levels
    bounds = {}
    for prediction in PREDICTIONS:
        if prediction == "mean" and clip_x0 is not None:
            continue
        net = _mixture_net(s, prediction, variance, event_dims)
        model = ReverseProcess(net, s, prediction=prediction, variance=variance, decoder=decoder,
                               num_levels=K, event_dims=event_dims, clip_x0=clip_x0)
        bounds[prediction] = full_bound(model, x0, generator=torch.Generator().manual_seed(1))
    assert "v" in bounds and len(bounds) == (4 if clip_x0 is None else 3)
    ref = bounds["x0"]
    assert torch.isfinite(ref.terms).all() and ref.terms.std() > 0
    for prediction, b in bounds.items():
        torch.testing.assert_close(b.prior, ref.prior, rtol=0, atol=0)
        torch.testing.assert_close(b.terms, ref.terms, rtol=1e-9, atol=1e-9, msg=prediction)
