r"""The figures of the 1D and 2D diffusion tutorials: data, schedule, forward and reverse processes,
noise predictions, the bound's terms per step and loss curves.

Every function draws one figure in the seaborn "whitegrid" style, saves it to ``path`` (parent
folders created) and returns the path. Figures are ``matplotlib.figure.Figure`` objects drawn on
the Agg canvas and never registered with pyplot: the caller's backend is left alone (a notebook
keeps its own) and no figure stays open. Points are tensors of shape
(n, D); models are ``ReverseProcess``es, run without gradients on the device and in the dtype of
the points passed (float32 is fine); results are moved to CPU/numpy to draw. A function that
cannot draw the given D raises ``ValueError``.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import matplotlib
import numpy as np
import seaborn as sns
import torch
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.figure import Figure

from .distributions.forward import ForwardChain
from .distributions.reverse import ReverseProcess
from .files import atomic_write
from .parameterization import xt_from_x0
from .sampling import ancestral_sample
from .schedules import NoiseSchedule

FIELDS = ("score", "eps")


# -- helpers --------------------------------------------------------------------------------------

@contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("notebook")}):
        yield


@contextmanager
def _figure(path: str | Path, figsize: tuple[float, float]) -> Iterator[Figure]:
    """A styled figure, saved as the PNG ``path`` when the block ends without an error."""
    with _style():
        fig = Figure(figsize=figsize, layout="constrained")
        yield fig
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"),
                     suffix=Path(path).suffix, make_parents=True)  # savefig goes by the extension


def _np(x) -> np.ndarray:
    return torch.as_tensor(x).detach().cpu().double().numpy()


def _check_dim(dim: int, who: str) -> None:
    if dim not in (1, 2):
        raise ValueError(f"{who} draws 1D or 2D data, got D = {dim}")


def _points(x: torch.Tensor, who: str) -> int:
    """D of the (n, D) points ``x``, refused unless 1 or 2."""
    if x.dim() != 2:
        raise ValueError(f"{who} takes points of shape (n, D), got shape {tuple(x.shape)}")
    _check_dim(x.shape[1], who)
    return x.shape[1]


def _steps(steps: Sequence[int] | None, T: int, num: int, low: int) -> list[int]:
    """``steps`` checked to lie in low..T, or ``num`` evenly spaced steps from low to T."""
    if steps is None:
        return sorted({int(round(s)) for s in np.linspace(low, T, num)})
    steps = [int(s) for s in steps]
    if not steps or min(steps) < low or max(steps) > T:
        raise ValueError(f"steps must be a non-empty list of steps in {low}..{T}, got {steps}")
    return steps


def _forward_trajectory(schedule: NoiseSchedule, x0: torch.Tensor,
                        generator: torch.Generator | None) -> np.ndarray:
    """x_0, x_1, ..., x_T of one forward chain per point, shape (T + 1, n, D)."""
    xs = ForwardChain(schedule, x0).sample(generator=generator)  # (n, T, D)
    return _np(torch.cat([x0[:, None], xs], dim=1).transpose(0, 1))


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    top = max(np.abs(a).max() for a in arrays) * 1.1
    return -top, top


def _panels(fig: Figure, num: int, ncols: int = 3) -> list:
    """``num`` axes in rows of ``ncols`` (not shared: shared equal-aspect axes crowd the layout)."""
    axes = fig.subplots(-(-num // ncols), min(num, ncols), squeeze=False).ravel()
    for ax in axes[num:]:
        ax.remove()
    return list(axes[:num])


def _legend_below(fig: Figure) -> None:
    """One legend for the whole figure under the axes, with opaque, enlarged markers."""
    legend = fig.legend(loc="outside lower center", ncols=3, markerscale=4)
    for handle in legend.legend_handles:
        handle.set_alpha(1)


def _scatter(ax, x: np.ndarray, lim: tuple[float, float], **kwargs) -> None:
    ax.scatter(x[:, 0], x[:, 1], **{"s": 4, "alpha": 0.5, "linewidths": 0, **kwargs})
    ax.set(xlim=lim, ylim=lim, aspect="equal", xlabel="$x_1$", ylabel="$x_2$")


def _paths(ax, traj: np.ndarray, num_paths: int, colour_by: np.ndarray) -> int:
    """Lines x_t against t = 0..T for the first ``num_paths`` points of ``traj`` (T + 1, n, 1),
    coloured by ``colour_by`` on a diverging scale centred at 0; returns how many were drawn."""
    values = colour_by[:num_paths]
    colors = matplotlib.colormaps["coolwarm"](0.5 + 0.5 * values / max(np.abs(values).max(), 1e-12))
    for i, c in enumerate(colors):
        ax.plot(np.arange(len(traj)), traj[:, i, 0], color=c, lw=0.7, alpha=0.7)
    return len(colors)


def _standard_normal(ax, lim: tuple[float, float]) -> None:
    grid = np.linspace(*lim, 300)
    ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")


# -- data and schedule ----------------------------------------------------------------------------

def plot_data(x: torch.Tensor, path: str | Path, *, title: str = "data",
              density: Callable[[torch.Tensor], torch.Tensor] | None = None,
              bins: int = 80) -> Path:
    """Histogram (1D) or scatter (2D) of the points ``x``, with the exact density p(x) as a line
    (1D) or contours (2D) when ``density`` (a ``log_prob``) is given."""
    dim, pts = _points(x, "plot_data"), _np(x)
    lim, label = _limits(pts), f"samples (n = {len(pts)})"
    with _figure(path, (6, 4) if dim == 1 else (5.5, 6)) as fig:
        ax = fig.subplots()
        if dim == 1:
            ax.hist(pts[:, 0], bins=bins, density=True, alpha=0.6, label=label)
            if density is not None:
                grid = np.linspace(*lim, 400)
                ax.plot(grid, _np(density(torch.from_numpy(grid[:, None])).exp()), "k",
                        label="exact density p(x)")
            ax.set(xlabel="x", ylabel="density", xlim=lim)
            ax.legend()
        else:
            _scatter(ax, pts, lim, label=label)
            if density is not None:
                gx, gy = np.meshgrid(np.linspace(*lim, 300), np.linspace(*lim, 300))
                log_p = density(torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], -1)))
                ax.contour(gx, gy, _np(log_p.exp()).reshape(gx.shape), levels=5, cmap="viridis",
                           linewidths=0.8)
                ax.plot([], [], color=matplotlib.colormaps["viridis"](0.5),
                        label="exact density p(x), contours")
            _legend_below(fig)
        ax.set_title(title)
    return Path(path)


def plot_schedule(schedule: NoiseSchedule, path: str | Path, *,
                  title: str = "noise schedule") -> Path:
    r"""beta_t, beta_tilde_t, alpha_bar_t, sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) and
    log SNR_t = log(alpha_bar_t / (1 - alpha_bar_t)) against t = 1..T, one panel each."""
    T = schedule.num_timesteps
    ab = _np(schedule.alpha_bar[1:])
    beta_tilde = _np(schedule.beta_tilde[1:])
    beta_tilde[0] = np.nan  # beta_tilde_1 = 0, off a log scale
    panels = [
        (r"$\beta_t$", _np(schedule.betas[1:]), "log"),
        (r"$\tilde\beta_t$ (posterior variance; $\tilde\beta_1 = 0$)", beta_tilde, "log"),
        (r"$\bar\alpha_t$", ab, "linear"),
        (r"$\sqrt{\bar\alpha_t}$ (signal scale)", np.sqrt(ab), "linear"),
        (r"$\sqrt{1 - \bar\alpha_t}$ (noise scale)", np.sqrt(1 - ab), "linear"),
        (r"$\log \mathrm{SNR}_t = \log \bar\alpha_t / (1 - \bar\alpha_t)$", np.log(ab / (1 - ab)),
         "linear"),
    ]
    with _figure(path, (14, 7)) as fig:
        axes = fig.subplots(2, 3, sharex=True)
        for ax, (name, values, scale) in zip(axes.flat, panels):
            ax.plot(np.arange(1, T + 1), values)
            ax.set(title=name, yscale=scale)
        for ax in axes[-1]:
            ax.set_xlabel("step t")
        fig.suptitle(f"{title}, T = {T}")
    return Path(path)


def plot_continuous_limit(path: str | Path, *, schedules: Sequence[str] = ("linear", "cosine"),
                          num_timesteps: int = 1000, u_first: float = 1e-3,
                          data_std: float = 0.5) -> Path:
    """The discrete T'-step bound converging to the continuous-time bound (VDM sec. 4) as T' grows,
    for the exact denoiser on N(mu, ``data_std``^2) data, in closed form: per schedule, the
    diffusion part of the bound (nats per dimension) against T' with the continuous value, and the
    gap on log-log axes beside a 1/T' line. The chain's ends are fixed (decoder at ``u_first``,
    prior at u = 1), so L_0 and L_T are the same for every T' and left out."""
    from .continuous import (DiscreteLogSNR, discretize, gaussian_discrete_diffusion,
                             gaussian_mmse_integral)
    from .schedules import make_schedule

    steps = np.unique(np.geomspace(2, 20000, 30).round().astype(int))
    with _figure(path, (12, 4.5)) as fig:
        left, right = fig.subplots(1, 2)
        for k, name in enumerate(schedules):
            lam = DiscreteLogSNR(make_schedule(name, num_timesteps, warn=False))
            limit = gaussian_mmse_integral(lam, u_first, data_std**2)
            values = np.array([gaussian_discrete_diffusion(discretize(lam, int(n), u_first),
                                                           data_std**2) for n in steps])
            color = f"C{k}"
            left.plot(steps, values, "o-", ms=3, color=color, label=f"{name}: T'-step bound")
            left.axhline(limit, color=color, ls="--", label=f"{name}: continuous, {limit:.4f}")
            right.plot(steps, values - limit, "o-", ms=3, color=color, label=name)
        right.plot(steps, (values - limit)[-1] * steps[-1] / steps, "k:", label="1 / T'")
        left.set(xscale="log", yscale="log", xlabel="steps T'",
                 ylabel="diffusion terms (nats / dim)",
                 title="discrete bound -> continuous bound")
        right.set(xscale="log", yscale="log", xlabel="steps T'",
                  ylabel="discrete - continuous (nats / dim)", title="the gap")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
        fig.suptitle(f"exact denoiser, N(mu, {data_std}^2) data; log-SNR of the {num_timesteps}-step "
                     f"schedules, decoder at u = {u_first:g}")
    return Path(path)


