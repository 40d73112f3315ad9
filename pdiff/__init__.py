"""pdiff: DDPM-style diffusion models as explicit probability distributions."""
from .distributions import ReverseProcess
from .elbo import Bound, full_bound, sampled_bound, trajectory_bound
from .schedules import NoiseSchedule, make_schedule

__version__ = "0.1.0"
__all__ = ["ReverseProcess", "Bound", "full_bound", "sampled_bound", "trajectory_bound",
           "NoiseSchedule", "make_schedule"]
