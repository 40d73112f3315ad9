"""Image datasets as tensors on the K-level grid of Ho et al. (2020), sec. 3.3.

Pixel values v in {0, ..., K-1} become x = -1 + 2 v / (K-1), exactly the K levels the discretized
decoder (eq. 13) puts its bins on: K = 17 for scikit-learn's digits, K = 256 for 8-bit images.
Files are parsed with numpy, PIL and a restricted unpickler; nothing here needs torchvision.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write

IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")
DIGITS_NUM_TEST = 300  # of scikit-learn's 1797 digits: 1497 train, 300 test
FOLDER_TEST_FRACTION = 0.1
FOLDER_IMAGE_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# name -> (torchvision's raw folder, download URL prefix, md5 of each gzipped IDX file)
IDX_SOURCES = {
    "mnist": ("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/",
              ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
               "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion_mnist": ("FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                       "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


class DataFileError(ValueError):
    """A data file is missing, truncated or corrupt; the message names it and what was expected."""


@dataclass
class ImageData:
    """Train and test images (N, C, H, W) on the ``num_levels`` grid in [-1, 1]; labels if any."""
    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    num_levels: int
    num_classes: int | None

    @property
    def event_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    @property
    def num_dims(self) -> int:
        return int(np.prod(self.event_shape))


def split_indices(n: int, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a seeded permutation of range(n): test the first ``num_test``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[num_test:], perm[:num_test]


def to_levels(v: np.ndarray, num_levels: int) -> torch.Tensor:
    """x = -1 + 2 v / (K-1) for integer levels v in 0..K-1, in the default dtype (by lookup)."""
    k = torch.arange(num_levels, dtype=torch.float64)
    table = (-1.0 + 2.0 * k / (num_levels - 1)).to(torch.get_default_dtype())
    return table[torch.from_numpy(np.ascontiguousarray(v, dtype=np.int32))]


def to_uint8_grid(x: torch.Tensor, num_levels: int, *, nrow: int | None = None) -> np.ndarray:
    """Inverse of ``to_levels`` for PNGs: level k = round((x+1)(K-1)/2) -> round(255 k/(K-1)).

    ``x`` (C, H, W) gives one (H, W, C) image; (N, C, H, W) gives the images tiled row by row,
    ``nrow`` per row (default ceil(sqrt(N))), empty cells black. C = 1 is squeezed to (H, W).
    Values off the grid (model samples) are clamped and rounded to the nearest level.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    k = ((x.detach().double().cpu() + 1) * (num_levels - 1) / 2).round().clamp(0, num_levels - 1)
    u = (k * 255 / (num_levels - 1)).round().to(torch.uint8)
    if u.dim() == 4:
        n, c, h, w = u.shape
        nrow = nrow or int(np.ceil(np.sqrt(n)))
        rows = -(-n // nrow)
        u = torch.cat([u, u.new_zeros(rows * nrow - n, c, h, w)])
        u = u.reshape(rows, nrow, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, nrow * w)
    img = u.permute(1, 2, 0).numpy()  # (H, W, C)
    return img[..., 0] if img.shape[-1] == 1 else img


def _resize(v: np.ndarray, size: int, num_levels: int) -> np.ndarray:
    """Integer levels (N, C, H, W) resized to size x size (area down, bilinear up), re-quantized."""
    out = []
    for chunk in np.array_split(v, max(1, len(v) // 8192)):
        t = torch.from_numpy(chunk.astype(np.float32))
        down = size <= min(t.shape[-2:])
        t = F.interpolate(t, size=(size, size), mode="area" if down else "bilinear",
                          **({} if down else {"align_corners": False}))
        out.append(t.round().clamp(0, num_levels - 1).numpy().astype(np.int32))
    return np.concatenate(out)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A uint8 IDX array (magic 2051: images (N, H, W); 2049: labels (N,)), gzipped or not."""
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFileError(f"{path}: could not read ({e}); expected an IDX file") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else "none (under 4 bytes)"
        raise DataFileError(f"{path}: bad magic number {got}, expected {magic} (uint8 IDX)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path}: truncated header, expected {ndim} dimensions")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise DataFileError(f"{path}: payload has {len(raw) - header} bytes, expected "
                            f"{int(np.prod(dims))} for dims {dims} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch ``url`` to ``dest`` atomically (a temporary file renamed), checking its md5."""
    dest.parent.mkdir(parents=True, exist_ok=True)  # its own error, not a failed download

    def fetch(tmp: str) -> None:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            while block := r.read(1 << 20):
                f.write(block)
        if (got := hashlib.md5(Path(tmp).read_bytes()).hexdigest()) != md5:
            raise DataFileError(f"download of {url} has md5 {got}, expected {md5}")
    try:
        atomic_write(dest, fetch, suffix=".part")
    except (OSError, http.client.HTTPException) as e:
        raise DataFileError(f"could not download {url} (offline?): {e}; "
                            f"put the files in {dest.parent}") from None


def _missing(name: str, files, dirs, source: str) -> DataFileError:
    return DataFileError(f"{name}: missing {', '.join(files)} in {' or '.join(map(str, dirs))}; "
                         f"{source} and put them in one of those folders, or point --data-dir at "
                         "the folder that holds them")


def _load_idx(name: str, root: Path, download: bool):
    raw_dir, base_url, md5s = IDX_SOURCES[name]
    dirs = [root, root / raw_dir / "raw"]

    def find(f):
        found = (d / (f + s) for d in dirs for s in ("", ".gz") if (d / (f + s)).is_file())
        return next(found, None)
    if download:
        for f, md5 in zip(IDX_FILES, md5s):
            if find(f) is None:
                _download(base_url + f + ".gz", root / (f + ".gz"), md5)
    paths = [find(f) for f in IDX_FILES]
    if None in paths:
        missing = [f + "[.gz]" for f, p in zip(IDX_FILES, paths) if p is None]
        raise _missing(name, missing, dirs, f"download the four IDX files (gzipped) from {base_url}")
    xs = [read_idx(p, 2051 if "images" in p.name else 2049) for p in paths]
    for (img, lab), (pi, pl) in zip([xs[:2], xs[2:]], [paths[:2], paths[2:]]):
        if img.ndim != 3 or lab.ndim != 1 or len(img) != len(lab):
            raise DataFileError(f"{pi} has {img.shape} images and {pl} has {lab.shape} labels; "
                                "expected (N, H, W) images and N labels")
        if len(img) == 0:
            raise DataFileError(f"{pi} holds 0 images; expected the {name} "
                                f"{'test' if 't10k' in pi.name else 'training'} images")
    if xs[0].shape[1:] != xs[2].shape[1:]:  # a run is evaluated on its test images
        raise DataFileError(f"{paths[2]} holds images of {tuple(xs[2].shape[1:])} pixels and "
                            f"{paths[0]} of {tuple(xs[0].shape[1:])}: the test images must have "
                            "the training images' size")
    return xs[0][:, None], xs[1], xs[2][:, None], xs[3]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar(path: Path):
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # pickle raises nearly anything on corrupt input
        raise DataFileError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                            "expected a pickled dict with b'data' and b'labels'") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DataFileError(f"{path}: data {data.shape} and labels {labels.shape}; "
                            "expected (N, 3072) and (N,)")
    return data.reshape(-1, 3, 32, 32), labels  # rows are 1024 R, 1024 G, 1024 B, each row-major


def _load_cifar(root: Path, download: bool):
    dirs = [root, root / CIFAR_FOLDER]
    base = next((d for d in dirs if all((d / f).is_file() for f in CIFAR_FILES)), None)
    archive = root / "cifar-10-python.tar.gz"
    if base is None and (download or archive.is_file()):
        if not archive.is_file():
            _download(CIFAR_URL, archive, CIFAR_MD5)
        try:
            with tarfile.open(archive) as tar:
                # the "data" filter refuses absolute paths and links out of root (Python >= 3.11.4)
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(root, **safe)
        except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
            raise DataFileError(f"{archive}: could not extract ({e}); expected "
                                f"a tar.gz holding {CIFAR_FOLDER}/") from None
        base = root / CIFAR_FOLDER
    if base is None or not all((base / f).is_file() for f in CIFAR_FILES):
        raise _missing("cifar10", CIFAR_FILES, dirs, f"download {CIFAR_URL}, extract the batches "
                       f"(the archive's {CIFAR_FOLDER}/ folder)")
    train = [_read_cifar(base / f) for f in CIFAR_FILES[:-1]]
    test = _read_cifar(base / CIFAR_FILES[-1])
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), *test)


