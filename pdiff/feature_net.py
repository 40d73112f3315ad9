"""The classifier whose features ``pdiff.sample_quality`` measures samples on: trained once per
dataset on its training split, cached beside the data.

Recipe (``RECIPE``, version ``RECIPE_VERSION``): ``nets.classifier.FeatureNet`` (width 16,
128 features), float32, Adam at 5e-3 decayed along a cosine to 0, min(50 epochs, 1000) steps of
128 images (digits: 585 steps; MNIST, Fashion-MNIST, CIFAR-10: 1000 steps, 2-2.5 epochs) drawn
without replacement epoch by epoch from a seeded permutation, no augmentation. Everything is
seeded: one seed gives one network (on one machine and thread count). The cache file's name holds
the dataset, the image shape, K, the recipe version and a hash of the recipe and of the training
images and labels, so a changed recipe or split is a new file.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import checksum, save_checkpoint, size_mismatch
from .data.images import ImageData, load_images
from .files import unwritable
from .nets.classifier import FeatureNet

RECIPE_VERSION = 1  # raise it whenever FeatureNet or train_feature_net changes: old files go stale
RECIPE = {"version": RECIPE_VERSION, "width": 16, "feature_dim": 128, "epochs": 50,
          "max_steps": 1000, "batch_size": 128, "lr": 5e-3, "seed": 0}
CACHE_ENV = "PDIFF_CACHE"
_warned: set[str] = set()
_uncached: dict[str, "TrainedFeatureNet"] = {}  # cache path -> network trained where none is kept


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def to_grid(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """x clamped to [-1, 1] and rounded to the nearest of the K levels -1 + 2 k / (K - 1), in
    float64 (what ``data.images.to_levels`` computes) and then x's dtype."""
    k = ((x.double().clamp(-1, 1) + 1) * (num_levels - 1) / 2).round()
    return (-1 + 2 * k / (num_levels - 1)).to(x.dtype)


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                      seed: int = 0, steps: int = 1000, batch_size: int = 128, lr: float = 5e-3,
                      width: int = 16, feature_dim: int = 128) -> FeatureNet:
    """A ``FeatureNet`` trained by cross-entropy on ``images`` (N, C, H, W) in [-1, 1] and their
    ``labels`` (N,), in float32 on the images' device, as the module docstring describes. The
    global RNG is left as it was."""
    if images.dim() != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images (N, C, H, W) and labels (N,), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    num_classes = num_classes or int(labels.max()) + 1
    x, y = images.to(torch.float32), labels.to(device=images.device, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(x.shape[1], num_classes, width=width, feature_dim=feature_dim,
                         dtype=torch.float32)
    net = net.to(x.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    order, pos = torch.randperm(len(x), generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + batch_size].to(x.device)
        pos += batch_size
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 1024) -> float:
    """The fraction of ``images`` the classifier labels correctly."""
    p = next(net.parameters())
    correct = sum((net(xb.to(p)).argmax(1).cpu() == yb.cpu()).sum().item()
                  for xb, yb in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / len(images)


@dataclass
class TrainedFeatureNet:
    """A trained ``FeatureNet`` and what it is: ``info`` holds the dataset, image shape, K, the
    recipe, its hash (``key``) and the test accuracy."""
    net: FeatureNet
    info: dict

    @property
    def description(self) -> str:
        i = self.info
        return (f"FeatureNet v{i['recipe']['version']} ({i['key'][:12]}) trained on {i['dataset']} "
                f"{'x'.join(map(str, i['shape']))} K={i['num_levels']}: test accuracy "
                f"{100 * i['test_accuracy']:.2f}%, {i['recipe']['feature_dim']} features")

    @torch.no_grad()
    def features(self, images: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """(N, feature_dim) float64 features of images (N, C, H, W), first rounded to the K
        levels (samples off the grid are compared as the images they would be saved as)."""
        shape = tuple(self.info["shape"])
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"this feature network takes images (N, "
                             f"{', '.join(map(str, shape))}), got {tuple(images.shape)}")
        net = self.net.to(images.device)
        out = [net.features(to_grid(xb, self.info["num_levels"]).to(torch.float32))
               for xb in images.split(batch_size)]
        return torch.cat(out).to(torch.float64)


def _fingerprint(data: ImageData) -> str:
    """SHA-256 of the training images (as integer levels, whatever the dtype) and labels."""
    h = hashlib.sha256(f"{data.name}{tuple(data.train.shape)}{data.num_levels}".encode())
    for xb in data.train.split(8192):
        k = ((xb.float() + 1) * (data.num_levels - 1) / 2).round().to(torch.int32)  # exact
        h.update(k.cpu().numpy().tobytes())
    h.update(data.train_labels.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()


def recipe_steps(num_train: int, recipe: dict = RECIPE) -> int:
    """The recipe's number of steps for ``num_train`` training images: min(epochs, max_steps)."""
    return min(recipe["max_steps"], math.ceil(recipe["epochs"] * num_train / recipe["batch_size"]))


def default_cache_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$PDIFF_CACHE``, else ``~/.cache/pdiff``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pdiff").expanduser()


def _read_cache(path: Path, key: str) -> tuple[FeatureNet | None, dict | None, str]:
    """(net, info, "") from a verified cache file, or (None, None, why it cannot be used)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or corrupt
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        return None, None, f"unreadable, {type(e).__name__}: {first}"
    if not isinstance(state, dict) or not {"net", "info", "checksum"} <= set(state):
        return None, None, "not a pdiff feature-network file"
    stored = state.pop("checksum")
    if checksum(state) != stored:
        return None, None, "its contents do not match the checksum stored when it was written"
    info = state["info"]
    if not isinstance(info, dict) or info.get("key") != key:
        return None, None, "it was trained by another recipe or on other data"
    try:
        r = info["recipe"]
        net = FeatureNet(info["shape"][0], info["num_classes"], width=r["width"],
                         feature_dim=r["feature_dim"], dtype=torch.float32)
        if (why := size_mismatch(net, state["net"])) is not None:
            return None, None, why
        net.load_state_dict(state["net"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        return None, None, f"not a complete feature-network file ({type(e).__name__}: {e})"
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        return None, None, "non-finite weights"
    return net.eval(), info, ""


def _unwritable(path: Path) -> str | None:
    """``files.unwritable``, and a folder without write permission bits counts as read-only even
    for root (a shared data folder marked read-only is left alone)."""
    if (why := unwritable(path)) is not None:
        return why
    if path.parent.is_dir() and not path.parent.stat().st_mode & 0o222:
        return f"folder {path.parent} is read-only"
    return None


def feature_net_for(dataset_name: str, data_dir: str | Path | None = None, *,
                    data: ImageData | None = None, image_size: int | None = None,
                    cache_dir: str | Path | None = None, seed: int = RECIPE["seed"],
                    steps: int | None = None) -> TrainedFeatureNet:
    """The feature network for ``dataset_name``'s training split: loaded from the cache if a
    verified file is there, else trained (``train_feature_net``), tested on the test split and
    saved atomically with a checksum.

    ``data``: the ``load_images`` result if the caller has it (else loaded from ``data_dir`` at
    ``image_size``). The cache folder is ``cache_dir``, else ``default_cache_dir(data_dir)``
    (digits, which has no files: ``$PDIFF_CACHE`` or ``~/.cache/pdiff``). A damaged file is
    retrained and replaced, never trusted. An unwritable or read-only folder (no write permission
    bits, even for root) means one warning per folder and a network kept in memory for this
    process only. Two processes racing each write a whole file, the last rename winning.
    ``seed`` and ``steps`` (default ``recipe_steps``) change the recipe, hence the file.
    """
    if data is None:
        data = load_images(dataset_name, data_dir=data_dir, image_size=image_size)
    elif data.name != dataset_name:
        raise ValueError(f"data holds {data.name!r}, not {dataset_name!r}")
    if data.train_labels is None or data.test_labels is None:
        raise ValueError(f"{dataset_name} has no labels: a feature network needs a labelled "
                         "training split")
    recipe = RECIPE | {"seed": seed, "steps": steps or recipe_steps(len(data.train))}
    shape = list(data.event_shape)
    key = hashlib.sha256(f"{sorted(recipe.items())}{_fingerprint(data)}".encode()).hexdigest()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(data_dir)
    path = folder / (f"feature_net_{dataset_name}_{'x'.join(map(str, shape))}_K{data.num_levels}"
                     f"_v{RECIPE_VERSION}_{key[:16]}.pt")
    if str(path) in _uncached:
        return _uncached[str(path)]
    if path.is_file():
        net, info, why = _read_cache(path, key)
        if net is not None:
            return TrainedFeatureNet(net, info)
        warnings.warn(f"feature-network cache {path} cannot be used ({why}); retraining it",
                      stacklevel=2)
    net = train_feature_net(data.train, data.train_labels, num_classes=data.num_classes,
                            seed=seed, steps=recipe["steps"], batch_size=recipe["batch_size"],
                            lr=recipe["lr"], width=recipe["width"],
                            feature_dim=recipe["feature_dim"]).cpu()
    info = {"dataset": dataset_name, "shape": shape, "num_levels": data.num_levels,
            "num_classes": data.num_classes or int(data.train_labels.max()) + 1,
            "recipe": recipe, "key": key, "num_train": len(data.train),
            "test_accuracy": accuracy(net, data.test, data.test_labels)}
    if (why := _unwritable(path)) is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint({"net": net.state_dict(), "info": info}, path)
        except OSError as e:
            why = f"cannot write {path}: {e}"
    trained = TrainedFeatureNet(net, info)
    if why is not None:
        _warn_once(str(folder), f"the feature network is not cached ({why}): it is kept for "
                   "this process only and retrained by the next")
        _uncached[str(path)] = trained
    return trained
