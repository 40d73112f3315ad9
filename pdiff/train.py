"""The trainer for toy and image data: a config, a run directory, atomic checkpoints, exact resume.

A run directory holds ``config.json``, ``checkpoint.pt`` (weights, EMA weights, optimizer, step,
RNG state, timestep-sampler state, configuration, rescaling) and ``metrics.jsonl`` (one line per
logged step: the mean loss over the steps since the previous line). Every random draw of training
comes from one ``torch.Generator`` saved in the checkpoint, so a resumed run reproduces an
uninterrupted one exactly (on the same device).
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .data import IMAGE_DATASETS, RESCALINGS, TOY_DATASETS, Rescaling
from .distributions.reverse import DECODER_VARIANCES, LEARNED_VARIANCES, VARIANCES, ReverseProcess
from .markov import forward_guide, model as markov_model, posterior_guide
from .nets import EMBEDDINGS, MeanVarianceNets, MLPDenoiser, UNet, unet_for
from .objectives import OBJECTIVES, SAMPLERS, get_objective, make_sampler
from .parameterization import PREDICTIONS
from .run_data import is_image_data, load_run_data
from .schedules import SCHEDULES, make_schedule

ENGINES = ("torch", "pyro")
NETS = ("auto", "mlp", "mean_variance", "unet")
# Image runs (U-Net, T network passes of a bigger net per batch on CPU): smaller batches, a lower
# learning rate and a slower EMA than the toys, as the DDPM and Improved-DDPM image runs use.
IMAGE_DEFAULTS = {"batch_size": 64, "lr": 1e-3, "ema_decay": 0.999, "warmup": 200,
                  "iterations": 4000}
CHECKPOINT = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run (the command line and experiments fill it in).

    ``net`` ``auto`` is the MLP for toys and the U-Net for images; ``hidden`` and ``depth`` size
    the MLP, ``channels`` (0: sized by ``unet_for`` for the image size) and ``dropout`` the U-Net.
    ``data_dir`` and ``image_size`` apply to image datasets.
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

    CHOICES = {"data": tuple(sorted(TOY_DATASETS)) + IMAGE_DATASETS, "variance": VARIANCES, "prediction": PREDICTIONS,
               "schedule": SCHEDULES, "decoder_variance": DECODER_VARIANCES, "rescale": RESCALINGS,
               "embedding": EMBEDDINGS, "net": NETS, "engine": ENGINES,
               "objective": OBJECTIVES, "sampler": SAMPLERS}

    def validate(self) -> "TrainConfig":
        """Refuse inconsistent options with a ``ValueError`` naming what is valid."""
        get_objective(self.objective)
        make_sampler(self.sampler, 1)
        for name, valid in self.CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.engine == "pyro" and self.objective not in ("vlb", "trajectory"):
            raise ValueError("the pyro engine trains the bound objectives through Pyro's ELBOs; "
                             f"--objective must be vlb or trajectory with it, got {self.objective!r}")
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
        if not (self.lr > 0 and 0 <= self.ema_decay < 1 and self.grad_clip > 0):
            raise ValueError("need lr > 0, 0 <= ema_decay < 1 and grad_clip > 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        return self

    @classmethod
    def for_data(cls, data: str, **changes) -> "TrainConfig":
        """The defaults for ``data`` (``IMAGE_DEFAULTS`` for image datasets), then ``changes``."""
        base = IMAGE_DEFAULTS if is_image_data(data) else {}
        return cls(data=data, **(base | changes))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def build_net(cfg: TrainConfig, event_shape) -> torch.nn.Module:
    """The denoiser for data of ``event_shape``: (D,) for toys, (C, H, W) for images."""
    mult = 2 if cfg.variance in LEARNED_VARIANCES else 1
    if is_image_data(cfg.data):
        C, H, W = event_shape
        width = {"base_channels": cfg.channels} if cfg.channels else {}
        return UNet(**unet_for(H, C, out_multiplier=mult, dropout=cfg.dropout, **width))
    dim = event_shape[0]
    kw = dict(hidden=cfg.hidden, depth=cfg.depth, embedding=cfg.embedding)
    if cfg.net == "mean_variance":
        return MeanVarianceNets(MLPDenoiser(dim, cfg.timesteps, **kw), MLPDenoiser(dim, cfg.timesteps, **kw))
    return MLPDenoiser(dim, cfg.timesteps, out_multiplier=mult, **kw)


def build_model(cfg: TrainConfig, net, num_levels: int | None = None) -> ReverseProcess:
    """p_theta around ``net``: a Gaussian decoder for toys, the discretized decoder over
    ``num_levels`` levels (and 3 event dimensions) for images."""
    schedule = make_schedule(cfg.schedule, cfg.timesteps)
    image = num_levels is not None
    return ReverseProcess(net, schedule, prediction=cfg.prediction, variance=cfg.variance,
                          decoder_variance=cfg.decoder_variance,
                          decoder="discretized" if image else "gaussian", num_levels=num_levels,
                          event_dims=3 if image else 1)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: a kill leaves either the
    old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class Run:
    """A loaded run: configuration, the model with EMA weights (what is evaluated), the rescaling."""

    config: TrainConfig
    model: ReverseProcess
    rescaling: Rescaling
    step: int
    event_shape: tuple[int, ...] | None = None  # default: the rescaling's shape, (D,) for toys

    def __post_init__(self):
        if self.event_shape is None:
            self.event_shape = tuple(self.rescaling.shift.shape)


def load_run(out: str | Path, *, ema: bool = True, device: str = "cpu") -> Run:
    """Load a run directory's checkpoint; ``ValueError`` if it is missing or unreadable."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no checkpoint in {str(out)!r} (expected {path})")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        cfg = TrainConfig.from_dict(state["config"])
        event_shape = tuple(state["event_shape"] if "event_shape" in state else (state["dim"],))
        net = build_net(cfg, event_shape)
        net.load_state_dict(state["ema" if ema else "net"])
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} is corrupt or not a pdiff checkpoint: {e}") from None
    net.to(device, torch.float32).eval()
    resc = Rescaling(state["rescale_shift"], state["rescale_scale"])
    model = build_model(cfg, net, state.get("num_levels"))
    return Run(cfg, model, resc, state["step"], event_shape)


