"""Datasets: toy distributions with exact densities (torch/numpy only)."""
from .mixture import GaussianMixture
from .rescale import RESCALINGS, Rescaling, check_data, fit_rescaling
from .toy import TOY_DATASETS, entropy_mc, get_toy, has_exact_density, toy_split

__all__ = ["GaussianMixture", "RESCALINGS", "Rescaling", "check_data", "fit_rescaling", "TOY_DATASETS", "entropy_mc", "get_toy", "has_exact_density", "toy_split"]