# -- the forward process --------------------------------------------------------------------------

def _forward_1d(fig: Figure, traj: np.ndarray, steps: list[int], num_paths: int) -> None:
    axes = fig.subplot_mosaic([["paths"] * len(steps), list(range(len(steps)))])
    lim = _limits(traj[steps])
    drawn = _paths(axes["paths"], traj, num_paths, colour_by=traj[0, :, 0])
    axes["paths"].vlines(steps, *lim, colors="k", linestyles=":", lw=1)
    axes["paths"].set(xlabel="step t", ylabel="$x_t$", xlim=(0, len(traj) - 1), ylim=lim,
                      title=f"forward chains $q(x_{{1:T}} | x_0)$ of {drawn} points, coloured by $x_0$")
    for k, s in enumerate(steps):
        axes[k].hist(traj[s, :, 0], bins=60, range=lim, density=True, alpha=0.6,
                     label=f"$x_t$ of {traj.shape[1]} points")
        _standard_normal(axes[k], lim)
        axes[k].set(title=f"t = {s}", xlabel="$x_t$", xlim=lim)
    axes[0].set_ylabel("density")
    axes[0].legend()


def _forward_2d(fig: Figure, traj: np.ndarray, steps: list[int]) -> None:
    lim, angle = _limits(traj[steps]), np.arctan2(traj[0, :, 1], traj[0, :, 0])
    for ax, s in zip(_panels(fig, len(steps)), steps):
        _scatter(ax, traj[s], lim, c=angle, cmap="hsv")
        ax.set_title(f"t = {s}")
        ax.label_outer()
    fig.suptitle(r"forward process $q(x_t | x_0)$, points coloured by the angle of $x_0$")


