"""Smoke tests of the tutorial figures: each writes a non-empty image for 1D and 2D data on tiny
settings, and refuses a dimension it cannot draw."""
import matplotlib
import pytest
import torch

from pdiff import ReverseProcess, full_bound, make_schedule
from pdiff import figures as F
from pdiff.data import get_toy
from pdiff.data.mixture import GaussianMixture
from pdiff.oracle import MixtureDenoiser

T = 10
PNG, GIF = b"\x89PNG\r\n\x1a\n", b"GIF8"


def _written(path, magic=PNG):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(magic), f"{path} is not a {magic!r} image"


def _oracle(data, schedule):
    return ReverseProcess(MixtureDenoiser(data, schedule), schedule, prediction="x0",
                          variance="fixed_large")


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("cosine", T)


@pytest.fixture(params=["mixture1d", "clusters8"])
def case(request, schedule):
    """(data distribution, 40 points from it, the oracle model)."""
    data = get_toy(request.param)
    x = data.sample((40,), generator=torch.Generator().manual_seed(0))
    return data, x, _oracle(data, schedule)


def _gen():
    return torch.Generator().manual_seed(1)


def test_plot_data(case, tmp_path):
    data, x, _ = case
    _written(F.plot_data(x, tmp_path / "nested" / "data.png", title="toy", density=data.log_prob))
    _written(F.plot_data(x, tmp_path / "plain.png"))


def test_plot_schedule(schedule, tmp_path):
    _written(F.plot_schedule(schedule, tmp_path / "schedule.png"))


def test_forward_diffusion(case, schedule, tmp_path):
    _, x, _ = case
    _written(F.plot_forward_diffusion(schedule, x, tmp_path / "forward.png", steps=[0, 3, T],
                                      num_paths=5, generator=_gen()))
    _written(F.animate_forward_diffusion(schedule, x, tmp_path / "forward.gif", frames=3,
                                         generator=_gen()), GIF)


def test_noise_prediction_and_reverse(case, tmp_path):
    _, x, model = case
    x = x.float()  # models may run in float32
    _written(F.plot_noise_prediction(model, x, tmp_path / "pred.png", steps=[1, 5, T],
                                     generator=_gen()))
    _written(F.plot_reverse(model, x, tmp_path / "reverse.png", num=20, num_paths=5,
                            generator=_gen()))