def _load_folder(root: Path, size: int):
    """Every PNG/JPEG under ``root``: RGB, shorter side to ``size`` (bicubic), centre-cropped."""
    from PIL import Image  # Pillow comes with matplotlib

    if not root.is_dir():
        raise DataFileError(f"{root}: no such folder; expected a folder of .png/.jpg images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise DataFileError(f"{root}: found {len(paths)} .png/.jpg/.jpeg images, expected at "
                            "least 2 (one for training, one for testing)")
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataFileError(f"{p}: unreadable image ({e}); expected a PNG or JPEG") from None
        w, h = im.size
        s = size / min(w, h)
        if s != 1:
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        out[i] = np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)
    return out


def load_bytes(name: str, *, data_dir: str | Path | None = None,
               image_size: int | None = None) -> float:
    """About the peak memory of ``load_images`` at ``image_size`` (0 when it keeps the files' own
    size): every image's C x size x size levels as uint8 or int32 on the way and in the default
    dtype at the end. The number of images is read from the files' headers where it can be."""
    if name == "folder":
        image_size = image_size or FOLDER_IMAGE_SIZE
    if image_size is None or name not in IMAGE_DATASETS:
        return 0.0
    n, c = _num_images(name, Path(data_dir).expanduser() if data_dir is not None else None)
    return n * c * image_size**2 * (1 + 4 + 4 + torch.get_default_dtype().itemsize)


