"""Test policy: float64, distribution validation on, a fixed seed; tolerances in tests/stats.py."""
import os

import pytest
import torch
from torch.distributions import Distribution

# Tests use small tensors: one thread avoids stalls when the machine's two cores are shared. The
# command line sets its threads from OMP_NUM_THREADS when given (runtime.set_threads), so the
# commands the tests run in this process, and their subprocesses, keep to one as well.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_validation():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    Distribution.set_default_validate_args(True)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old_dtype)


def default_sigint() -> None:
    """``preexec_fn`` of a command a test interrupts: SIGINT delivered and handled as in a fresh
    terminal, whatever signal state the test process has (a child inherits its signal mask and an
    ignored disposition, and Python installs no KeyboardInterrupt handler where SIGINT is ignored)."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
