r"""The figures of the image tutorial: sample grids, the denoising progression of ancestral
sampling, x_0 predictions from x_t, the forward process on images and the bound's terms in bits
per dimension.

Images are tensors (N, C, H, W) in [-1, 1]; they are clamped to [-1, 1] and quantized to
``num_levels`` levels (``to_uint8_grid``) for display, gray for C = 1. Each plotting function saves
a PNG as ``pdiff.figures`` does (seaborn style, Agg figures never registered with pyplot) and
returns the path. The arrays behind the pictures come from small pure functions
(``progression_frames``, ``x0_prediction_frames``, ``forward_frames``) that return tensors.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .data.images import to_uint8_grid
from .distributions.reverse import ReverseProcess
from .elbo import sample_xt
from .figures import _figure, _np, _steps
from .parameterization import xt_from_x0
from .sampling import ancestral_sample
from .schedules import NoiseSchedule


def _check_images(x: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} takes images of shape (N, C, H, W), got {shape}")
    return x


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _strip(x: torch.Tensor, num_levels: int, pad: int = 1) -> np.ndarray:
    """The images (N, C, H, W) stacked top to bottom, ``pad`` white rows between them, as uint8."""
    tiles = [to_uint8_grid(img, num_levels) for img in x]  # each (H, W) or (H, W, 3)
    gap = np.full((pad,) + tiles[0].shape[1:], 255, dtype=np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1])


def _show(ax, img: np.ndarray, title: str | None = None) -> None:
    """A uint8 image without axes, gray when it has one channel, pixels as squares."""
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize="medium")


def _columns(fig, columns: Sequence[tuple[str, np.ndarray]], nrows: int = 1) -> None:
    """Strips (title, image) drawn left to right, then row by row over ``nrows`` rows."""
    axes = fig.subplots(nrows, -(-len(columns) // nrows), squeeze=False).ravel()
    for ax, (title, img) in zip(axes, columns):
        _show(ax, img, title)
    for ax in axes[len(columns):]:
        ax.remove()


def _model_setup(model: ReverseProcess, image_shape) -> tuple[tuple[int, int, int], dict]:
    """The image shape (C, H, W) (given, or the U-Net's ``in_channels`` and ``image_size``) and the
    device and dtype of the network's parameters (torch's default dtype when it has none)."""
    net = model.net
    if image_shape is None:
        if not (hasattr(net, "in_channels") and hasattr(net, "image_size")):
            raise ValueError("pass image_shape=(C, H, W): the network does not say its image size")
        image_shape = (net.in_channels, net.image_size, net.image_size)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    param = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
    where = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    return tuple(int(s) for s in image_shape), where


# -- the arrays -----------------------------------------------------------------------------------

@torch.no_grad()
def progression_frames(model: ReverseProcess, *, num_images: int, num_steps: int,
                       image_shape: tuple[int, int, int] | None = None,
                       generator: torch.Generator | None = None
                       ) -> tuple[list[int], torch.Tensor]:
    """x_t of ``num_images`` ancestral samples (``ancestral_sample``, Ho et al. Algorithm 2) at
    ``num_steps`` evenly spaced steps from t = T down to 0 (fewer when T + 1 < num_steps).

    Returns ``(steps, frames)`` with ``frames[k]`` the batch (N, C, H, W) at ``steps[k]``; the
    last frame is the samples x_0 that the sampler returns for the same generator."""
    _check_count("num_images", num_images)
    _check_count("num_steps", num_steps)
    shape, where = _model_setup(model, image_shape)
    out = ancestral_sample(model, (num_images,) + shape, generator=generator,
                           return_trajectory=True, **where)
    steps = [0] if num_steps == 1 else _steps(None, model.num_timesteps, num_steps, low=0)[::-1]
    return steps, out.trajectory[steps]  # (num_steps, N, C, H, W)


@torch.no_grad()
def x0_prediction_frames(model: ReverseProcess, x0: torch.Tensor, steps: Sequence[int], *,
                         generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each t in ``steps`` (1..T): x_t ~ q(x_t | x_0) (eq. 4) and the model's x_0 predicted
    from it in one step, x0_theta(x_t, t). Returns ``(xt, x0_pred)``, each (S, N, C, H, W)."""
    _check_images(x0, "x0_prediction_frames")
    xts, preds = [], []
    for s in steps:
        t = torch.full(x0.shape[:1], int(s), dtype=torch.long, device=x0.device)
        xt, _ = sample_xt(model, x0, t, generator)
        xts.append(xt)
        preds.append(model.output(xt, t).x0)
    return torch.stack(xts), torch.stack(preds)


def forward_frames(schedule: NoiseSchedule, x0: torch.Tensor, steps: Sequence[int], *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4) for each t in
    ``steps`` (0..T; t = 0 gives x_0), a fresh eps per step: shape (S, N, C, H, W)."""
    _check_images(x0, "forward_frames")
    frames = []
    for s in steps:
        t = torch.full(x0.shape[:1], int(s), dtype=torch.long, device=x0.device)
        eps = torch.randn(x0.shape, dtype=x0.dtype, generator=generator).to(x0.device)
        frames.append(xt_from_x0(schedule, x0, t, eps, 3))
    return torch.stack(frames)


# -- the figures ----------------------------------------------------------------------------------

def plot_image_grid(x: torch.Tensor, path: str | Path, *, num_levels: int,
                    title: str | None = None, nrow: int | None = None) -> Path:
    """The batch ``x`` (N, C, H, W) as one grid, ``nrow`` images per row (default ceil(sqrt(N)))."""
    img = to_uint8_grid(_check_images(x, "plot_image_grid"), num_levels, nrow=nrow)
    scale = 6 / max(img.shape[:2])
    with _figure(path, (max(2.5, img.shape[1] * scale), img.shape[0] * scale + 0.6)) as fig:
        _show(fig.subplots(), img, title or f"{len(x)} images")
    return Path(path)


def plot_denoising_progression(model: ReverseProcess, path: str | Path, *, num_images: int = 8,
                               num_steps: int = 8, num_levels: int,
                               image_shape: tuple[int, int, int] | None = None,
                               generator: torch.Generator | None = None,
                               title: str | None = None) -> Path:
    """Ancestral sampling seen at ``num_steps`` steps from t = T down to 0: one row per image, one
    column per step (``progression_frames``). ``image_shape`` (C, H, W) defaults to the U-Net's."""
    steps, frames = progression_frames(model, num_images=num_images, num_steps=num_steps,
                                       image_shape=image_shape, generator=generator)
    return _step_columns(path, steps, frames, num_levels,
                         title or rf"denoising: $x_t$ of {num_images} samples from t = {steps[0]} to 0")


