"""A user's own points as a dataset: a ``.npy``/``.csv``/``.txt`` file of N rows, D columns.

The file's rows are split once into a training part and a test part (a fixed permutation, the
last ``TEST_FRACTION`` of it the test part, as image datasets have a test split of their own), the
same for every run and seed. ``sample`` draws training rows with replacement (what the rescaling
is fitted on: test points never shape the model's units); the density is unknown, so runs on a file
report bounds and ODE likelihoods but no entropy gap. NLLs are in the data's own units.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.distributions import Distribution, constraints

from .arrays import ARRAY_SUFFIXES, load_array

TEST_FRACTION = 0.1
_SPLIT_SEED = 20261203


def is_data_file(name: str) -> bool:
    """Whether a ``--data`` value names a file of points (by its suffix)."""
    return isinstance(name, str) and name.lower().endswith(ARRAY_SUFFIXES)


class EmpiricalData(Distribution):
    """The rows of the file ``path`` (float64), split into ``train`` and ``test`` parts."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_exact_density = False

    def __init__(self, path: str | Path):
        x = load_array(path)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"--data {str(path)!r} holds {n} row(s); a training and a test split "
                             "need at least 2")
        bad = ~torch.isfinite(x).all(1)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"--data {str(path)!r} has non-finite values (NaN or inf) in "
                             f"{int(bad.sum())} rows, first rows {rows}")
        self.path = str(path)
        self.sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
        num_test = max(1, round(n * TEST_FRACTION))
        self.train, self.test = x[order[:-num_test]], x[order[-num_test:]]
        super().__init__(event_shape=torch.Size([x.shape[1]]), validate_args=False)

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        """Training rows drawn with replacement."""
        shape = torch.Size(sample_shape)
        idx = torch.randint(len(self.train), shape, generator=generator)
        return self.train[idx].to(torch.get_default_dtype())

    def split(self, num_train: int, num_test: int) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``num_train`` training rows and ``num_test`` test rows, the same every time."""
        dtype = torch.get_default_dtype()
        return self.train[:num_train].to(dtype), self.test[:num_test].to(dtype)

    def log_prob(self, value):
        raise NotImplementedError(f"the density of the points in {self.path!r} is unknown")