class Trainer:
    """Trains ``cfg`` into the run directory ``out``."""

    def __init__(self, cfg: TrainConfig, out: str | Path, *, resume: bool = False, force: bool = False):
        self.cfg = cfg.validate()
        self.out = Path(out)
        self._prepare_dir(resume, force)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        data = load_run_data(cfg)
        self.event_shape, self.num_levels = data.event_shape, data.num_levels
        self.rescaling = data.rescaling
        self.train_x = data.train.to(self.device, torch.float32)
        self.net = build_net(cfg, self.event_shape).to(self.device, torch.float32)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.model = build_model(cfg, self.net, self.num_levels)
        self.loss_fn = get_objective(cfg.objective)
        self.sampler = make_sampler(cfg.sampler, cfg.timesteps)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        if resume and (self.out / CHECKPOINT).exists():
            self._load()

    def _prepare_dir(self, resume: bool, force: bool) -> None:
        ckpt = self.out / CHECKPOINT
        if self.out.exists() and any(self.out.iterdir()) and not (resume or force):
            raise ValueError(f"run directory {str(self.out)!r} exists and is not empty; pass --resume "
                             "to continue it or --force to overwrite it")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"cannot write to run directory {str(self.out)!r}: {e.strerror}") from None
        if resume and ckpt.exists():
            saved = json.loads((self.out / "config.json").read_text())
            mine = asdict(self.cfg)
            differ = [k for k in mine if k not in ("iterations", "device", "log_every",
                                                   "checkpoint_every") and saved.get(k) != mine[k]]
            if differ:
                raise ValueError(f"cannot resume {str(self.out)!r}: its configuration differs in "
                                 + ", ".join(f"{k} (saved {saved.get(k)!r}, given {mine[k]!r})" for k in differ))
        elif force:
            for name in (CHECKPOINT, "metrics.jsonl", "config.json"):
                (self.out / name).unlink(missing_ok=True)
        atomic_write_text(json.dumps(asdict(self.cfg), indent=2), self.out / "config.json")

    def _state(self) -> dict:
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step, "generator": self.gen.get_state(), "sampler": self.sampler.state_dict(),
                "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg),
                "event_shape": list(self.event_shape), "num_levels": self.num_levels,
                "rescale_shift": self.rescaling.shift, "rescale_scale": self.rescaling.scale}

    def _load(self) -> None:
        try:
            state = torch.load(self.out / CHECKPOINT, map_location=self.device, weights_only=False)
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            self.gen.set_state(state["generator"])
            self.sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            self.step = state["step"]
        except Exception as e:
            raise ValueError(f"checkpoint {self.out / CHECKPOINT} is corrupt or not a pdiff "
                             f"checkpoint: {e}") from None
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint, so a resumed log has no duplicates."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            atomic_write_text("".join(ln + "\n" for ln in keep), path)

    def save(self) -> None:
        atomic_save(self._state(), self.out / CHECKPOINT)

    def _loss(self, x0: torch.Tensor) -> torch.Tensor:
        if self.cfg.engine == "pyro":
            import pyro
            from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

            pyro.clear_param_store()
            elbo, guide = ((TraceMeanField_ELBO(), posterior_guide) if self.cfg.objective == "vlb"
                           else (Trace_ELBO(), forward_guide))
            return elbo.differentiable_loss(markov_model, guide, self.model, x0) / x0.shape[0]
        out = self.loss_fn(self.model, x0, sampler=self.sampler, generator=self.gen)
        if out.term is not None:
            self.sampler.update(out.t, out.term)
        return out.loss.mean()

    def _lr(self) -> float:
        return self.cfg.lr * min(1.0, (self.step + 1) / max(1, self.cfg.warmup))

    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.lerp_(p, 1 - decay)

    def train(self, progress: bool = True) -> dict:
        """Run to ``cfg.iterations`` steps; returns the last logged metrics."""
        from tqdm import tqdm

        cfg, n = self.cfg, self.train_x.shape[0]
        bar = tqdm(total=cfg.iterations, initial=self.step, disable=not progress, desc="train",
                   dynamic_ncols=True)
        log = (self.out / "metrics.jsonl").open("a")
        last, t0, done_since = {}, time.perf_counter(), 0
        loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        try:
            while self.step < cfg.iterations:
                idx = torch.randint(n, (cfg.batch_size,), generator=self.gen, device=self.device)
                loss = self._loss(self.train_x[idx])
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.step}; the last "
                                        f"good checkpoint in {self.out} is kept")
                for g in self.opt.param_groups:
                    g["lr"] = self._lr()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
                self.opt.step()
                self._update_ema()
                self.step += 1
                done_since += 1
                loss_sum += loss.detach()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                    elapsed = time.perf_counter() - t0
                    last = {"step": self.step, "loss": (loss_sum / done_since).item(), "lr": self._lr(),
                            "it_per_s": done_since / elapsed if elapsed > 0 else math.nan}
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    t0, done_since = time.perf_counter(), 0
                    loss_sum.zero_()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                    self.save()
        finally:
            log.close()
            bar.close()
        return last
