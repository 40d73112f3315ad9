"""q and p_theta as ``torch.distributions`` / Pyro distribution objects."""
from .discretized import DiscretizedGaussian, quantize
from .forward import ForwardChain, q_marginal, q_posterior, q_step
from .normal import DiagNormal, diag_normal, standard_normal
from .reverse import (DECODER_VARIANCES, DECODERS, FIXED_VARIANCES, LEARNED_VARIANCES, VARIANCES,
                      ReverseOutput, ReverseProcess)
from .reverse_chain import ReverseChain, reverse_log_prob

__all__ = ["DiscretizedGaussian", "quantize", "ForwardChain", "q_marginal", "q_posterior", "q_step",
           "DiagNormal", "diag_normal", "standard_normal", "DECODER_VARIANCES", "DECODERS", "FIXED_VARIANCES",
           "LEARNED_VARIANCES", "VARIANCES", "ReverseOutput", "ReverseProcess", "ReverseChain",
           "reverse_log_prob"]