def plot_x0_predictions(model: ReverseProcess, x0: torch.Tensor, path: str | Path, *,
                        steps: Sequence[int] | None = None, num_levels: int,
                        generator: torch.Generator | None = None,
                        title: str | None = None) -> Path:
    """"Remove all the noise at once": for the images ``x0`` (N <= 8) and each t in ``steps``
    (default 6 evenly spaced in 1..T), x_t ~ q(x_t | x_0) (top) and the model's x0_theta(x_t, t)
    (bottom), one column per step after the data x_0 (``x0_prediction_frames``)."""
    _check_images(x0, "plot_x0_predictions")
    if len(x0) > 8:
        raise ValueError(f"plot_x0_predictions draws at most 8 images, got N = {len(x0)}")
    steps = _steps(steps, model.num_timesteps, 6, low=1)
    xt, pred = x0_prediction_frames(model, x0, steps, generator=generator)
    data = _strip(x0, num_levels)
    top = [("data $x_0$", data)] + [(f"$x_t$, t = {s}", _strip(f, num_levels))
                                    for s, f in zip(steps, xt)]
    bottom = [("data $x_0$", data)] + [(rf"$\hat x_0(x_t, t)$, t = {s}", _strip(f, num_levels))
                                       for s, f in zip(steps, pred)]
    h, w = data.shape[:2]
    with _figure(path, (1.6 * len(top) + 0.5, 2 * 1.6 * h / w + 1.2)) as fig:
        _columns(fig, top + bottom, nrows=2)
        fig.suptitle(title or r"top: $x_t \sim q(x_t | x_0)$; bottom: the model's $x_0$ "
                     "predicted from $x_t$ in one step")
    return Path(path)


def plot_forward_images(schedule: NoiseSchedule, x0: torch.Tensor, path: str | Path, *,
                        steps: Sequence[int] | None = None,
                        generator: torch.Generator | None = None, num_levels: int,
                        title: str | None = None) -> Path:
    """The forward process on the images ``x0``: one column per t in ``steps`` (default 8 evenly
    spaced in 0..T), each x_t drawn from the closed form q(x_t | x_0) (``forward_frames``)."""
    _check_images(x0, "plot_forward_images")
    steps = _steps(steps, schedule.num_timesteps, 8, low=0)
    frames = forward_frames(schedule, x0, steps, generator=generator)
    return _step_columns(path, steps, frames, num_levels,
                         title or r"forward process $q(x_t | x_0)$ on images")


def _step_columns(path, steps, frames, num_levels: int, title: str) -> Path:
    """One column per step, titled "t = ...", each a strip of the frame's images."""
    columns = [(f"t = {s}", _strip(f, num_levels)) for s, f in zip(steps, frames)]
    h, w = columns[0][1].shape[:2]
    with _figure(path, (1.2 * len(columns) + 0.5, 1.2 * h / w + 1)) as fig:
        _columns(fig, columns)
        fig.suptitle(title)
    return Path(path)


def plot_bound_terms_bpd(terms_by_label: Mapping[str, Sequence[float]], path: str | Path, *,
                         num_dims: int, title: str | None = None) -> Path:
    """The mean term of each step t = 1..T (index t - 1: L_0 at t = 1, then L_{t-1}), in nats,
    drawn in bits per dimension, nats / (D ln 2) with D = ``num_dims``, on log-log axes.

    With a discretized decoder L_0 = -log p(x_0 | x_1) is minus the log of a probability, and
    every KL term is >= 0, so all terms are >= 0. Values <= 0 (a Gaussian decoder, or round-off)
    cannot be drawn on a log scale: they are clipped to the smallest positive value shown and
    the legend says how many were."""
    if not terms_by_label:
        raise ValueError("plot_bound_terms_bpd needs at least one labelled sequence of terms")
    _check_count("num_dims", num_dims)
    with _figure(path, (8, 5)) as fig:
        ax = fig.subplots()
        for k, (label, terms) in enumerate(terms_by_label.items()):
            bpd = _np(terms).ravel() / (num_dims * math.log(2))
            bad = int((bpd <= 0).sum())
            if bad:
                floor = bpd[bpd > 0].min() if bad < len(bpd) else 1e-12
                bpd = np.maximum(bpd, floor)
                label = f"{label} ({bad} value{'s' * (bad > 1)} <= 0 clipped to {floor:.2g})"
            ax.plot(np.arange(1, len(bpd) + 1), bpd, color=f"C{k}", marker=".", label=label)
        ax.set(xscale="log", yscale="log", xlabel="step t ($L_0$ at t = 1)",
               ylabel="term of step t (bits per dimension)",
               title=title or f"terms of the bound per step, D = {num_dims}")
        ax.legend()
    return Path(path)