def plot_forward_diffusion(schedule: NoiseSchedule, x0: torch.Tensor, path: str | Path, *,
                           steps: Sequence[int] | None = None, num_paths: int = 50,
                           generator: torch.Generator | None = None) -> Path:
    """Forward chains x_0 -> x_T of the points ``x0`` (``ForwardChain``). 1D: ``num_paths``
    trajectories x_t over t, and histograms of x_t of all points at ``steps`` (default 4 evenly
    spaced in 0..T) against N(0, 1); 2D: scatter snapshots at ``steps`` (default 6)."""
    dim, T = _points(x0, "plot_forward_diffusion"), schedule.num_timesteps
    traj = _forward_trajectory(schedule, x0, generator)
    steps = _steps(steps, T, 4 if dim == 1 else 6, low=0)
    with _figure(path, (3.2 * len(steps), 7) if dim == 1
                 else (10, 3.6 * -(-len(steps) // 3))) as fig:
        if dim == 1:
            _forward_1d(fig, traj, steps, num_paths)
        else:
            _forward_2d(fig, traj, steps)
    return Path(path)


def _save_frames(fig, ax, path_gif, fps: int, steps, artist, frames, title) -> None:
    """An animated GIF of ``fig``, written atomically: frame k shows ``frames[k]`` (1D: the
    histogram heights of step ``steps[k]``, set on the ``stairs`` ``artist``) or
    ``frames[steps[k]]`` (2D: the points of that step, on the scatter ``artist``), titled
    ``title(steps[k])``."""
    def draw(k: int) -> None:
        if hasattr(artist, "set_offsets"):
            artist.set_offsets(frames[steps[k]])
        else:
            artist.set_data(frames[k])
        ax.set_title(title(steps[k]))

    animation = FuncAnimation(fig, draw, frames=len(steps))
    atomic_write(path_gif, lambda tmp: animation.save(tmp, writer=PillowWriter(fps=fps), dpi=80),
                 suffix=Path(path_gif).suffix, make_parents=True)


def animate_forward_diffusion(schedule: NoiseSchedule, x0: torch.Tensor, path_gif: str | Path, *,
                              frames: int = 40, fps: int = 10,
                              generator: torch.Generator | None = None) -> Path:
    """An animated GIF of x_t for t from 0 to T in ``frames`` evenly spaced steps: a histogram
    against N(0, 1) (1D) or a scatter plot (2D) of the points' forward chains."""
    dim, T = _points(x0, "animate_forward_diffusion"), schedule.num_timesteps
    traj = _forward_trajectory(schedule, x0, generator)
    steps, lim = _steps(None, T, max(frames, 2), low=0), _limits(traj)
    with _style():
        fig = Figure(figsize=(5, 4) if dim == 1 else (5, 5), layout="constrained")
        ax = fig.subplots()
        if dim == 1:
            edges = np.linspace(*lim, 61)
            heights = [np.histogram(traj[s, :, 0], edges, density=True)[0] for s in steps]
            bars = ax.stairs(heights[0], edges, fill=True, alpha=0.6)
            _standard_normal(ax, lim)
            ax.set(xlim=lim, ylim=(0, 1.05 * max(h.max() for h in heights)), xlabel="$x_t$",
                   ylabel="density")
            ax.legend(loc="upper right")
        else:
            points = ax.scatter(traj[0, :, 0], traj[0, :, 1], s=4, alpha=0.5, linewidths=0)
            ax.set(xlim=lim, ylim=lim, aspect="equal", xlabel="$x_1$", ylabel="$x_2$")

        _save_frames(fig, ax, path_gif, fps, steps, bars if dim == 1 else points,
                     heights if dim == 1 else traj,
                     lambda t: f"forward process $q(x_t | x_0)$, t = {t} of {T}")
    return Path(path_gif)


# -- the model ------------------------------------------------------------------------------------

@torch.no_grad()
def plot_noise_prediction(model: ReverseProcess, x0: torch.Tensor, path: str | Path, *,
                          steps: Sequence[int] | None = None, max_points: int = 2000,
                          generator: torch.Generator | None = None) -> Path:
    """Predicted noise eps_theta(x_t, t) against the true eps of x_t = sqrt(alpha_bar_t) x_0 +
    sqrt(1 - alpha_bar_t) eps at ``steps`` (default 4 evenly spaced in 1..T), each coordinate one
    point (at most ``max_points`` drawn), with the MSE over all; x0 may have any event shape."""
    steps = _steps(steps, model.num_timesteps, 4, low=1)
    batch_shape = x0.shape[: x0.dim() - model.event_dims]
    with _figure(path, (3.6 * len(steps), 4.2)) as fig:
        for ax, s in zip(_panels(fig, len(steps), ncols=len(steps)), steps):
            eps = torch.randn(x0.shape, dtype=x0.dtype, generator=generator).to(x0.device)
            t = torch.full(batch_shape, s, dtype=torch.long, device=x0.device)
            pred = model.output(xt_from_x0(model.schedule, x0, t, eps, model.event_dims), t).eps
            eps, pred = _np(eps).ravel(), _np(pred).ravel()
            ax.scatter(eps[:max_points], pred[:max_points], s=4, alpha=0.4, linewidths=0)
            lim = _limits(eps, pred)
            ax.plot(lim, lim, "k--", lw=1, label="y = x")
            ax.set(title=f"t = {s}, MSE = {np.mean((pred - eps) ** 2):.3g}",
                   xlabel=r"true noise $\epsilon$", xlim=lim, ylim=lim, aspect="equal")
        fig.axes[0].set_ylabel(r"predicted $\hat\epsilon_\theta(x_t, t)$")
        fig.axes[0].legend(loc="upper left")
        fig.suptitle(r"noise prediction on $x_t = \sqrt{\bar\alpha_t}\, x_0 + "
                     r"\sqrt{1 - \bar\alpha_t}\, \epsilon$, every coordinate a point")
    return Path(path)


def _reverse_1d(fig: Figure, traj: np.ndarray, data: np.ndarray, num_paths: int) -> None:
    ax, hist = fig.subplots(1, 2, sharey=True, width_ratios=(3, 1))
    lim, samples = _limits(traj, data), traj[0]
    drawn = _paths(ax, traj, num_paths, colour_by=samples[:, 0])
    ax.set(xlim=(len(traj) - 1, 0), ylim=lim, xlabel="step t (sampling runs from T to 0)",
           ylabel="$x_t$",
           title=rf"reverse chains $p_\theta(x_{{0:T}})$ of {drawn} samples, coloured by $x_0$")
    kw = dict(bins=60, range=lim, density=True, orientation="horizontal", alpha=0.5)
    hist.hist(data[:, 0], label=f"data (n = {len(data)})", **kw)
    hist.hist(samples[:, 0], label=f"samples $x_0$ (n = {len(samples)})", **kw)
    hist.set(xlabel="density", title="$x_0$: samples and data")


def _reverse_2d(fig: Figure, traj: np.ndarray, data: np.ndarray, steps: list[int]) -> None:
    lim, samples = _limits(traj, data), traj[0]
    axes = _panels(fig, len(steps) + 1)
    for ax, s in zip(axes, steps):
        _scatter(ax, traj[s], lim)
        ax.set_title(f"t = {s}")
    _scatter(axes[-1], data, lim, color="0.6", label=f"data (n = {len(data)})")
    _scatter(axes[-1], samples, lim, color="C3", label=f"samples $x_0$ (n = {len(samples)})")
    axes[-1].set_title("samples over data")
    for ax in axes:
        ax.label_outer()
    fig.suptitle(rf"reverse process $p_\theta$: the samples' $x_t$ from t = {len(traj) - 1} to 0")


def plot_reverse(model: ReverseProcess, data_x: torch.Tensor, path: str | Path, *,
                 num: int = 500, num_paths: int = 50, steps: Sequence[int] | None = None,
                 generator: torch.Generator | None = None) -> Path:
    """``num`` ancestral samples (``ancestral_sample``) against the data ``data_x``. 1D: ``num_paths``
    reverse trajectories x_t from t = T down to 0, and histograms of samples and data; 2D: the
    samples' x_t at ``steps`` (default 5 evenly spaced in T..1), then samples over data."""
    dim, T = _points(data_x, "plot_reverse"), model.num_timesteps
    out = ancestral_sample(model, (num, dim), generator=generator, device=data_x.device,
                           dtype=data_x.dtype, return_trajectory=True)
    traj, data = _np(out.trajectory), _np(data_x)  # traj: (T + 1, num, D), index t holds x_t
    steps = _steps(steps, T, 5, low=1)[::-1]
    rows = -(-(len(steps) + 1) // 3)
    with _figure(path, (12, 4.5) if dim == 1 else (10, 3.6 * rows + 0.5)) as fig:
        if dim == 1:
            _reverse_1d(fig, traj, data, num_paths)
        else:
            _reverse_2d(fig, traj, data, steps)
        _legend_below(fig)
    return Path(path)


@torch.no_grad()
def animate_reverse(model: ReverseProcess, data_x: torch.Tensor, path_gif: str | Path, *,
                    num: int = 1000, frames: int = 40, fps: int = 10,
                    generator: torch.Generator | None = None) -> Path:
    """An animated GIF of ``num`` ancestral samples (``ancestral_sample``) going from x_T to x_0 in
    ``frames`` evenly spaced steps (at most T + 1), the data ``data_x`` faintly behind them: a
    scatter plot (2D) or a histogram of x_t over the data's (1D), each frame labelled with its t.
    The axes are fixed, holding the data and all but the outermost 0.1% of the samples'
    coordinates: near t = T an eps-predicting model can throw a few points far out (its x_0 is off
    by the noise's error times sqrt((1 - alpha_bar_t) / alpha_bar_t)), and they would shrink
    every other frame."""
    dim, T = _points(data_x, "animate_reverse"), model.num_timesteps
    out = ancestral_sample(model, (num, dim), generator=generator, device=data_x.device,
                           dtype=data_x.dtype, return_trajectory=True)
    traj, data = _np(out.trajectory), _np(data_x)  # traj: (T + 1, num, D), index t holds x_t
    steps = _steps(None, T, max(frames, 2), low=0)[::-1]  # T first, 0 last
    lim = _limits(data, np.quantile(np.abs(traj[steps]), 0.999, keepdims=True))
    with _style():
        fig = Figure(figsize=(5, 4) if dim == 1 else (5, 5), layout="constrained")
        ax = fig.subplots()
        if dim == 1:
            edges = np.linspace(*lim, 61)
            heights = [np.histogram(traj[s, :, 0], edges, density=True)[0] for s in steps]
            data_hist = np.histogram(data[:, 0], edges, density=True)[0]
            ax.stairs(data_hist, edges, fill=True, color="0.8", label=f"data (n = {len(data)})")
            bars = ax.stairs(heights[0], edges, fill=True, alpha=0.6, color="C3",
                             label=f"samples $x_t$ (n = {num})")
            ax.set(xlim=lim, ylim=(0, 1.05 * max(data_hist.max(), *(h.max() for h in heights))),
                   xlabel="$x_t$", ylabel="density")
        else:
            _scatter(ax, data, lim, color="0.75", alpha=0.3, label=f"data (n = {len(data)})")
            points = ax.scatter(traj[steps[0], :, 0], traj[steps[0], :, 1], s=4, alpha=0.6,
                                linewidths=0, color="C3", label=f"samples $x_t$ (n = {num})")
        _legend_below(fig)

        _save_frames(fig, ax, path_gif, fps, steps, bars if dim == 1 else points,
                     heights if dim == 1 else traj,
                     lambda t: rf"reverse process $p_\theta$, t = {t} of {T}")
    return Path(path_gif)


def plot_samples_grid(samples_by_label: Mapping[str, torch.Tensor], data_x: torch.Tensor,
                      path: str | Path, *, ncols: int = 3, bins: int = 60,
                      density: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      title: str = "samples of each model against the data") -> Path:
    """One panel per labelled set of samples (n, D), each against the data ``data_x``: overlaid
    histograms (1D, with the exact density as a line when ``density``, a ``log_prob``, is given)
    or samples scattered over the data (2D). All panels share the same limits."""
    if not samples_by_label:
        raise ValueError("plot_samples_grid needs at least one labelled set of samples")
    dim = _points(data_x, "plot_samples_grid")
    for label, x in samples_by_label.items():
        if _points(x, "plot_samples_grid") != dim:
            raise ValueError(f"samples {label!r} have D = {x.shape[-1]}, the data D = {dim}")
    data = _np(data_x)
    sets = {k: _np(v) for k, v in samples_by_label.items()}
    lim = _limits(data)
    ncols = min(ncols, len(sets))
    rows = -(-len(sets) // ncols)
    with _figure(path, (4.2 * ncols, 3.2 * rows + 0.6) if dim == 1
                 else (3.8 * ncols, 3.8 * rows + 0.6)) as fig:
        axes = _panels(fig, len(sets), ncols)
        for k, (ax, (label, x)) in enumerate(zip(axes, sets.items())):
            first = {"label": f"data (n = {len(data)})"} if k == 0 else {}
            if dim == 1:
                kw = dict(bins=bins, range=lim, density=True, alpha=0.5)
                ax.hist(data[:, 0], color="0.6", **kw, **first)
                ax.hist(np.clip(x[:, 0], *lim), color="C3", **kw,
                        **({"label": f"samples (n = {len(x)})"} if k == 0 else {}))
                if density is not None:
                    grid = np.linspace(*lim, 400)
                    ax.plot(grid, _np(density(torch.from_numpy(grid[:, None])).exp()), "k", lw=1,
                            **({"label": "exact density p(x)"} if k == 0 else {}))
                ax.set(xlim=lim, xlabel="x")
            else:
                _scatter(ax, data, lim, color="0.6", **first)
                _scatter(ax, x, lim, color="C3",
                         **({"label": f"samples (n = {len(x)})"} if k == 0 else {}))
            ax.set_title(label, fontsize="medium")
            if dim == 2:
                ax.label_outer()
        fig.suptitle(title)
        _legend_below(fig)
    return Path(path)


def _field_1d(fig: Figure, predict, steps: list[int], lim: float, name: str) -> None:
    ax = fig.subplots()
    x = np.linspace(-lim, lim, 400)[:, None]
    for s, c in zip(steps, matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(steps)))):
        ax.plot(x[:, 0], predict(x, s)[:, 0], color=c, label=f"t = {s}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="$x_t = x$", ylabel=name, xlim=(-lim, lim), title="predicted noise by step")
    ax.legend()


def _field_2d(fig: Figure, predict, steps: list[int], lim: float, grid: int, name: str) -> None:
    gx, gy = np.meshgrid(np.linspace(-lim, lim, grid), np.linspace(-lim, lim, grid))
    x = np.stack([gx.ravel(), gy.ravel()], -1)
    fields = [predict(x, s) for s in steps]
    sizes = [np.linalg.norm(v, axis=1) for v in fields]
    norm = matplotlib.colors.Normalize(0, max(size.max() for size in sizes))
    axes = _panels(fig, len(steps), ncols=len(steps))
    for ax, s, v, size in zip(axes, steps, fields, sizes):
        u = v / np.maximum(size, 1e-12)[:, None]
        arrows = ax.quiver(x[:, 0], x[:, 1], u[:, 0], u[:, 1], size, cmap="viridis", norm=norm,
                           angles="xy", scale_units="xy", scale=grid / (1.6 * lim), width=0.006)
        ax.grid(False)
        ax.set(title=f"t = {s}", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal",
               xlabel="$x_1$", ylabel="$x_2$")
        ax.label_outer()
    # a colourbar for all axes breaks the layout of equal-aspect panels: attach it to the last
    fig.colorbar(arrows, ax=axes[-1], shrink=0.8, label=r"$|\hat\epsilon_\theta(x, t)|$")
    fig.suptitle(f"{name}, arrows of unit length coloured by size")


@torch.no_grad()
def plot_noise_field(model: ReverseProcess, path: str | Path, *, dim: int,
                     steps: Sequence[int] | None = None, lim: float = 5.0, grid: int = 21,
                     field: str = "score", dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> Path:
    r"""The predicted noise eps_theta(x, t) over the box [-lim, lim]^dim at ``steps`` (default 4
    evenly spaced in 1..T). ``field="score"`` draws -eps_theta, the direction of the score
    grad log q(x_t) = -eps / sqrt(1 - alpha_bar_t); ``"eps"`` draws eps_theta. 2D: unit arrows on a
    ``grid`` x ``grid`` lattice coloured by |eps_theta|, one panel per step; 1D: one curve per step.
    ``dim`` is D; the model runs on ``device`` in ``dtype`` (default: torch's default dtype)."""
    _check_dim(dim, "plot_noise_field")
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; valid: {', '.join(FIELDS)}")
    steps = _steps(steps, model.num_timesteps, 4, low=1)
    sign = -1.0 if field == "score" else 1.0
    name = r"$-\hat\epsilon_\theta(x, t)$ (score direction)" if field == "score" \
        else r"$\hat\epsilon_\theta(x, t)$"

    def predict(x: np.ndarray, s: int) -> np.ndarray:
        xt = torch.as_tensor(x, dtype=dtype or torch.get_default_dtype(), device=device)
        t = torch.full(xt.shape[:1], s, dtype=torch.long, device=xt.device)
        return sign * _np(model.output(xt, t).eps)

    with _figure(path, (7, 4.5) if dim == 1 else (4 * len(steps) + 1, 4.4)) as fig:
        if dim == 1:
            _field_1d(fig, predict, steps, lim, name)
        else:
            _field_2d(fig, predict, steps, lim, grid, name)
    return Path(path)


# -- objectives and training ----------------------------------------------------------------------

def plot_bound_terms(terms_by_label: Mapping[str, Sequence[float]], path: str | Path, *,
                     ylabel: str = "nats", logx: bool = False,
                     title: str = "terms of the bound per step") -> Path:
    """The term of each step t = 1..T of each labelled bound (index t - 1 of each sequence: L_0 at
    index 0, drawn at t = 1, then L_{t-1}) on a log scale. L_0 = -log p(x_0 | x_1) is often
    negative for continuous data, off a log scale: its value is in the legend, and it is drawn
    as a marker when positive."""
    if not terms_by_label:
        raise ValueError("plot_bound_terms needs at least one labelled sequence of terms")
    with _figure(path, (8, 5)) as fig:
        ax = fig.subplots()
        for k, (label, terms) in enumerate(terms_by_label.items()):
            v = _np(terms).ravel()
            ax.plot(np.arange(2, len(v) + 1), np.where(v[1:] > 0, v[1:], np.nan), color=f"C{k}",
                    label=f"{label} ($L_0$ = {v[0]:.3g} {ylabel})")
            if v[0] > 0:
                ax.plot(1, v[0], "o", color=f"C{k}")
        ax.set(yscale="log", xscale="log" if logx else "linear", xlabel="step t",
               ylabel=f"term of step t ({ylabel})", title=title)
        ax.legend()
    return Path(path)


def plot_loss_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                     path: str | Path, *, window: int | None = None, ylabel: str = "loss",
                     logy: bool = False, title: str = "training loss") -> Path:
    """Each labelled ``(steps, losses)`` curve raw (faint) and as a trailing moving average over
    ``window`` points (default: a fiftieth of the curve, at least 1)."""
    if not curves:
        raise ValueError("plot_loss_curves needs at least one labelled (steps, losses) curve")
    with _figure(path, (8, 5)) as fig:
        ax = fig.subplots()
        for k, (label, (steps, losses)) in enumerate(curves.items()):
            steps, losses = _np(steps).ravel(), _np(losses).ravel()
            w = min(len(losses), window or max(1, len(losses) // 50))
            ax.plot(steps, losses, color=f"C{k}", lw=0.6, alpha=0.25)
            ax.plot(steps[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"),
                    color=f"C{k}", label=label if w == 1 else f"{label} (moving average over {w} points)")
        ax.set(xlabel="training step", ylabel=ylabel, yscale="log" if logy else "linear",
               title=title)
        ax.legend()
    return Path(path)
