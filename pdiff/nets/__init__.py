"""Networks (torch only): time embeddings, MLP denoisers, the U-Net and the feature classifier."""
from .classifier import FeatureNet
from .conditioning import GuidedNet, LabelledNet
from .embeddings import EMBEDDINGS, make_embedding
from .mlp import MeanVarianceNets, MLPDenoiser
from .unet import UNet, unet_for

__all__ = ["FeatureNet", "GuidedNet", "LabelledNet", "EMBEDDINGS", "make_embedding", "MeanVarianceNets", "MLPDenoiser", "UNet", "unet_for"]
