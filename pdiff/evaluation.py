"""The bound of a model on a test set, summarized in the data's own units."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .distributions.reverse import ReverseProcess
from .elbo import Bound, bits_per_dim, full_bound, nll_summary, stratified_bound
from .resources import GiB, available_memory

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

    ``estimator``: ``all_terms`` (every term of every example, ``full_bound``) or ``stratified``
    (``timestep_samples`` terms per example, ``stratified_bound``: unbiased, its sampling of t
    included in ``nll_stderr``; no per-step ``terms_nats``, None). ``chunk_size``: the (example,
    step) pairs per network call, chosen from the memory budget unless given. ``wall_seconds``:
    the estimator's wall time.

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
    terms_nats: list[float] | None
    log_jacobian_nats: float
    entropy_nats: float | None
    entropy_stderr: float | None
    gap_nats: float | None
    gap_stderr: float | None
    num_samples: int
    dim: int
    estimator: str = "all_terms"
    timestep_samples: int | None = None
    chunk_size: int | None = None
    wall_seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def bound_report(model: ReverseProcess, x: torch.Tensor, *, log_jacobian: float = 0.0,
                 entropy: tuple[float | None, float | None] = (None, None),
                 data_log_prob: torch.Tensor | None = None, chunk_size: int | None = None,
                 memory_budget: int | None = None, timestep_samples: int | None = None,
                 generator: torch.Generator | None = None, progress: bool = False) -> BoundReport:
    """Evaluate the bound on the (already rescaled) examples ``x``, shape (N,) + event: every term
    (default), or ``timestep_samples`` stratified terms per example (``stratified_bound``).

    ``data_log_prob``, shape (N,): log p_data of the examples in the data's own units, for the
    paired gap estimate (see ``BoundReport``). ``chunk_size`` pairs go through the network at once;
    by default as many as ``memory_budget`` bytes hold (``chunk_for_budget``; default
    ``default_memory_budget``). ``progress``: a progress bar with the time left (on rank 0, on a terminal).

    Under ``torchrun`` every rank passes the same ``x`` and gets the same report: rank r evaluates
    the r-th of W contiguous slices of ``x`` and the per-example terms are gathered in order. Give
    each rank its own ``generator`` (seeded ``distributed.rank_seed(seed)``), or the slices share
    their noise draws.
    """
    start = time.perf_counter()
    if chunk_size is None:
        chunk_size = chunk_for_budget(model, x, memory_budget)
    bound = sharded_bound(model, x, chunk_size=chunk_size, generator=generator,
                          timestep_samples=timestep_samples, progress=progress)
    total = bound.total.double() - log_jacobian
    n, dim = total.shape[0], x[0].numel()
    h, h_se = entropy
    nll, stderr, gap, gap_se = nll_summary(total, entropy, data_log_prob)
    terms = None if timestep_samples else bound.terms.double().mean(0).tolist()
    return BoundReport(nll_nats=nll, nll_stderr=stderr, bits_per_dim=bits_per_dim(nll, dim),
                       prior_nats=bound.prior.double().mean().item(),
                       terms_nats=terms, log_jacobian_nats=log_jacobian,
                       entropy_nats=h, entropy_stderr=h_se, gap_nats=gap, gap_stderr=gap_se,
                       num_samples=n, dim=dim,
                       estimator="stratified" if timestep_samples else "all_terms",
                       timestep_samples=timestep_samples, chunk_size=chunk_size,
                       wall_seconds=time.perf_counter() - start)


def sharded_bound(model: ReverseProcess, x: torch.Tensor, *, chunk_size: int = 16384,
                  generator: torch.Generator | None = None, timestep_samples: int | None = None,
                  progress: bool = False) -> Bound:
    """``full_bound`` (or ``stratified_bound`` with ``timestep_samples``) of every example of
    ``x``, its examples split over the ranks under ``torchrun``."""
    from tqdm import tqdm

    W, r = distributed.world_size(), distributed.rank()
    sizes = [len(part) for part in torch.arange(x.shape[0]).tensor_split(W)]
    start = sum(sizes[:r])
    mine = x[start: start + sizes[r]]
    per_example = timestep_samples + 1 if timestep_samples else model.num_timesteps
    # shown on a terminal only (disable=None), so logs and captured output stay clean
    bar = tqdm(total=len(mine) * per_example,
               disable=None if progress and distributed.is_main() else True,
               desc="bound", unit="pair", unit_scale=True, dynamic_ncols=True, smoothing=0.1)
    kw = dict(chunk_size=chunk_size, generator=generator, progress=bar.update)
    try:
        b = (stratified_bound(model, mine, timestep_samples, **kw) if timestep_samples
             else full_bound(model, mine, **kw))
    finally:
        bar.close()
    if W == 1:
        return b
    return Bound(prior=distributed.all_gather_cat(b.prior, sizes),
                 terms=distributed.all_gather_cat(b.terms, sizes))


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """The bytes a bound's chunks may take by default: half the free memory of a CUDA device; on
    the CPU a quarter of the memory available now, at most 1 GiB (what keeps ``pdiff evaluate``
    of an MNIST U-Net under 2 GB of resident memory with everything else it holds)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return int(min(GiB, available_memory() / 4))


