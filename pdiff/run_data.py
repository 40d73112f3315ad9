"""The data a run trains and is evaluated on, toy or image, from its configuration.

Toys: fixed train and test draws by seed (``toy_split``), the exact density where known, and the
affine rescaling the model is trained in (every NLL still reported in the data's own units).
Images: the dataset's own train and test split on its K-level grid in [-1, 1], a discretized
decoder over those K levels, no rescaling and no known density.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Distribution

from .data import IMAGE_DATASETS, Rescaling, fit_rescaling, get_toy, load_images, toy_split
from .data.images import FOLDER_IMAGE_SIZE, load_bytes
from .resources import require_memory


def is_image_data(name: str) -> bool:
    return name in IMAGE_DATASETS


@dataclass
class RunData:
    """``train`` is in the model's units (rescaled); ``test`` in the data's own units.

    ``density`` is the toy's distribution (``None`` for images); ``num_levels`` K of the
    discretized decoder for images (``None`` for toys); ``labels`` of the training images if any.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    event_shape: tuple[int, ...]
    rescaling: Rescaling
    density: Distribution | None = None
    num_levels: int | None = None
    num_classes: int | None = None
    train_labels: torch.Tensor | None = None

    @property
    def is_image(self) -> bool:
        return self.num_levels is not None

    @property
    def num_dims(self) -> int:
        n = 1
        for s in self.event_shape:
            n *= s
        return n


def test_points(cfg) -> int:
    """How many test points a vector run has: ``test_size``, or fewer where a file of points
    holds fewer in its test part."""
    from .data.empirical import is_data_file

    if is_data_file(cfg.data):
        return min(cfg.test_size, len(get_toy(cfg.data).test))
    return cfg.test_size


def identity_rescaling(event_shape) -> Rescaling:
    return Rescaling(torch.zeros(event_shape, dtype=torch.float64),
                     torch.ones(event_shape, dtype=torch.float64))


def load_run_data(cfg, *, train: bool = True) -> RunData:
    """The train split (skipped when ``train`` is false) and the test split of ``cfg``'s data.

    ``cfg`` is a ``TrainConfig`` (data, seed, train_size, test_size, rescale, data_dir,
    image_size). Images: a size too large for the memory is refused up front, and so are an empty
    split and test images of another size than the training images (``DataFileError``), at
    training time rather than when the run is evaluated.
    """
    if is_image_data(cfg.data):
        size = cfg.image_size or (FOLDER_IMAGE_SIZE if cfg.data == "folder" else None)
        require_memory(load_bytes(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size),
                       f"the {cfg.data} images at {size} x {size} pixels", hint="lower --image-size")
        img = load_images(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
        dtype = torch.get_default_dtype()
        return RunData(cfg.data, img.train.to(dtype) if train else img.train[:0].to(dtype),
                       img.test.to(dtype), img.event_shape, identity_rescaling(img.event_shape),
                       num_levels=img.num_levels, num_classes=img.num_classes,
                       train_labels=img.train_labels)
    density = get_toy(cfg.data)
    dim = density.event_shape[0]
    tr, te = toy_split(density, cfg.train_size if train else 0, cfg.test_size, cfg.seed)
    rescaling = fit_rescaling(cfg.rescale, density, dim)
    return RunData(cfg.data, rescaling.apply(tr), te, (dim,), rescaling, density=density)