def _frames(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.n_frames


@pytest.mark.parametrize("frames, expected", [(3, 3), (40, T + 1)])  # at most one per t = 0..T
def test_animate_reverse(case, tmp_path, frames, expected):
    _, x, model = case
    path = F.animate_reverse(model, x.float(), tmp_path / "nested" / "reverse.gif", num=20,
                             frames=frames, generator=_gen())
    _written(path, GIF)
    assert _frames(path) == expected
    assert [p.name for p in path.parent.iterdir()] == ["reverse.gif"]  # no temporary file left


def test_animate_reverse_writes_whole_or_not_at_all(case, tmp_path, monkeypatch):
    """An error while the frames are drawn leaves the GIF that was there, and no partial file."""
    _, x, model = case
    path = F.animate_reverse(model, x.float(), tmp_path / "reverse.gif", num=20, frames=3,
                             generator=_gen())
    before = path.read_bytes()
    grab = F.PillowWriter.grab_frame
    calls = []

    def failing_grab(self, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return grab(self, **kwargs)

    monkeypatch.setattr(F.PillowWriter, "grab_frame", failing_grab)
    with pytest.raises(OSError, match="disk full"):
        F.animate_reverse(model, x.float(), path, num=20, frames=3, generator=_gen())
    assert len(calls) == 2
    assert path.read_bytes() == before
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        F.animate_reverse(model, x.float(), tmp_path / "new.gif", num=20, frames=3)
    assert [p.name for p in tmp_path.iterdir()] == ["reverse.gif"]


@pytest.mark.parametrize("field", F.FIELDS)
def test_noise_field(case, tmp_path, field):
    _, x, model = case
    _written(F.plot_noise_field(model, tmp_path / "field.png", dim=x.shape[1], steps=[1, T],
                                grid=5, field=field))


def test_bound_terms_and_loss_curves(case, tmp_path):
    _, x, model = case
    terms = {v: full_bound(model.replace(variance=v), x, generator=_gen()).terms.mean(0)
             for v in ("fixed_large", "fixed_small")}
    terms["positive L_0"] = torch.linspace(1.0, 0.1, T)
    _written(F.plot_bound_terms(terms, tmp_path / "terms.png", logx=True))
    steps = torch.arange(100)
    curves = {"a": (steps, torch.exp(-steps / 30.0)), "b": (steps.tolist(), [1.0] * 100)}
    _written(F.plot_loss_curves(curves, tmp_path / "loss.png", window=7, logy=True))
    _written(F.plot_loss_curves({"short": ([0, 1], [2.0, 1.0])}, tmp_path / "short.png"))


def test_samples_grid(case, tmp_path):
    data, x, _ = case
    samples = {"model a": x + 0.5, "model b": x[:10] * 2}
    _written(F.plot_samples_grid(samples, x, tmp_path / "samples.png", density=data.log_prob))
    _written(F.plot_samples_grid({"only": x}, x, tmp_path / "one.png", ncols=1))
    other = torch.zeros(5, 3 - x.shape[1])  # the other dimension
    with pytest.raises(ValueError, match=f"samples 'b' have D = {other.shape[1]}, the data D = "
                                         f"{x.shape[1]}"):
        F.plot_samples_grid({"a": x, "b": other}, x, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one labelled set"):
        F.plot_samples_grid({}, x, tmp_path / "none.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "samples.png"]


def test_no_pyplot_figure_is_left_open(tmp_path):
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    F.plot_data(torch.randn(10, 2), tmp_path / "data.png")
    assert plt.get_fignums() == []
    assert matplotlib.get_backend() == backend


@pytest.fixture
def case3d(schedule):
    data = GaussianMixture(means=[[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], stds=[0.5, 0.5],
                           weights=[1.0, 1.0])
    return data.sample((20,), generator=torch.Generator().manual_seed(0)), _oracle(data, schedule)


def test_three_dimensions_are_refused_where_they_cannot_be_drawn(case3d, schedule, tmp_path):
    x, model = case3d
    calls = {
        "plot_data": lambda: F.plot_data(x, tmp_path / "a.png"),
        "plot_forward_diffusion": lambda: F.plot_forward_diffusion(schedule, x, tmp_path / "b.png"),
        "animate_forward_diffusion": lambda: F.animate_forward_diffusion(schedule, x,
                                                                         tmp_path / "c.gif"),
        "plot_reverse": lambda: F.plot_reverse(model, x, tmp_path / "d.png", num=5),
        "animate_reverse": lambda: F.animate_reverse(model, x, tmp_path / "g.gif", num=5),
        "plot_noise_field": lambda: F.plot_noise_field(model, tmp_path / "e.png", dim=3),
        "plot_samples_grid": lambda: F.plot_samples_grid({"model": x}, x, tmp_path / "f.png"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name} draws 1D or 2D data, got D = 3"):
            call()
    assert not list(tmp_path.iterdir())
    # predicted against true noise is drawn coordinate by coordinate, so any D works
    _written(F.plot_noise_prediction(model, x, tmp_path / "pred.png", steps=[2]))


def test_bad_arguments_are_refused(case, schedule, tmp_path):
    _, x, model = case
    with pytest.raises(ValueError, match="unknown field 'grad'; valid: score, eps"):
        F.plot_noise_field(model, tmp_path / "f.png", dim=x.shape[1], field="grad")
    with pytest.raises(ValueError, match=r"steps in 1\.\.10"):
        F.plot_noise_prediction(model, x, tmp_path / "p.png", steps=[0])
    with pytest.raises(ValueError, match=r"steps in 0\.\.10"):
        F.plot_forward_diffusion(schedule, x, tmp_path / "q.png", steps=[T + 1])
    with pytest.raises(ValueError, match=r"shape \(n, D\)"):
        F.plot_data(x[:, 0], tmp_path / "r.png")
    with pytest.raises(ValueError, match="at least one"):
        F.plot_bound_terms({}, tmp_path / "s.png")
    with pytest.raises(ValueError, match="at least one"):
        F.plot_loss_curves({}, tmp_path / "t.png")
