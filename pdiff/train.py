"""The trainer for toy and image data: a config, a run directory, atomic checkpoints, exact resume.

A run directory holds ``config.json``, ``checkpoint.pt`` (weights, EMA weights, optimizer, step,
RNG state, timestep-sampler state, configuration, rescaling) and ``metrics.jsonl`` (one line per
logged step: the mean loss over the steps since the previous line). Every random draw of training
comes from one ``torch.Generator`` saved in the checkpoint, so a resumed run reproduces an
uninterrupted one exactly (on the same device).

Under ``torchrun`` (see ``distributed``) the network is wrapped in ``DistributedDataParallel``:
``batch_size`` stays the global batch, each of the W ranks draws ``batch_size / W`` examples, t and
noise from its own generator (seeded ``distributed.rank_seed(seed, rank)``: rank 0's stream is the
one-process stream), and the gradients are averaged over ranks. The importance sampler sees every
rank's (t, term) pairs, in rank order, so it is the same on every rank. Rank 0 alone writes the run
directory; checkpoints hold the plain module's weights (interchangeable with one-process ones) and
every rank's generator state, so a resume on as many ranks is exact; a resume on another number is
allowed, with fresh random streams and a warning.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from . import distributed
from .data import IMAGE_DATASETS, RESCALINGS, TOY_DATASETS, Rescaling, get_toy
from .data.arrays import load_betas
from .data.empirical import is_data_file
from .continuous import DiscreteLogSNR, LearnedLogSNR, discretize
from .checkpoint import RESUME_KEYS, read_checkpoint, save_checkpoint, size_mismatch
from .files import atomic_write_text
from .distributions.reverse import DECODER_VARIANCES, LEARNED_VARIANCES, VARIANCES, ReverseProcess
from .markov import model as markov_model, posterior_guide
from .nets import EMBEDDINGS, LabelledNet, MeanVarianceNets, MLPDenoiser, UNet, unet_for
from .objectives import MEAN_ONLY_OBJECTIVES, OBJECTIVES, SAMPLERS, get_objective, make_sampler
from .parameterization import PREDICTIONS
from .resources import require_memory
from .run_data import is_image_data, load_run_data
from .rundir import RunDirectory
from .schedules import SCHEDULES, NoiseSchedule, make_schedule

ENGINES = ("torch", "pyro")
PRECISIONS = ("fp32", "bf16")  # bf16: the network's forward under torch.autocast, the rest fp32
# fields that change how fast a run trains, not what it trains: a resume may change them
# data_on: "device" keeps the train split on the training device; "host" keeps it in host memory
# (pinned for a CUDA device) and copies each batch over, for data the device should not hold
DATA_PLACEMENTS = ("device", "host")
RUNTIME_FIELDS = ("iterations", "device", "log_every", "checkpoint_every", "precision", "compile",
                  "data_on")
NETS = ("auto", "mlp", "mean_variance", "unet")
# Image runs (U-Net, T network passes of a bigger net per batch on CPU): smaller batches, a lower
# learning rate and a slower EMA than the toys, as the DDPM and Improved-DDPM image runs use.
IMAGE_DEFAULTS = {"batch_size": 64, "lr": 1e-3, "ema_decay": 0.999, "warmup": 200,
                  "iterations": 2000}
CHECKPOINT = "checkpoint.pt"
# seeds derived from the run's (per rank, per restart of a stream) stay below 2**63
SEED_MAX = 2**40 - 1


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run (the command line and experiments fill it in).

    ``net`` ``auto`` is the MLP for toys and the U-Net for images; ``hidden`` and ``depth`` size
    the MLP, ``channels`` (0: sized by ``unet_for`` for the image size) and ``dropout`` the U-Net.
    ``data_dir`` and ``image_size`` apply to image datasets. ``batch_size`` is the global batch,
    split over the ranks under ``torchrun``. ``precision`` ``bf16`` runs the network's forward under
    bfloat16 autocast (the loss, KLs and schedule stay fp32/float64); ``compile`` wraps the network
    in ``torch.compile``. ``class_cond`` makes the U-Net class-conditional on the dataset's labels,
    each label replaced by the null label with probability ``label_dropout`` so that one network
    is both p(x | y) and p(x) (classifier-free guidance, Ho & Salimans 2022).
    """

    data: str = "mixture1d"
    objective: str = "hybrid"
    variance: str = "learned_range"
    prediction: str = "eps"
    schedule: str = "linear"
    timesteps: int = 1000
    decoder_variance: str = "beta1"
    sampler: str = "uniform"
    rescale: str = "none"
    net: str = "auto"  # mlp | mean_variance (separate mean and variance MLPs) | unet
    hidden: int = 128
    depth: int = 3
    channels: int = 0
    dropout: float = 0.0
    embedding: str = "sinusoidal"
    iterations: int = 5000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup: int = 100
    ema_decay: float = 0.995
    train_size: int = 100_000
    test_size: int = 10_000
    seed: int = 0
    data_dir: str | None = None
    image_size: int | None = None
    device: str = "cpu"
    engine: str = "torch"
    log_every: int = 50
    checkpoint_every: int = 1000
    precision: str = "fp32"
    compile: bool = False
    data_on: str = "device"
    class_cond: bool = False
    label_dropout: float = 0.1
    learned_schedule: bool = False
    # the schedule's parameters (make_schedule): None = 1e-4 and 0.02 scaled by 1000/T
    beta_start: float | None = None
    beta_end: float | None = None
    cosine_s: float = 0.008
    schedule_power: float = 2.0
    const_beta: float = 0.02
    betas: str = ""  # a file of beta_1..beta_T in place of --schedule (saved in the checkpoint)
    # the U-Net ("" and 0: unet_for's choice for the image size)
    channel_mults: str = ""
    num_res_blocks: int = 0
    attention_resolutions: str = ""
    num_heads: int = 1
    embedding_dim: int = 32  # the MLP's time embedding
    # objective options: L_hybrid's lambda, Min-SNR's gamma, P2's k and gamma
    hybrid_weight: float = 0.001
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0

    CHOICES = {"data": tuple(sorted(TOY_DATASETS)) + IMAGE_DATASETS, "variance": VARIANCES, "prediction": PREDICTIONS,
               "schedule": SCHEDULES, "decoder_variance": DECODER_VARIANCES, "rescale": RESCALINGS,
               "embedding": EMBEDDINGS, "net": NETS, "engine": ENGINES,
               "objective": OBJECTIVES, "sampler": SAMPLERS,
               "precision": PRECISIONS, "data_on": DATA_PLACEMENTS}

    def validate(self) -> "TrainConfig":
        """Refuse inconsistent options with a ``ValueError`` naming what is valid."""
        get_objective(self.objective)
        make_sampler(self.sampler, 1)
        if is_data_file(self.data) and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data!r}: no such file (a dataset name, or a .npy, "
                             ".csv or .txt file of points, one a row)")
        for name, valid in self.CHOICES.items():
            if name == "data" and is_data_file(self.data):
                continue
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.engine == "pyro" and self.objective not in ("vlb", "trajectory"):
            raise ValueError("the pyro engine trains the bound objectives through Pyro's ELBOs; "
                             f"--objective must be vlb or trajectory with it, got {self.objective!r}")
        if self.objective == "continuous":
            if self.prediction == "mean":
                raise ValueError("the continuous objective trains the network at real times u, "
                                 "where a posterior mean has no step: --prediction must be eps, "
                                 "x0 or v")
            if self.embedding != "sinusoidal":
                raise ValueError("the continuous objective feeds the network real steps u T: "
                                 f"--embedding must be sinusoidal, got {self.embedding!r}")
            if self.variance not in ("fixed_small", "fixed_large"):
                raise ValueError("the continuous objective trains the mean (its bound has the "
                                 "posterior's variance): --variance must be fixed_small or "
                                 f"fixed_large, got {self.variance!r}")
            if self.sampler != "uniform":
                raise ValueError("the continuous objective draws its own times u (evenly spread "
                                 f"over the batch): --sampler must be uniform, got {self.sampler!r}")
        for name in ("cosine_s", "schedule_power", "const_beta", "hybrid_weight", "min_snr_gamma",
                     "p2_k", "p2_gamma"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.betas and any(getattr(self, n) is not None for n in ("beta_start", "beta_end")):
            raise ValueError("--betas gives every beta_t: drop --beta-start / --beta-end")
        self.unet_options()  # the U-Net's options parse
        if self.num_heads < 1 or self.num_res_blocks < 0 or self.embedding_dim < 2:
            raise ValueError(f"need num_heads >= 1, num_res_blocks >= 0 (0: the default) and "
                             f"embedding_dim >= 2, got {self.num_heads}, {self.num_res_blocks}, "
                             f"{self.embedding_dim}")
        if self.learned_schedule and self.objective != "continuous":
            raise ValueError("--learned-schedule learns the continuous-time schedule: it needs "
                             f"--objective continuous, got {self.objective!r}")
        image = is_image_data(self.data)
        if image and self.net in ("mlp", "mean_variance"):
            raise ValueError(f"{self.data} is image data: --net must be unet or auto, got {self.net!r}")
        if not image and self.net == "unet":
            raise ValueError(f"the U-Net takes images; {self.data} is vector data (--net mlp, "
                             "mean_variance or auto)")
        if image and self.rescale != "none":
            raise ValueError("image data is already on [-1, 1]: --rescale must be none for "
                             f"{self.data}, got {self.rescale!r}")
        if self.image_size is not None and self.image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {self.image_size}")
        if self.class_cond and not image:
            raise ValueError(f"--class-cond conditions the U-Net on image labels; {self.data} is "
                             "vector data")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.channels < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"need channels >= 0 (0: the default width) and 0 <= dropout < 1, got "
                             f"channels {self.channels}, dropout {self.dropout}")
        if self.net == "mean_variance" and self.variance not in LEARNED_VARIANCES:
            raise ValueError("separate mean and variance networks need a learned variance "
                             f"({', '.join(LEARNED_VARIANCES)}), got {self.variance!r}")
        for name in ("timesteps", "iterations", "batch_size", "train_size", "test_size", "hidden",
                     "depth", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.betas:  # the schedule's options give a schedule (a file is read by Trainer);
            # checked at T <= 10^4 (a larger T is refused by the memory check, not built here)
            make_schedule(self.schedule, min(self.timesteps, 10_000), warn=False,
                          **self.schedule_options())
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (0 <= self.ema_decay < 1 and self.grad_clip > 0):  # NaN fails both
            raise ValueError(f"need 0 <= ema_decay < 1 and grad_clip > 0 (inf: no clipping), got "
                             f"ema_decay {self.ema_decay}, grad_clip {self.grad_clip}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in 0..{SEED_MAX} (2**40 - 1), got {self.seed}")
        check_device(self.device)
        if (self.precision == "bf16" and self.device.startswith("cuda")
                and not torch.cuda.is_bf16_supported()):
            raise ValueError("--precision bf16 needs a GPU with bfloat16 support; use fp32 here")
        if self.compile and not _compile_supported():
            raise ValueError("--compile needs torch.compile, which this Python/torch build does not "
                             "support; train without --compile")
        return self

    def unet_options(self) -> dict:
        """The U-Net options given (``channel_mults``, ``num_res_blocks``, ``attention_resolutions``
        as "1,2,2" (or "1/2/2"), "7" or "none", ``num_heads``) as ``UNet`` keyword arguments."""
        out: dict = {}

        def ints(name: str, text: str) -> tuple[int, ...]:
            try:  # "1,2,2", or "1/2/2" (a value of compare --grid, whose values take the commas)
                values = tuple(int(v) for v in text.replace("/", ",").split(","))
            except ValueError:
                values = ()
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be positive integers separated by commas (or "
                                 f"slashes) such as 1,2,2, got {text!r}")
            return values
        if self.channel_mults:
            out["channel_mults"] = ints("channel_mults", self.channel_mults)
        if self.attention_resolutions:
            out["attention_resolutions"] = (
                () if self.attention_resolutions == "none"
                else ints("attention_resolutions", self.attention_resolutions))
        if self.num_res_blocks:
            out["num_res_blocks"] = self.num_res_blocks
        if self.num_heads != 1:
            out["num_heads"] = self.num_heads
        return out

    def schedule_options(self) -> dict:
        """``make_schedule``'s keyword arguments from the options (``betas`` aside)."""
        return dict(beta_start=self.beta_start, beta_end=self.beta_end, beta=self.const_beta,
                    cosine_s=self.cosine_s, power=self.schedule_power)

    def loss_options(self) -> dict:
        """The objective's own options (``objectives``): hybrid's lambda, Min-SNR's gamma, P2's."""
        return {"hybrid": {"hybrid_weight": self.hybrid_weight},
                "min_snr": {"gamma": self.min_snr_gamma},
                "p2": {"k": self.p2_k, "gamma": self.p2_gamma}}.get(self.objective, {})

    @classmethod
    def for_data(cls, data: str, **changes) -> "TrainConfig":
        """The defaults for ``data`` (``IMAGE_DEFAULTS`` for image datasets), then ``changes``."""
        base = IMAGE_DEFAULTS if is_image_data(data) else {}
        return cls(data=data, **(base | changes))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _compile_supported() -> bool:
    try:
        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # no dynamo at all in this build
        return False


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` unless it is ``cpu``, or ``cuda`` /
    ``cuda:N`` on a machine with that CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {str(device)!r}; valid: cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev


class Autocast(torch.nn.Module):
    """``net``'s forward under ``torch.autocast(device_type, bfloat16)``, its outputs cast back to
    float32: only the network runs in bfloat16, every term computed from its outputs stays fp32."""

    def __init__(self, net: torch.nn.Module, device_type: str):
        super().__init__()
        self.net, self.device_type = net, device_type

    def forward(self, xt: torch.Tensor, t: torch.Tensor, *labels):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.net(xt, t, *labels)
        return type(out)(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


def wrap_precision(net: torch.nn.Module, precision: str, device_type: str) -> torch.nn.Module:
    """``net`` itself for ``fp32``, ``Autocast(net)`` for ``bf16``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return net if precision == "fp32" else Autocast(net, device_type)


def gather_steps(t: torch.Tensor, term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (t, term) pairs in rank order, in one collective (the pairs as given in one
    process): what the importance sampler of every rank is updated with, so all stay identical."""
    if distributed.world_size() == 1:
        return t, term
    pairs = distributed.all_gather_cat(torch.stack([t.double(), term.detach().double()], 1))  # (W n, 2)
    return pairs[:, 0].long(), pairs[:, 1]


def build_net(cfg: TrainConfig, event_shape, num_classes: int | None = None, *,
              base_channels: int | None = None) -> torch.nn.Module:
    """The denoiser for data of ``event_shape``: (D,) for toys, (C, H, W) for images;
    ``num_classes`` labels (with ``cfg.class_cond``) for a class-conditional U-Net.
    ``base_channels``: the U-Net's width where ``cfg.channels`` is 0, instead of ``unet_for``'s
    (a saved run's, from :func:`saved_base_channels`)."""
    mult = 2 if cfg.variance in LEARNED_VARIANCES else 1
    if is_image_data(cfg.data):
        C, H, W = event_shape
        base = cfg.channels or base_channels
        width = {"base_channels": base} if base else {}
        if cfg.class_cond:
            if not num_classes:
                raise ValueError(f"--class-cond needs class labels, and {cfg.data} has none here")
            width["num_classes"] = num_classes
        return UNet(**unet_for(H, C, out_multiplier=mult, dropout=cfg.dropout, **width,
                               **cfg.unet_options()))
    dim = event_shape[0]
    kw = dict(hidden=cfg.hidden, depth=cfg.depth, embedding=cfg.embedding,
              embedding_dim=cfg.embedding_dim)
    if cfg.net == "mean_variance":
        return MeanVarianceNets(MLPDenoiser(dim, cfg.timesteps, **kw), MLPDenoiser(dim, cfg.timesteps, **kw))
    return MLPDenoiser(dim, cfg.timesteps, out_multiplier=mult, **kw)


def saved_base_channels(cfg: TrainConfig, state: dict) -> int | None:
    """The base width of the U-Net in checkpoint ``state`` when its ``cfg.channels`` is 0 (None for
    toys or an explicit width): recorded in the checkpoint since unet_for's default at 17x17 to
    32x32 became 32; an older checkpoint was built with the default of then, 64 above 16x16."""
    if cfg.channels or not is_image_data(cfg.data):
        return None
    if state.get("base_channels"):
        return int(state["base_channels"])
    return 32 if int(state["event_shape"][-1]) <= 16 else 64


# Lower estimates of what a run holds at once, in bytes: sizes that cannot fit are refused before
# any work (a traceback or the OOM killer otherwise). Float64 draws plus float32 copies of the data;
# ~20 float64 arrays of length T in the schedule plus the importance sampler's T x 10 history;
# per example of a batch, a few copies (forward, backward, Adam) of each MLP layer's activations,
# or ~40 feature maps of base_channels at full resolution and the attention matrices of a U-Net.
def toy_data_bytes(cfg: TrainConfig) -> float:
    dim = get_toy(cfg.data).event_shape[0]
    return (cfg.train_size + cfg.test_size) * dim * (8 + 8 + 4)


def schedule_bytes(cfg: TrainConfig) -> float:
    return cfg.timesteps * 8 * (20 + 10)


def batch_bytes(cfg: TrainConfig, event_shape) -> float:
    if len(event_shape) == 3:
        C, H, W = event_shape
        kw = unet_for(H, C)
        base = cfg.channels or kw["base_channels"]
        att = max(kw["attention_resolutions"]) ** 4 * 4 * 3  # (HW)^2 scores, softmax, grad
        return cfg.batch_size * (base * H * W * 40 * 4 + att)
    return cfg.batch_size * (cfg.hidden * cfg.depth * 6 + event_shape[0] * 8) * 4


def check_memory(cfg: TrainConfig, event_shape=None, *, processes: int = 1) -> None:
    """``ValueError`` with the figure if ``cfg``'s data, schedule or training batch (split over
    ``processes``) cannot fit in the memory available now. The batch is checked where its
    ``event_shape`` is known: always for toys, for images once their data is loaded."""
    image = is_image_data(cfg.data)
    if is_data_file(cfg.data):  # parsed as text, a number takes some 10 times its 8 bytes
        size = Path(cfg.data).stat().st_size
        require_memory(size * (2 if cfg.data.endswith(".npy") else 10),
                       f"the points of {cfg.data!r} ({size >> 20} MiB)", hint="use a smaller file")
    if not image:
        require_memory(toy_data_bytes(cfg), f"the training data ({cfg.train_size} + "
                       f"{cfg.test_size} points)", hint="lower --train-size or --test-size")
        event_shape = get_toy(cfg.data).event_shape
    require_memory(schedule_bytes(cfg), f"a schedule of T = {cfg.timesteps} steps",
                   hint="lower --timesteps")
    if event_shape is not None:
        require_memory(batch_bytes(cfg, tuple(event_shape)) / processes,
                       f"a training batch of {cfg.batch_size}",
                       hint="lower --batch-size" + (" or --image-size" if image else ""))


def build_model(cfg: TrainConfig, net, num_levels: int | None = None,
                betas: torch.Tensor | None = None) -> ReverseProcess:
    """p_theta around ``net``: a Gaussian decoder for toys, the discretized decoder over
    ``num_levels`` levels (and 3 event dimensions) for images. The schedule is ``betas`` where
    given (a run trained on ``--betas FILE`` keeps them in its checkpoint), else ``cfg``'s."""
    schedule = (NoiseSchedule.from_betas(betas, warn=False) if betas is not None
                else make_schedule(cfg.schedule, cfg.timesteps, **cfg.schedule_options()))
    image = num_levels is not None
    return ReverseProcess(net, schedule, prediction=cfg.prediction, variance=cfg.variance,
                          decoder_variance=cfg.decoder_variance,
                          decoder="discretized" if image else "gaussian", num_levels=num_levels,
                          event_dims=3 if image else 1)


@dataclass
class Run:
    """A loaded run: configuration, the model with EMA weights (what is evaluated), the rescaling."""

    config: TrainConfig
    model: ReverseProcess
    rescaling: Rescaling
    step: int
    event_shape: tuple[int, ...] | None = None  # default: the rescaling's shape, (D,) for toys
    log_snr: LearnedLogSNR | None = None  # a learned schedule (the model's is its T steps)
    data_sha256: str | None = None  # a file of points: its digest when the run was trained

    def __post_init__(self):
        if self.event_shape is None:
            self.event_shape = tuple(self.rescaling.shift.shape)

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (``load_run(device=...)``): where it is evaluated; the
        CPU for a denoiser without parameters (such as the closed-form oracle)."""
        params = getattr(self.model.net, "parameters", None)
        param = next(params(), None) if params is not None else None
        return param.device if param is not None else torch.device("cpu")


def load_run(out: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> Run:
    """Load a run directory's checkpoint onto ``device``; ``ValueError`` if it is missing or
    unreadable, or if ``device`` is a CUDA device this machine lacks."""
    check_device(device)
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no checkpoint in {str(out)!r} (expected {path})")
    state = read_checkpoint(path, device=device)  # verified: keys, checksum, finite weights
    try:
        cfg = TrainConfig.from_dict(state["config"])
        event_shape = tuple(state["event_shape"] if "event_shape" in state else (state["dim"],))
        net = build_net(cfg, event_shape, state.get("num_classes"),
                        base_channels=saved_base_channels(cfg, state))
    except Exception as e:  # a configuration this version cannot build
        raise ValueError(f"checkpoint {path} holds a configuration that cannot be built: "
                         f"{e}") from None
    weights = state["ema" if ema else "net"]
    mismatch = size_mismatch(net, weights)
    if mismatch:
        raise ValueError(f"checkpoint {path} holds a network of another size than its "
                         f"configuration describes ({mismatch})")
    net.load_state_dict(weights)
    net.to(device, torch.float32).eval()
    resc = Rescaling(state["rescale_shift"], state["rescale_scale"])
    model = build_model(cfg, net, state.get("num_levels"), state.get("betas"))
    log_snr = None
    if cfg.learned_schedule:
        if "schedule" not in state:
            raise ValueError(f"checkpoint {path} of a run with a learned schedule lacks the "
                             "schedule's weights ('schedule')")
        log_snr = LearnedLogSNR(DiscreteLogSNR(model.schedule))
        log_snr.load_state_dict(state["schedule"])
        model = model.replace(schedule=learned_schedule_steps(log_snr, cfg.timesteps))
        log_snr.to(device)
    return Run(cfg, model, resc, state["step"], event_shape, log_snr=log_snr,
               data_sha256=state.get("data_sha256"))


def learned_schedule_steps(log_snr: "LearnedLogSNR", num_timesteps: int) -> NoiseSchedule:
    """The T-step chain of a learned schedule, on the grid u_t = t / T its network was trained on."""
    with torch.no_grad():
        return discretize(log_snr, num_timesteps, 1.0 / num_timesteps)


class Trainer:
    """Trains ``cfg`` into the run directory ``out`` (one process, or every rank under ``torchrun``).

    ``self.net`` is the plain module (optimizer, EMA, checkpoints); ``self.model`` is p_theta around
    the network as trained: wrapped in ``DistributedDataParallel`` under ``torchrun``, in
    ``torch.compile`` with ``compile`` and in bfloat16 autocast with ``precision`` bf16, all of them
    sharing the plain module's parameters.
    """

    def __init__(self, cfg: TrainConfig, out: str | Path, *, resume: bool = False, force: bool = False):
        # Everything is checked (options, the directory, memory, data, network, optimizer, the run
        # to resume) before the first byte is written; under force the old run is replaced only at
        # the new one's first checkpoint (see pdiff.rundir).
        self.cfg = cfg.validate()
        self.out = Path(out)
        self.device = distributed.init(cfg.device)  # cuda:LOCAL_RANK under torchrun
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        if cfg.batch_size % self.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible "
                             f"by the number of processes, {self.world_size}")
        self.rundir: RunDirectory | None = None  # rank 0's; the others write nothing
        self.saved_step: int | None = None  # the step of the checkpoint on disk, if any

        def check_dir() -> bool:
            self.rundir = RunDirectory(self.out, resume=resume, force=force)
            return self.rundir.resume
        resuming = distributed.on_main(check_dir)  # a refusal is raised on every rank
        self.local_batch = cfg.batch_size // self.world_size
        check_memory(cfg)
        torch.manual_seed(cfg.seed)
        data = load_run_data(cfg)
        self.event_shape, self.num_levels = data.event_shape, data.num_levels
        self.rescaling = data.rescaling
        check_memory(cfg, self.event_shape, processes=self.world_size)
        # data_on "device": the whole train split lives on the device, batches are gathered there
        # with no copy per step. "host": it stays in host memory, pinned for a CUDA device, and
        # each batch is gathered on the host into pinned memory and copied without a wait
        self.data_device = torch.device("cpu") if cfg.data_on == "host" else self.device
        self.pinned = cfg.data_on == "host" and self.device.type == "cuda"
        self.train_x = data.train.to(self.data_device, torch.float32)
        if self.pinned:
            self.train_x = self.train_x.pin_memory()
        self.num_classes = data.num_classes if cfg.class_cond else None
        if cfg.class_cond and (data.train_labels is None or not data.num_classes):
            raise ValueError(f"--class-cond needs class labels, and {cfg.data} has none")
        self.train_y = data.train_labels.to(self.data_device) if cfg.class_cond else None
        if self.pinned and self.train_y is not None:
            self.train_y = self.train_y.pin_memory()
        # read (on rank 0, handed to all) before the network: a run saved with unet_for's older
        # default width is rebuilt at that width
        resume_state = distributed.on_main(self._read_resume_state) if resuming else None
        width = saved_base_channels(cfg, resume_state) if resuming else None
        self.net = build_net(cfg, self.event_shape, self.num_classes,
                             base_channels=width).to(self.device, torch.float32)
        self.base_channels = self.net.down[0][0].out_channels if isinstance(self.net, UNet) else None
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        # the EMA pairs, listed once (state_dict loads copy into these same tensors)
        self._ema_pairs = (list(self.ema.parameters()), list(self.net.parameters()))
        if self.rank > 0:  # dropout masks differ across ranks; rank 0 keeps the one-process stream
            torch.manual_seed(distributed.rank_seed(cfg.seed))
        self.betas = None
        if cfg.betas:  # read now and kept in the checkpoint: the run does not need the file again
            self.betas = load_betas(cfg.betas)
            if len(self.betas) != cfg.timesteps:
                raise ValueError(f"--betas {cfg.betas!r} holds {len(self.betas)} values but "
                                 f"--timesteps is {cfg.timesteps} (omit --timesteps to take the "
                                 "file's length)")
        self.model = build_model(cfg, self._training_net(), self.num_levels, self.betas)
        self.loss_fn = get_objective(cfg.objective)
        self.loss_options: dict = cfg.loss_options()
        self.sampler = make_sampler(cfg.sampler, cfg.timesteps)
        groups = [{"params": list(self.net.parameters())}]
        self.log_snr = None
        if cfg.learned_schedule:  # float64, no weight decay, no EMA (VDM sec. 5.2)
            self.log_snr = LearnedLogSNR(DiscreteLogSNR(self.model.schedule)).to(self.device)
            self.loss_options["log_snr"] = self.log_snr
            groups.append({"params": list(self.log_snr.parameters()), "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator(device=self.device).manual_seed(distributed.rank_seed(cfg.seed))
        # the batch indices are drawn where the data is: host data takes a host stream of its own
        self.index_gen = self.gen
        if cfg.data_on == "host":
            self.index_gen = torch.Generator().manual_seed(self._index_seed(0))
        self.step = 0
        # the mean loss of the next metrics line accumulates over the steps since the last one; a
        # checkpoint holds both, so a resumed log equals an uninterrupted one line for line
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps_since_log = 0
        if resuming:
            self._load(resume_state)
        distributed.on_main(self._open_dir)  # the first write

    def _open_dir(self) -> None:
        """Create (or lock) the run directory and write config.json; on a resume, first drop the
        metric lines after the checkpoint (and a partial last line)."""
        path = self.rundir.open()
        if self.rundir.resume:
            self._truncate_metrics(path / "metrics.jsonl")
        atomic_write_text(json.dumps(asdict(self.cfg), indent=2), path / "config.json")

    @property
    def path(self) -> Path:
        """Where the run's files are written now: ``out``, or the staging directory under
        ``--force`` until the first checkpoint."""
        return self.rundir.path if self.rundir is not None else self.out

    def _training_net(self) -> torch.nn.Module:
        """The plain module, wrapped for data parallelism, compilation and precision as asked."""
        net: torch.nn.Module = self.net
        if self.world_size > 1:
            # separate mean and variance MLPs under L_simple & co.: the variance MLP gets no gradient
            unused = (self.cfg.objective in MEAN_ONLY_OBJECTIVES
                      and self.cfg.net == "mean_variance")
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        if self.cfg.compile:
            net = torch.compile(net)
        net = wrap_precision(net, self.cfg.precision, self.device.type)
        # class-conditional: the labels of each batch are set on this wrapper before its loss
        self.labelled = LabelledNet(net) if self.cfg.class_cond else None
        return self.labelled or net

    def _index_seed(self, step: int) -> int:
        """The seed of the host index stream of host data (``step``: where it starts afresh)."""
        return distributed.rank_seed((self.cfg.seed * 1_000_003 + step) * 2 + 1)

    def _rng_state(self) -> dict:
        """This rank's random streams, and its part of the metrics line being accumulated."""
        state = {"generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "loss_sum": self.loss_sum.detach().cpu().clone()}
        if self.index_gen is not self.gen:
            state["index_generator"] = self.index_gen.get_state()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _state(self) -> dict | None:
        """The checkpoint (on rank 0; None on the others). Every rank must call it: it gathers the
        ranks' generator states."""
        rngs = distributed.gather_object(self._rng_state())
        if rngs is None:
            return None
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step, "generator": rngs[0]["generator"], "torch_rng": rngs[0]["torch_rng"],
                "rng": rngs, "world_size": len(rngs), "steps_since_log": self.steps_since_log,
                "sampler": self.sampler.state_dict(), "config": asdict(self.cfg),
                "event_shape": list(self.event_shape), "num_levels": self.num_levels,
                "num_classes": self.num_classes, "base_channels": self.base_channels,
                "rescale_shift": self.rescaling.shift, "rescale_scale": self.rescaling.scale,
                **({"schedule": self.log_snr.state_dict()} if self.log_snr is not None else {}),
                **({"betas": self.betas} if self.betas is not None else {}),
                **({"data_sha256": get_toy(self.cfg.data).sha256}
                   if is_data_file(self.cfg.data) else {})}

    def _read_resume_state(self) -> dict:
        """Rank 0: check config.json and the checkpoint against this run's options and return the
        verified checkpoint (the directory is locked already). Reads only."""
        path = self.out / CHECKPOINT
        self._check_same(self.rundir.read_config(), "its configuration (config.json)")
        state = read_checkpoint(path, keys=RESUME_KEYS)
        self._check_same(state["config"], f"the configuration saved in {path}")
        return state

    def _check_same(self, saved, source: str) -> None:
        """``ValueError`` naming each option in which ``saved`` differs from this run's (fields
        that only change how fast a run trains may differ; missing ones read as their defaults)."""
        saved = saved if isinstance(saved, dict) else {}
        # a field the saved run predates had its default then (options are added with the
        # default that keeps the old behaviour)
        saved = {f.name: f.default for f in fields(TrainConfig)} | saved
        mine = asdict(self.cfg)
        differ = [k for k in mine if k not in RUNTIME_FIELDS and saved.get(k) != mine[k]]
        if differ:
            raise ValueError(f"cannot resume {str(self.out)!r}: {source} differs in "
                             + ", ".join(f"{k} (saved {saved.get(k)!r}, given {mine[k]!r})"
                                         for k in differ))

    def _load(self, state: dict) -> None:
        """Continue from ``state``, the verified checkpoint of :meth:`_read_resume_state`, once it
        is known to hold this run's network and betas."""
        path = self.out / CHECKPOINT
        mismatch = size_mismatch(self.net, state["net"])
        if mismatch:
            raise ValueError(f"cannot resume from {path}: it holds a network of another size "
                             f"({mismatch})")
        if self.betas is not None and not torch.equal(state.get("betas", torch.empty(0)),
                                                      self.betas):
            raise ValueError(f"cannot resume from {path}: --betas {self.cfg.betas!r} no longer "
                             "holds the betas the run was trained with")
        try:
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            if self.log_snr is not None:
                self.log_snr.load_state_dict(state["schedule"])
            self.sampler.load_state_dict(state["sampler"])
            self.step = self.saved_step = state["step"]
            # one state per rank; older checkpoints hold one process's
            rngs = state.get("rng") or [{k: state[k] for k in ("generator", "torch_rng")}]
            if len(rngs) == self.world_size:
                mine = rngs[self.rank]
                self.gen.set_state(mine["generator"])
                torch.set_rng_state(mine["torch_rng"])
                if "cuda_rng" in mine and self.device.type == "cuda":
                    torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
                if self.index_gen is not self.gen:  # saved with data on the device: start afresh
                    if "index_generator" in mine:
                        self.index_gen.set_state(mine["index_generator"])
                    else:
                        self.index_gen.manual_seed(self._index_seed(state["step"]))
            # the metrics line in progress (older checkpoints: none, the line restarts here)
            if "steps_since_log" in state and all("loss_sum" in r for r in rngs):
                self.steps_since_log = state["steps_since_log"]
                sums = [r["loss_sum"] for r in rngs]
                mean = sums[self.rank] if len(rngs) == self.world_size else sum(sums) / len(sums)
                self.loss_sum.copy_(mean)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is corrupt or not a pdiff checkpoint: {e}") from None
        if len(rngs) != self.world_size:
            if distributed.is_main():
                warnings.warn(f"{path} was saved by {len(rngs)} process(es) and is resumed on "
                              f"{self.world_size}: the random streams start afresh, so the run goes on "
                              "correctly but not draw for draw as an uninterrupted one", stacklevel=2)
            seed = distributed.rank_seed(self.cfg.seed * 1_000_003 + self.step + 1)
            self.gen.manual_seed(seed)
            torch.manual_seed(seed)
            if self.index_gen is not self.gen:
                self.index_gen.manual_seed(self._index_seed(self.step))

    def _truncate_metrics(self, path: Path) -> None:
        """Drop metric lines logged after the checkpoint and any line a kill left half-written, so
        a resumed log has no duplicates and parses."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                if isinstance(entry, dict) and entry["step"] <= self.step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a partial or damaged line
        atomic_write_text("".join(ln + "\n" for ln in keep), path)

    def save(self) -> None:
        """Write the checkpoint (rank 0); every rank must call it. The first one of a run that
        replaces another (``--force``) puts the new run in place of the old."""
        state = self._state()
        if state is None:
            return
        try:
            save_checkpoint(state, self.path / CHECKPOINT)
            self.rundir.commit()
        except OSError as e:
            raise TrainingError(f"could not write the checkpoint of step {self.step} in "
                                f"{self.path} ({e.strerror or e}); {self._kept()}") from None
        self.saved_step = self.step

    def _kept(self) -> str:
        """What is on disk now, for a message about a run that stopped."""
        if self.rundir is not None and self.rundir.staged:
            return f"the old run in {self.out} is untouched"
        if self.saved_step is not None:
            return (f"the last good checkpoint (step {self.saved_step}) in {self.out} is kept; "
                    "continue with the same command and --resume")
        return f"no checkpoint was written in {self.out}; rerun with --force to start over"

    def _loss(self, x0: torch.Tensor) -> torch.Tensor:
        if self.cfg.engine == "pyro":
            import pyro
            from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

            from .markov import chain_guide, chain_model

            pyro.clear_param_store()
            # vlb: a site per step for TraceMeanField_ELBO's analytic KLs (T network calls in turn);
            # trajectory: the chain as one site, the network at all T steps in one call
            elbo, model, guide = ((TraceMeanField_ELBO(), markov_model, posterior_guide)
                                  if self.cfg.objective == "vlb"
                                  else (Trace_ELBO(), chain_model, chain_guide))
            return elbo.differentiable_loss(model, guide, self.model, x0) / x0.shape[0]
        out = self.loss_fn(self.model, x0, sampler=self.sampler, generator=self.gen,
                           **self.loss_options)
        if out.term is not None and self.cfg.sampler != "uniform":  # uniform keeps no statistics
            self.sampler.update(*gather_steps(out.t, out.term))
        return out.loss.mean()

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: its indices (where the data is) and x_0 on the device."""
        idx = torch.randint(self.train_x.shape[0], (self.local_batch,), generator=self.index_gen,
                            device=self.data_device)
        return idx, self._gather(self.train_x, idx)

    def _gather(self, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``table[idx]`` on the device. From pinned host data it is gathered into a fresh pinned
        block and copied without a wait (the caching host allocator does not hand the block out
        again before that copy has finished)."""
        if not self.pinned:
            return table[idx].to(self.device)  # no copy with the data on the device
        rows = torch.empty((idx.shape[0],) + table.shape[1:], dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, idx, out=rows)
        return rows.to(self.device, non_blocking=True)

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch's labels, each replaced by the null label with probability label_dropout."""
        y = self._gather(self.train_y, idx)
        drop = torch.rand(y.shape, generator=self.gen, device=self.device) < self.cfg.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def _lr(self) -> float:
        return self.cfg.lr * min(1.0, (self.step + 1) / max(1, self.cfg.warmup))

    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(*self._ema_pairs, 1 - decay)  # e += (1 - decay) (p - e), fused

    def _check_finite(self, since: int, first_ok: torch.Tensor, nonfinite: torch.Tensor,
                      weights: bool, across_ranks: bool = True) -> None:
        """Raise ``TrainingError`` if a loss since step ``since`` (or, with ``weights``, a weight)
        is non-finite on any rank (on this one without ``across_ranks``). ``first_ok`` counts the
        steps before the first non-finite loss, ``nonfinite`` says whether there was one: both kept
        on the device, read here only."""
        first = torch.where(nonfinite, since + first_ok, torch.full_like(first_ok, 2**62))
        bad_weights = torch.zeros_like(first_ok)
        if weights:
            ok = torch.stack([torch.isfinite(p).all() for p in self.net.parameters()]).all()
            bad_weights = (~ok).long()
        both = torch.stack([first, -bad_weights])
        first, bad_weights = (distributed.all_reduce(both, "min") if across_ranks else both).tolist()
        if first < 2**62 or bad_weights:
            what = (f"non-finite loss at step {first}" if first < 2**62
                    else f"non-finite weights by step {self.step}")
            error = TrainingError(f"{what}; stopped at step {self.step} before saving: "
                                  f"{self._kept()}")
            error.on_every_rank = across_ranks and distributed.world_size() > 1
            raise error

    def train(self, progress: bool = True) -> dict:
        """Run to ``cfg.iterations`` steps; returns the last logged metrics (on every rank).

        Finiteness is checked where the loss is read anyway, at log and checkpoint steps (a check
        every step would wait for the device every step), and always before a checkpoint is written.
        """
        from tqdm import tqdm

        cfg = self.cfg
        main = distributed.is_main()
        bar = tqdm(total=cfg.iterations, initial=self.step, disable=not (progress and main),
                   desc="train", dynamic_ncols=True)
        log = (self.path / "metrics.jsonl").open("a") if main else None
        last, t0, since = {}, time.perf_counter(), self.step
        # the loss is summed on the device (self.loss_sum): no sync per step
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        first_ok = torch.zeros((), dtype=torch.long, device=self.device)
        checked = self.step  # losses before this step are known to be finite
        # on the CPU reading a loss costs no device round-trip: count in Python, which is cheaper
        # than the two tensor updates per step the accelerator path needs
        host = self.device.type == "cpu"
        host_ok, host_bad = 0, False

        def flags() -> tuple[torch.Tensor, torch.Tensor]:
            if host:
                first_ok.fill_(host_ok)
                nonfinite.fill_(host_bad)
            return first_ok, nonfinite

        try:
            while self.step < cfg.iterations:
                idx, x0 = self._batch()
                try:
                    if self.labelled is not None:
                        self.labelled.labels = self._labels(idx)
                    loss = self._loss(x0)
                    for g in self.opt.param_groups:
                        g["lr"] = self._lr()
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
                    self.opt.step()
                except (ValueError, RuntimeError) as error:
                    # weights made non-finite by an unchecked step fail the next one (a distribution
                    # refusing a NaN parameter, a NaN sampling probability): report the cause
                    try:
                        self._check_finite(checked, *flags(), weights=True, across_ranks=False)
                    except TrainingError as cause:
                        raise cause from error
                    except Exception:  # the check itself failed: the first error says more
                        pass
                    raise
                self._update_ema()
                self.step += 1
                self.steps_since_log += 1
                self.loss_sum += loss.detach()
                if not host:
                    nonfinite |= ~torch.isfinite(loss.detach())
                    first_ok += ~nonfinite
                elif not host_bad:
                    host_bad = not math.isfinite(loss.item())
                    host_ok += not host_bad
                bar.update(1)
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.iterations
                save_now = self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations
                if not (log_now or save_now):
                    continue
                self._check_finite(checked, *flags(), weights=save_now)
                checked, host_ok = self.step, 0
                first_ok.zero_()
                if log_now:
                    elapsed = time.perf_counter() - t0
                    mean = distributed.all_reduce(self.loss_sum, "mean") / self.steps_since_log
                    # it/s over this session's steps of the line (a resumed line counts its own)
                    last = {"step": self.step, "loss": mean.item(), "lr": self._lr(),
                            "it_per_s": done / elapsed if (done := self.step - since) and elapsed > 0
                            else None}
                    if log is not None:
                        self._write_log(log, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    t0, since, self.steps_since_log = time.perf_counter(), self.step, 0
                    self.loss_sum.zero_()
                if save_now:
                    self.save()
        except KeyboardInterrupt as e:
            e.resume_hint = self._kept()
            raise
        finally:
            if log is not None:
                log.close()
            bar.close()
            if self.rundir is not None:
                self.rundir.abandon()  # a staged run that never reached a checkpoint
                self.rundir.release()
        return last

    def _write_log(self, log, entry: dict) -> None:
        try:
            log.write(json.dumps(entry) + "\n")
            log.flush()
        except OSError as e:
            raise TrainingError(f"could not write {self.path / 'metrics.jsonl'} ({e.strerror or e}); "
                                f"{self._kept()}") from None
