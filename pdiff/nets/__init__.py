"""Networks (torch only): time embeddings and MLP denoisers."""
from .embeddings import EMBEDDINGS, make_embedding
from .mlp import MeanVarianceNets, MLPDenoiser

__all__ = ["EMBEDDINGS", "make_embedding", "MeanVarianceNets", "MLPDenoiser"]