def pair_bytes(model: ReverseProcess, x: torch.Tensor) -> int:
    """Bytes one (example, step) pair of a chunk can hold at once, measured by a dry run of the
    network on one pair: the outputs of all its leaf modules (everything a forward pass makes; an
    upper bound on what is alive at once without gradients), plus the bound's own tensors
    (``PAIR_TENSORS`` per data dimension)."""
    outputs = [0]

    def count(module, inputs, out):
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                outputs[0] += o.numel() * o.element_size()
    modules = [m for m in _modules(model.net) if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in modules]
    try:
        with torch.no_grad():
            one = x[:1]
            t = torch.full((1,), model.num_timesteps, dtype=torch.long, device=x.device)
            model._output(one, t)
    finally:
        for h in hooks:
            h.remove()
    work = getattr(model.net, "work_bytes", None)  # a denoiser that is not a module says its own
    extra = work(x.element_size()) if callable(work) else 0
    return outputs[0] + extra + PAIR_TENSORS * x[0].numel() * x.element_size()


def _modules(net) -> list[torch.nn.Module]:
    """The ``nn.Module`` inside ``net`` (through wrappers such as ``CastNet``), or none."""
    while not isinstance(net, torch.nn.Module) and hasattr(net, "net"):
        net = net.net
    return list(net.modules()) if isinstance(net, torch.nn.Module) else []


def chunk_for_budget(model: ReverseProcess, x: torch.Tensor, memory_budget: int | None = None) -> int:
    """The most (example, step) pairs whose chunk fits ``memory_budget`` bytes (default
    ``default_memory_budget`` of ``x``'s device), at least 1 and at most the N T pairs there are."""
    budget = default_memory_budget(x.device) if memory_budget is None else memory_budget
    return int(max(1, min(budget // pair_bytes(model, x), x.shape[0] * model.num_timesteps)))


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


def continuous_report(model: ReverseProcess, x: torch.Tensor, *, log_jacobian: float = 0.0,
                      num_u: int = 16, chunk_size: int | None = None,
                      memory_budget: int | None = None, log_snr=None,
                      generator: torch.Generator | None = None) -> dict:
    """The continuous-time bound (``continuous.continuous_bound``, VDM eq. 17) of ``model`` on the
    (already rescaled) examples ``x``, in the data's units as ``BoundReport``: ``nll_nats`` with its
    standard error over examples (the draws of log-SNR and eps included), ``bits_per_dim``, the three
    parts, ``num_u`` log-SNR draws per example and the wall time."""
    from .continuous import continuous_bound

    start = time.perf_counter()
    if chunk_size is None:
        chunk_size = chunk_for_budget(model, x, memory_budget)
    b = continuous_bound(model, x, num_u=num_u, chunk_size=chunk_size, generator=generator,
                         log_snr=log_snr)
    total = b.total.double() - log_jacobian
    n, dim = total.shape[0], x[0].numel()
    nll, stderr, _, _ = nll_summary(total)
    return {"nll_nats": nll, "nll_stderr": stderr,
            "bits_per_dim": bits_per_dim(nll, dim), "prior_nats": b.prior.double().mean().item(),
            "decoder_nats": b.decoder.double().mean().item(),
            "diffusion_nats": b.diffusion.double().mean().item(), "num_u": num_u,
            "u_first": 1.0 / model.num_timesteps, "num_samples": n,
            "wall_seconds": time.perf_counter() - start}


LIKELIHOODS = ("bound", "continuous", "ode")


def other_likelihoods(model: ReverseProcess, x: torch.Tensor, likelihoods, *,
                      log_jacobian: float = 0.0, continuous_samples: int = 16,
                      ode_options: dict | None = None, memory_budget: int | None = None,
                      log_snr=None, generator: torch.Generator | None = None) -> dict:
    """The estimators beside the discrete bound that ``likelihoods`` names, each its own report
    keyed by name: ``continuous`` (``continuous_report``) and ``ode`` (``ode.ode_report``, with
    ``ode_options``), on the same rescaled examples ``x``. ``log_snr``: the learned schedule of a
    run that learned one (``Run.log_snr``), which both follow in continuous time."""
    unknown = [name for name in likelihoods if name not in LIKELIHOODS]
    if unknown:
        raise ValueError(f"unknown likelihood {unknown[0]!r}; valid: {', '.join(LIKELIHOODS)}")
    out = {}
    if "continuous" in likelihoods:
        out["continuous"] = continuous_report(model, x, log_jacobian=log_jacobian,
                                              num_u=continuous_samples, log_snr=log_snr,
                                              memory_budget=memory_budget, generator=generator)
    if "ode" in likelihoods:
        from .ode import ode_report

        out["ode"] = ode_report(model, x, log_jacobian=log_jacobian, generator=generator,
                                **(ode_options or {})).to_dict()
    return out


def nonfinite_fields(report: dict) -> list[str]:
    """The entries of a report (``BoundReport.to_dict()`` and what is added to it) that are NaN or
    infinite; for a list, how many of its values; a nested report's as ``name.entry``."""
    bad = []
    for key, value in report.items():
        if isinstance(value, dict):
            bad += [f"{key}.{inner}" for inner in nonfinite_fields(value)]
            continue
        values = value if isinstance(value, list) else [value]
        n = sum(isinstance(v, float) and not math.isfinite(v) for v in values)
        if n:
            bad.append(key if not isinstance(value, list) else f"{key} ({n} of {len(value)})")
    return bad
