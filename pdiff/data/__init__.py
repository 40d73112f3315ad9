"""Datasets: toy distributions with exact densities, and image datasets (torch/numpy/PIL only)."""
from .images import IMAGE_DATASETS, DataFileError, ImageData, load_images, to_uint8_grid
from .mixture import GaussianMixture
from .rescale import RESCALINGS, Rescaling, check_data, fit_rescaling
from .toy import TOY_DATASETS, entropy_mc, get_toy, has_exact_density, toy_split

__all__ = ["IMAGE_DATASETS", "DataFileError", "ImageData", "load_images", "to_uint8_grid",
           "GaussianMixture", "RESCALINGS", "Rescaling", "check_data", "fit_rescaling", "TOY_DATASETS", "entropy_mc", "get_toy", "has_exact_density", "toy_split"]
