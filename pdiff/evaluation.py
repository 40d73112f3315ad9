"""The bound of a model on a test set, summarized in the data's own units."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .distributions.reverse import ReverseProcess
from .elbo import Bound, bits_per_dim, full_bound

# bytes of float64 the bound holds per (example, step) pair of a chunk, per data dimension: x_0,
# eps, x_t, the prediction, mu, log sigma^2, the posterior's mean and variance, the KL's temporaries
PAIR_TENSORS = 16


@dataclass
class BoundReport:
    """The bound averaged over examples, in nats summed over data dimensions.

    ``nll_nats`` = ``prior_nats`` + sum(``terms_nats``) - ``log_jacobian_nats``: the bound on
    -log p(x) in the units of the data as given (``log_jacobian_nats`` is sum_d log scale_d of the
    rescaling the model was trained in, 0 without one). ``terms_nats[t - 1]`` is the mean term of
    step t (index 0: L_0). ``entropy_nats`` is the data entropy where the density is known, else None.

    ``gap_nats`` estimates E_x[bound(x) + log p_data(x)] = nll - H. When the data's log density at
    the test points is given it is the paired mean of bound(x_i) + log p_data(x_i) over the same
    points (its standard error is that of the difference, smaller than the bound's alone when the
    bound tracks log p_data); otherwise
    nll minus the separate entropy estimate, with the two standard errors combined.
    A standard error of one example is undefined: ``None`` (``null`` in JSON), never NaN.
    """

    nll_nats: float
    nll_stderr: float | None
    bits_per_dim: float
    prior_nats: float
    terms_nats: list[float]
    log_jacobian_nats: float
    entropy_nats: float | None
    entropy_stderr: float | None
    gap_nats: float | None
    gap_stderr: float | None
    num_samples: int
    dim: int

    def to_dict(self) -> dict:
        return asdict(self)


def bound_report(model: ReverseProcess, x: torch.Tensor, *, log_jacobian: float = 0.0,
                 entropy: tuple[float | None, float | None] = (None, None),
                 data_log_prob: torch.Tensor | None = None, chunk_size: int = 16384,
                 generator: torch.Generator | None = None) -> BoundReport:
    """Evaluate every term of the bound on the (already rescaled) examples ``x``, shape (N,) + event.

    ``data_log_prob``, shape (N,): log p_data of the examples in the data's own units, for the
    paired gap estimate (see ``BoundReport``).

    Under ``torchrun`` every rank passes the same ``x`` and gets the same report: rank r evaluates
    the r-th of W contiguous slices of ``x`` and the per-example terms are gathered in order. Give
    each rank its own ``generator`` (seeded ``distributed.rank_seed(seed)``), or the slices share
    their noise draws.
    """
    bound = sharded_bound(model, x, chunk_size=chunk_size, generator=generator)
    total = bound.total.double() - log_jacobian
    n = total.shape[0]
    nll = total.mean().item()
    stderr = (total.std().item() / math.sqrt(n)) if n > 1 else None
    dim = x[0].numel()
    h, h_se = entropy
    if data_log_prob is not None:
        diff = total + data_log_prob.to(total)
        gap, gap_se = diff.mean().item(), (diff.std().item() / math.sqrt(n) if n > 1 else None)
    elif h is not None:
        gap = nll - h
        gap_se = None if stderr is None or h_se is None else math.sqrt(stderr**2 + h_se**2)
    else:
        gap = gap_se = None
    return BoundReport(nll_nats=nll, nll_stderr=stderr, bits_per_dim=bits_per_dim(nll, dim),
                       prior_nats=bound.prior.double().mean().item(),
                       terms_nats=bound.terms.double().mean(0).tolist(), log_jacobian_nats=log_jacobian,
                       entropy_nats=h, entropy_stderr=h_se, gap_nats=gap, gap_stderr=gap_se,
                       num_samples=n, dim=dim)


def sharded_bound(model: ReverseProcess, x: torch.Tensor, *, chunk_size: int = 16384,
                  generator: torch.Generator | None = None) -> Bound:
    """``full_bound`` of every example of ``x``, its examples split over the ranks under
    ``torchrun`` (``full_bound`` itself in one process)."""
    W = distributed.world_size()
    if W == 1:
        return full_bound(model, x, chunk_size=chunk_size, generator=generator)
    sizes = [len(part) for part in torch.arange(x.shape[0]).tensor_split(W)]
    start = sum(sizes[: distributed.rank()])
    mine = full_bound(model, x[start: start + sizes[distributed.rank()]], chunk_size=chunk_size,
                      generator=generator)
    return Bound(prior=distributed.all_gather_cat(mine.prior, sizes),
                 terms=distributed.all_gather_cat(mine.terms, sizes))


def bound_bytes(num_examples: int, num_timesteps: int, num_dims: int, *, chunk_size: int,
                itemsize: int = 8, net_bytes_per_pair: float = 0) -> float:
    """About the memory ``bound_report`` holds at once: the N x T terms and the N examples, one
    chunk of min(``chunk_size``, N T) (example, step) pairs (``net_bytes_per_pair`` more for the
    network's own work on each) and the schedule's tables (what a command checks up front with
    ``resources.require_memory``)."""
    pairs = min(chunk_size, num_examples * num_timesteps)
    return (itemsize * num_examples * (num_timesteps + 4 * num_dims + 8)
            + pairs * (PAIR_TENSORS * num_dims * itemsize + net_bytes_per_pair)
            + 30 * 8 * (num_timesteps + 1))


class CastNet:
    """``net`` evaluated on its inputs cast to ``dtype``, its outputs cast back to theirs.

    Around a float32 network the bound's arithmetic then runs in the dtype of the examples: in
    float64, test points whose squares overflow float32 (|x| > 1e19) still get a finite bound, as
    they do under the float64 oracle. Other attributes are the network's (``num_classes``).
    """

    def __init__(self, net, dtype: torch.dtype = torch.float32):
        self.net, self.dtype = net, dtype

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, *args, **kwargs):
        out = self.net(xt.to(self.dtype), t, *args, **kwargs)
        if isinstance(out, (tuple, list)):  # a learned variance's (mean, variance) pair
            return type(out)(o.to(xt.dtype) for o in out)
        return out.to(xt.dtype)

    def __getattr__(self, name):
        if name in ("net", "dtype"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.net, name)


def nonfinite_fields(report: dict) -> list[str]:
    """The entries of a report (``BoundReport.to_dict()`` and what is added to it) that are NaN or
    infinite; for a list, how many of its values."""
    bad = []
    for key, value in report.items():
        values = value if isinstance(value, list) else [value]
        n = sum(isinstance(v, float) and not math.isfinite(v) for v in values)
        if n:
            bad.append(key if not isinstance(value, list) else f"{key} ({n} of {len(value)})")
    return bad
