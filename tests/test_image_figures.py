"""The image figures: each writes a PNG on a tiny model, the arrays behind them have the right
properties (the progression ends at the sampler's x_0 and starts at the prior, an oracle recovers
x_0 from x_1, the forward frames follow q(x_t | x_0)), and wrong shapes are refused."""
import math

import pytest
import torch
from PIL import Image

from pdiff import ReverseProcess, make_schedule
from pdiff import image_figures as F
from pdiff.nets.unet import UNet
from pdiff.sampling import ancestral_sample

from tests.stats import assert_within_stderr

T, K = 10, 17


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """n images (n, C, 8, 8) on the K-level grid in [-1, 1]."""
    levels = torch.randint(0, K, (n, channels, 8, 8), generator=_gen(seed))
    return levels.double() * 2 / (K - 1) - 1


def _model(net) -> ReverseProcess:
    return ReverseProcess(net, make_schedule("linear", T), decoder="discretized", num_levels=K,
                          event_dims=3)


class EmpiricalDenoiser:
    """E[x_0 | x_t] when x_0 is uniform over ``images``: an oracle for ``prediction="x0"``."""

    def __init__(self, images: torch.Tensor, schedule):
        self.images, self.schedule = images, schedule

    def __call__(self, xt, t):
        ab = self.schedule.tensor("alpha_bar", xt.device, xt.dtype)[t][:, None]  # (B, 1)
        diff = xt.flatten(1)[:, None] - ab.sqrt()[..., None] * self.images.flatten(1)  # (B, M, D)
        w = torch.softmax(-(diff**2).sum(-1) / (2 * (1 - ab)), dim=-1)  # (B, M)
        return (w @ self.images.flatten(1)).reshape(xt.shape)


@pytest.fixture
def unet_model():
    net = UNet(1, 8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
               attention_resolutions=(), groups=4)
    return _model(net)


def _png(path, min_side: int = 80):
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
    assert min_side <= min(w, h) and max(w, h) <= 5000, f"{path}: implausible size {w} x {h}"
    return w, h


# -- the figures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_plot_image_grid(tmp_path, channels):
    _png(F.plot_image_grid(_images(10, channels), tmp_path / "nested" / "grid.png", num_levels=K,
                           title="ten images", nrow=5))


def test_plot_denoising_progression(unet_model, tmp_path):
    w, h = _png(F.plot_denoising_progression(unet_model, tmp_path / "progression.png",
                                             num_images=4, num_steps=5, num_levels=K,
                                             generator=_gen()))
    assert w > h  # five columns side by side


def test_plot_x0_predictions(unet_model, tmp_path):
    _png(F.plot_x0_predictions(unet_model, _images(3), tmp_path / "x0.png", num_levels=K,
                               generator=_gen()))
    _png(F.plot_x0_predictions(unet_model, _images(2), tmp_path / "x0_steps.png", steps=[1, T],
                               num_levels=K, generator=_gen()))


def test_plot_forward_images(tmp_path):
    schedule = make_schedule("linear", T)
    _png(F.plot_forward_images(schedule, _images(3, 3), tmp_path / "forward.png", num_levels=K,
                               generator=_gen()))


def test_plot_bound_terms_bpd(tmp_path):
    terms = torch.linspace(1.0, 0.01, T)
    with_zero = terms.clone()
    with_zero[3] = 0.0
    _png(F.plot_bound_terms_bpd({"model": terms, "with a zero": with_zero.tolist()},
                                tmp_path / "bpd.png", num_dims=64))


# -- the arrays -----------------------------------------------------------------------------------

def test_progression_ends_at_the_samplers_x0(unet_model):
    steps, frames = F.progression_frames(unet_model, num_images=3, num_steps=4, generator=_gen(5))
    assert steps[0] == T and steps[-1] == 0 and steps == sorted(steps, reverse=True)
    assert frames.shape == (len(steps), 3, 1, 8, 8)
    sampled = ancestral_sample(unet_model, (3, 1, 8, 8), generator=_gen(5))
    torch.testing.assert_close(frames[-1], sampled.x0, rtol=0, atol=0)


def test_progression_starts_at_the_prior():
    model = _model(lambda xt, t: torch.zeros_like(xt))
    steps, frames = F.progression_frames(model, num_images=64, num_steps=3, image_shape=(1, 8, 8),
                                         generator=_gen(1))
    x_T = frames[0].flatten()
    n = x_T.numel()
    assert steps[0] == T
    assert_within_stderr(x_T.mean(), 0.0, 1 / math.sqrt(n))
    assert_within_stderr(x_T.var(), 1.0, math.sqrt(2 / n))


def test_oracle_recovers_x0_from_x1():
    x0 = _images(4)
    model = _model(EmpiricalDenoiser(x0, make_schedule("linear", T))).replace(prediction="x0")
    xt, pred = F.x0_prediction_frames(model, x0, [1, T], generator=_gen(2))
    assert xt.shape == pred.shape == (2,) + x0.shape
    torch.testing.assert_close(pred[0], x0, rtol=0, atol=1e-6)
    # at t = T x_t says little about x_0: the oracle falls back towards the mean image
    assert (pred[1] - x0.mean(0)).abs().mean() < (x0 - x0.mean(0)).abs().mean()


def test_forward_frames_follow_the_marginal():
    schedule = make_schedule("linear", T)
    x0 = _images(32, 3)
    frames = F.forward_frames(schedule, x0, [0, 5, T], generator=_gen(3))
    torch.testing.assert_close(frames[0], x0, rtol=0, atol=0)
    for k, t in enumerate([5, T]):
        ab = schedule.alpha_bar[t]
        eps = ((frames[k + 1] - ab.sqrt() * x0) / (1 - ab).sqrt()).flatten()
        assert_within_stderr(eps.mean(), 0.0, 1 / math.sqrt(eps.numel()))
        assert_within_stderr(eps.var(), 1.0, math.sqrt(2 / eps.numel()))


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (2, 1, 1, 8, 8)])
def test_wrong_rank_is_refused(unet_model, tmp_path, shape):
    x = torch.zeros(shape)
    schedule = make_schedule("linear", T)
    calls = [
        lambda: F.plot_image_grid(x, tmp_path / "a.png", num_levels=K),
        lambda: F.plot_x0_predictions(unet_model, x, tmp_path / "b.png", num_levels=K),
        lambda: F.plot_forward_images(schedule, x, tmp_path / "c.png", num_levels=K),
        lambda: F.x0_prediction_frames(unet_model, x, [1]),
        lambda: F.forward_frames(schedule, x, [1]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            call()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs", [dict(num_images=0), dict(num_steps=0), dict(num_steps=-1)])
def test_bad_counts_are_refused(unet_model, tmp_path, kwargs):
    with pytest.raises(ValueError, match="num_"):
        F.plot_denoising_progression(unet_model, tmp_path / "p.png", num_levels=K, **kwargs)


def test_other_bad_arguments_are_refused(unet_model, tmp_path):
    with pytest.raises(ValueError, match="at most 8"):
        F.plot_x0_predictions(unet_model, _images(9), tmp_path / "x.png", num_levels=K)
    with pytest.raises(ValueError, match="steps"):
        F.plot_x0_predictions(unet_model, _images(2), tmp_path / "x.png", steps=[0], num_levels=K)
    with pytest.raises(ValueError, match="image_shape"):
        F.progression_frames(_model(lambda xt, t: xt), num_images=1, num_steps=2)
    with pytest.raises(ValueError, match="at least one"):
        F.plot_bound_terms_bpd({}, tmp_path / "b.png", num_dims=4)
