"""q and p_theta as ``torch.distributions`` / Pyro distribution objects."""
from .discretized import DiscretizedGaussian, quantize
from .forward import ForwardChain, q_marginal, q_posterior, q_step
from .normal import diag_normal, standard_normal
from .reverse import (DECODER_VARIANCES, DECODERS, FIXED_VARIANCES, LEARNED_VARIANCES, VARIANCES,
                      ReverseOutput, ReverseProcess)

__all__ = ["DiscretizedGaussian", "quantize", "ForwardChain", "q_marginal", "q_posterior", "q_step",
           "diag_normal", "standard_normal", "DECODER_VARIANCES", "DECODERS", "FIXED_VARIANCES",
           "LEARNED_VARIANCES", "VARIANCES", "ReverseOutput", "ReverseProcess"]
