"""Test policy: float64, distribution validation on, a fixed seed; tolerances in tests/stats.py."""
import pytest
import torch
from torch.distributions import Distribution

# Tests use small tensors: one thread avoids stalls when the machine's two cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_validation():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    Distribution.set_default_validate_args(True)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old_dtype)
