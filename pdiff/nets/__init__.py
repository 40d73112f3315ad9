"""Networks (torch only): time embeddings, MLP denoisers and the U-Net."""
from .conditioning import GuidedNet, LabelledNet
from .embeddings import EMBEDDINGS, make_embedding
from .mlp import MeanVarianceNets, MLPDenoiser
from .unet import UNet, unet_for

__all__ = ["GuidedNet", "LabelledNet", "EMBEDDINGS", "make_embedding", "MeanVarianceNets", "MLPDenoiser", "UNet", "unet_for"]