def _num_images(name: str, root: Path | None) -> tuple[int, int]:
    """(N, C): the train and test images together and their channels (the standard files' counts
    where the files cannot be read; the loader then says what is wrong)."""
    if name == "digits":
        return 1797, 1
    if name == "cifar10":
        return 60000, 3
    if root is None or not root.is_dir():
        return 0, 3
    if name == "folder":
        return sum(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*")), 3
    n = 0
    for f in (IDX_FILES[0], IDX_FILES[2]):
        for path in (d / (f + s) for d in (root, root / IDX_SOURCES[name][0] / "raw")
                     for s in ("", ".gz")):
            if path.is_file():
                try:
                    with _open(path) as fh:
                        n += int.from_bytes(fh.read(8)[4:8], "big")
                except (OSError, EOFError, zlib.error):
                    pass
                break
    return n or 70000, 1


def load_images(name: str, *, data_dir: str | Path | None = None, image_size: int | None = None,
                download: bool = False, seed: int = 0) -> ImageData:
    """The image dataset ``name`` (one of ``IMAGE_DATASETS``) on its K-level grid in [-1, 1].

    digits: scikit-learn's 1797 8x8 digits, K = 17, split by ``seed`` into 1497 train / 300 test.
    mnist, fashion_mnist: the four IDX files (plain or .gz) in ``data_dir`` or torchvision's
    ``data_dir/MNIST/raw`` (``FashionMNIST/raw``); 60000 / 10000, K = 256.
    cifar10: the python batches in ``data_dir`` or ``data_dir/cifar-10-batches-py``; 50000 / 10000.
    folder: every .png/.jpg/.jpeg under ``data_dir``, RGB, ``image_size`` (default 64) square;
    split by ``seed``, max(1, 10%) test; no labels.
    ``image_size`` resizes the others (area down, bilinear up) and re-quantizes to the K levels.
    ``download=True`` fetches missing MNIST / Fashion-MNIST / CIFAR-10 files into ``data_dir``.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_DATASETS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        v, y = d.images.astype(np.int64)[:, None], d.target.astype(np.int64)
        tr, te = split_indices(len(v), DIGITS_NUM_TEST, seed)
        parts, levels, classes = (v[tr], y[tr], v[te], y[te]), 17, 10
    else:
        if data_dir is None:
            raise ValueError(f"{name} reads files: a data_dir (--data-dir) is needed")
        root = Path(data_dir).expanduser()
        if name == "folder":
            v = _load_folder(root, image_size or FOLDER_IMAGE_SIZE)
            tr, te = split_indices(len(v), max(1, int(FOLDER_TEST_FRACTION * len(v))), seed)
            parts, levels, classes = (v[tr], None, v[te], None), 256, None
        else:
            load = _load_cifar if name == "cifar10" else (lambda r, d: _load_idx(name, r, d))
            parts, levels, classes = load(root, download), 256, 10
    x_train, y_train, x_test, y_test = parts
    for split, x in (("training", x_train), ("test", x_test)):  # a run trains and is evaluated
        if len(x) == 0:
            raise DataFileError(f"{name}: the {split} split is empty (data_dir {data_dir})")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataFileError(f"{name}: the test images are {tuple(x_test.shape[1:])} and the "
                            f"training images {tuple(x_train.shape[1:])}; they must be the same size")
    if image_size is not None and x_train.shape[-1] != image_size:
        x_train, x_test = (_resize(x, image_size, levels) for x in (x_train, x_test))
    labels = [None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))
              for y in (y_train, y_test)]
    for split, y in zip(("training", "test"), labels):  # a class-conditional net embeds them
        if y is not None and classes and len(y) and not 0 <= int(y.min()) <= int(y.max()) < classes:
            raise DataFileError(f"{name}: the {split} labels run from {int(y.min())} to "
                                f"{int(y.max())}; expected classes 0..{classes - 1} "
                                f"(data_dir {data_dir})")
    return ImageData(name, to_levels(x_train, levels), to_levels(x_test, levels), *labels,
                     num_levels=levels, num_classes=classes)
