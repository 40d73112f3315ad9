"""Image loaders: values land exactly on the K-level grid, files round-trip, bad files say which.

Every file here is written by the test itself into ``tmp_path``; nothing reads the network or
the real datasets.
"""
import gzip
import hashlib
import io
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from pdiff.data import images
from pdiff.data.images import (IDX_FILES, IMAGE_DATASETS, DataFileError, load_images,
                               split_indices, to_uint8_grid)

RNG_SEED = 0
IDX_SIZES = {"train": 7, "t10k": 3}


def levels(num_levels):
    """The K levels -1 + 2k/(K-1), computed in float64 and cast to the default dtype."""
    k = torch.arange(num_levels, dtype=torch.float64)
    return (-1 + 2 * k / (num_levels - 1)).to(torch.get_default_dtype())


def on_grid(x, num_levels):
    return bool(torch.isin(x, levels(num_levels)).all())


# --- digits -------------------------------------------------------------------------------------

def test_digits_shapes_levels_labels():
    d = load_images("digits")
    assert d.train.shape == (1497, 1, 8, 8) and d.test.shape == (300, 1, 8, 8)
    assert d.train.dtype == torch.get_default_dtype()
    assert d.event_shape == (1, 8, 8) and d.num_dims == 64
    assert d.num_levels == 17 and d.num_classes == 10
    assert on_grid(d.train, 17) and on_grid(d.test, 17)
    for y in (d.train_labels, d.test_labels):
        assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    # both ends of the grid are used, so the map is onto [-1, 1]
    assert d.train.min() == -1 and d.train.max() == 1


def test_digits_split_matches_sklearn_rows():
    from sklearn.datasets import load_digits
    raw = load_digits()
    train_idx, test_idx = split_indices(len(raw.images), 300, seed=3)
    d = load_images("digits", seed=3)
    expected = -1 + 2 * torch.from_numpy(raw.images[test_idx]) / 16
    torch.testing.assert_close(d.test[:, 0], expected.to(d.test.dtype), rtol=0, atol=0)
    assert torch.equal(d.train_labels, torch.from_numpy(raw.target[train_idx]))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_is_a_deterministic_partition(seed):
    train, test = split_indices(1797, 300, seed)
    again = split_indices(1797, 300, seed)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert len(test) == 300 and not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    assert set(test) != set(split_indices(1797, 300, seed + 1)[1])


def test_digits_same_seed_same_split_other_seed_differs():
    a, b, c = (load_images("digits", seed=s) for s in (5, 5, 6))
    assert torch.equal(a.train, b.train) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.test, c.test)


@pytest.mark.parametrize("size", [4, 12])
def test_resize_requantizes_to_the_grid(size):
    d = load_images("digits", image_size=size)
    assert d.event_shape == (1, size, size) and on_grid(d.train, 17)


# --- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------

def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder, *, gz, rng, sizes=IDX_SIZES, hw=(5, 4)):
    """Tiny IDX files in ``folder``; returns {file stem: array}."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for stem in IDX_FILES:
        n = sizes[stem.split("-")[0]]
        if "images" in stem:
            arrays[stem] = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
            arrays[stem][0, 0, :2] = (0, 255)
            data = idx_bytes(arrays[stem], 2051)
        else:
            arrays[stem] = rng.integers(0, 10, n, dtype=np.uint8)
            data = idx_bytes(arrays[stem], 2049)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("name, raw_dir", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.parametrize("layout", ["direct", "torchvision"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, name, raw_dir, layout, gz):
    folder = tmp_path if layout == "direct" else tmp_path / raw_dir / "raw"
    arrays = write_idx(folder, gz=gz, rng=np.random.default_rng(RNG_SEED))
    d = load_images(name, data_dir=tmp_path)
    assert d.num_levels == 256 and d.num_classes == 10 and d.event_shape == (1, 5, 4)
    for x, y, stem in [(d.train, d.train_labels, "train"), (d.test, d.test_labels, "t10k")]:
        v = torch.from_numpy(arrays[f"{stem}-images-idx3-ubyte"]).long()
        assert torch.equal(x[:, 0], levels(256)[v])
        assert torch.equal(y, torch.from_numpy(arrays[f"{stem}-labels-idx1-ubyte"]).long())
        assert y.dtype == torch.long
    assert on_grid(d.train, 256) and d.train.min() == -1 and d.train.max() == 1
    np.testing.assert_array_equal(to_uint8_grid(d.train[0], 256),
                                  arrays["train-images-idx3-ubyte"][0])


def corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:-3])


def corrupt_magic(path):
    raw = bytearray(path.read_bytes())
    raw[2:4] = (2049 if "images" in path.name else 2051).to_bytes(2, "big")
    path.write_bytes(bytes(raw))


def corrupt_short(path):
    path.write_bytes(b"\x00\x00")


@pytest.mark.parametrize("corrupt, message", [(corrupt_truncate, "truncated"),
                                              (corrupt_magic, "bad magic"),
                                              (corrupt_short, "bad magic")])
@pytest.mark.parametrize("stem", IDX_FILES)
def test_bad_idx_file_is_named(tmp_path, corrupt, message, stem):
    write_idx(tmp_path, gz=False, rng=np.random.default_rng(RNG_SEED))
    corrupt(tmp_path / stem)
    with pytest.raises(DataFileError, match=message) as err:
        load_images("mnist", data_dir=tmp_path)
    assert stem in str(err.value)


def test_truncated_gzip_is_named(tmp_path):
    write_idx(tmp_path, gz=True, rng=np.random.default_rng(RNG_SEED))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte.gz"):
        load_images("mnist", data_dir=tmp_path)


def test_count_mismatch_names_both_files(tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    write_idx(tmp_path, gz=False, rng=rng)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(6, np.uint8), 2049))
    with pytest.raises(DataFileError) as err:
        load_images("mnist", data_dir=tmp_path)
    assert "train-images-idx3-ubyte" in str(err.value)
    assert "train-labels-idx1-ubyte" in str(err.value)


def test_missing_files_are_listed_with_download_hint(tmp_path):
    with pytest.raises(DataFileError) as err:
        load_images("fashion_mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert all(stem in msg for stem in IDX_FILES)
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and images.IDX_SOURCES["fashion_mnist"][1] in msg


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_download_failure_is_clear(tmp_path, monkeypatch, name):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataFileError, match=r"could not download .*offline\?.*no route") as err:
        load_images(name, data_dir=tmp_path / "new", download=True)
    assert str(tmp_path / "new") in str(err.value)
    assert not any(p.is_file() for p in (tmp_path / "new").rglob("*"))  # no partial files left


def serve(monkeypatch, files):
    """Patch urlopen to answer each URL's last path component from ``files`` (name -> bytes)."""
    def urlopen(url, timeout=None):
        return io.BytesIO(files[url.rsplit("/", 1)[-1]])
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def md5(data):
    return hashlib.md5(data).hexdigest()


def test_mnist_download_writes_files_and_checks_md5(tmp_path, monkeypatch):
    arrays = write_idx(tmp_path / "src", gz=True, rng=np.random.default_rng(RNG_SEED))
    files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    serve(monkeypatch, files)
    raw_dir, url, _ = images.IDX_SOURCES["mnist"]
    sums = tuple(md5(files[f + ".gz"]) for f in IDX_FILES)
    monkeypatch.setitem(images.IDX_SOURCES, "mnist", (raw_dir, url, sums))
    d = load_images("mnist", data_dir=tmp_path / "dl", download=True)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(files)
    assert torch.equal(d.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    bad = tuple("0" * 32 for _ in IDX_FILES)
    monkeypatch.setitem(images.IDX_SOURCES, "mnist", (raw_dir, url, bad))
    with pytest.raises(DataFileError, match="md5"):
        load_images("mnist", data_dir=tmp_path / "dl2", download=True)
    assert not any((tmp_path / "dl2").iterdir())


def test_cifar_download_extracts_archive(tmp_path, monkeypatch):
    batches = write_cifar(tmp_path / "src" / "cifar-10-batches-py", np.random.default_rng(RNG_SEED))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    serve(monkeypatch, {"cifar-10-python.tar.gz": buf.getvalue()})
    monkeypatch.setattr(images, "CIFAR_MD5", md5(buf.getvalue()))
    d = load_images("cifar10", data_dir=tmp_path / "dl", download=True)
    assert d.train_labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])


# --- CIFAR-10 -----------------------------------------------------------------------------------

def write_cifar(folder, rng, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": f.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"x.png"] * n}
        (folder / f).write_bytes(pickle.dumps(batch, protocol=2))
        batches[f] = (data, labels)
    return batches


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_round_trip_channel_order(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = write_cifar(folder, np.random.default_rng(RNG_SEED))
    c, h, w = 1, 2, 3  # one pixel: green, row 2, column 3
    batches["data_batch_3"][0][1, c * 1024 + h * 32 + w] = 255
    batches["data_batch_3"][0][1, h * 32 + w] = 0
    (folder / "data_batch_3").write_bytes(pickle.dumps(
        {b"data": batches["data_batch_3"][0], b"labels": batches["data_batch_3"][1]}))
    d = load_images("cifar10", data_dir=tmp_path)
    assert d.train.shape == (20, 3, 32, 32) and d.test.shape == (4, 3, 32, 32)
    assert d.train[2 * 4 + 1, c, h, w] == 1 and d.train[2 * 4 + 1, 0, h, w] == -1
    v = torch.from_numpy(batches["test_batch"][0].reshape(4, 3, 32, 32)).long()
    assert torch.equal(d.test, levels(256)[v])
    assert d.test_labels.tolist() == batches["test_batch"][1]
    img = to_uint8_grid(d.test[0], 256)  # (H, W, C) for PIL
    chw = batches["test_batch"][0][0].reshape(3, 32, 32)
    np.testing.assert_array_equal(img, chw.transpose(1, 2, 0))


@pytest.mark.parametrize("payload", [b"not a pickle", pickle.dumps({b"data": 1})[:-5],
                                     pickle.dumps({b"data": np.zeros((2, 10), np.uint8),
                                                   b"labels": [0, 1]}),
                                     pickle.dumps(print)])
def test_corrupt_cifar_batch_is_named(tmp_path, payload):
    write_cifar(tmp_path, np.random.default_rng(RNG_SEED))
    (tmp_path / "data_batch_2").write_bytes(payload)
    with pytest.raises(DataFileError, match="data_batch_2"):
        load_images("cifar10", data_dir=tmp_path)


# --- folder -------------------------------------------------------------------------------------

def write_images(folder, rng):
    sizes = [((10, 14), ".png"), ((20, 9), ".JPG"), ((16, 16), ".jpeg"), ((7, 12), ".png")]
    for i, (size, suffix) in enumerate(sizes):
        sub = folder / ("sub" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i}{suffix}")
    (folder / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("size", [None, 8])
def test_folder_shapes_and_split(tmp_path, size):
    write_images(tmp_path, np.random.default_rng(RNG_SEED))
    d = load_images("folder", data_dir=tmp_path, image_size=size)
    s = size or 64
    assert d.train.shape == (3, 3, s, s) and d.test.shape == (1, 3, s, s)
    assert d.train_labels is None and d.num_classes is None and on_grid(d.train, 256)
    again = load_images("folder", data_dir=tmp_path, image_size=size)
    assert torch.equal(d.test, again.test)


def test_folder_round_trips_pixels(tmp_path):
    pixels = np.random.default_rng(RNG_SEED).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    d = load_images("folder", data_dir=tmp_path, image_size=6)
    got = np.stack([to_uint8_grid(x, 256) for x in torch.cat([d.train, d.test])])
    np.testing.assert_array_equal(np.sort(got.reshape(3, -1), axis=0),
                                  np.sort(pixels.reshape(3, -1), axis=0))


@pytest.mark.parametrize("image_size, tol", [(16, 0), (8, 2)])
@pytest.mark.parametrize("tall", [False, True])
def test_folder_centre_crops_non_square(tmp_path, image_size, tol, tall):
    """A 16 x 32 image: red quarter, green half, blue quarter; the centre crop is the green half."""
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :8, 0] = pixels[:, 8:24, 1] = pixels[:, 24:, 2] = 255
    pixels = pixels.transpose(1, 0, 2) if tall else pixels
    for name in ("a.png", "b.png"):
        Image.fromarray(pixels).save(tmp_path / name)
    d = load_images("folder", data_dir=tmp_path, image_size=image_size)
    img = to_uint8_grid(d.train[0], 256)
    inner = img[1:-1, 1:-1].astype(int)  # bicubic may ring at the crop's edge
    assert np.abs(inner - [0, 255, 0]).max() <= tol


def test_folder_errors(tmp_path):
    with pytest.raises(DataFileError, match="found 0"):
        load_images("folder", data_dir=tmp_path)
    with pytest.raises(DataFileError, match="no such folder"):
        load_images("folder", data_dir=tmp_path / "absent")
    write_images(tmp_path, np.random.default_rng(RNG_SEED))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataFileError, match="broken.png"):
        load_images("folder", data_dir=tmp_path)


# --- to_uint8_grid and arguments ----------------------------------------------------------------

@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_to_uint8_grid_inverts_the_level_map(num_levels):
    k = torch.randint(0, num_levels, (5, 3, 4, 6))
    x = levels(num_levels)[k]
    expected = (k.double() * 255 / (num_levels - 1)).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(to_uint8_grid(x[0], num_levels), expected[0].transpose(1, 2, 0))
    noisy = x + (torch.rand_like(x) - 0.5) * (0.99 / (num_levels - 1))  # rounds to the same level
    grid = to_uint8_grid(noisy, num_levels, nrow=2)  # 5 images in 3 rows of 2
    assert grid.shape == (3 * 4, 2 * 6, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        np.testing.assert_array_equal(grid[4 * r: 4 * r + 4, 6 * c: 6 * c + 6],
                                      expected[i].transpose(1, 2, 0))
    assert (grid[8:, 6:] == 0).all()
    assert to_uint8_grid(x[:, :1], num_levels).shape == (2 * 4, 3 * 6)  # one channel: (H, W)


def test_unknown_name_and_missing_data_dir():
    with pytest.raises(ValueError, match="valid: " + ", ".join(IMAGE_DATASETS)):
        load_images("imagenet")
    for name in IMAGE_DATASETS[1:]:
        with pytest.raises(ValueError, match="--data-dir"):
            load_images(name)
    with pytest.raises(ValueError, match="image_size"):
        load_images("digits", image_size=0)


# --- refusals before anything is trained ----------------------------------------------------------

def test_missing_files_say_where_to_get_them(tmp_path):
    """No option that does not exist: the files, where to download them, and --data-dir."""
    for name in ("mnist", "cifar10"):
        with pytest.raises(DataFileError) as err:
            load_images(name, data_dir=tmp_path)
        msg = str(err.value)
        assert "--download" not in msg and "--data-dir" in msg and "https://" in msg
        assert len(msg.splitlines()) == 1


def write_empty_split(folder, stem):
    """Replace the ``stem`` (train or t10k) IDX files with 0 images and 0 labels."""
    (folder / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 5, 4)), 2051))
    (folder / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0), 2049))


@pytest.mark.parametrize("stem", ["train", "t10k"])
def test_idx_file_with_no_images_is_refused(tmp_path, stem):
    write_idx(tmp_path, gz=False, rng=np.random.default_rng(RNG_SEED))
    write_empty_split(tmp_path, stem)
    with pytest.raises(DataFileError, match="0 images") as err:
        load_images("mnist", data_dir=tmp_path)
    assert f"{stem}-images-idx3-ubyte" in str(err.value)


def test_test_images_of_another_size_are_refused(tmp_path):
    """The test split is what a run is evaluated on: images of another size than the training
    images are refused when the data is loaded (at training time), naming both files' shapes."""
    rng = np.random.default_rng(RNG_SEED)
    write_idx(tmp_path, gz=False, rng=rng, hw=(6, 6))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        idx_bytes(rng.integers(0, 256, (IDX_SIZES["t10k"], 5, 5)), 2051))
    for size in (None, 6, 4):
        with pytest.raises(DataFileError) as err:
            load_images("mnist", data_dir=tmp_path, image_size=size)
        msg = str(err.value)
        assert "t10k-images-idx3-ubyte" in msg and "train-images-idx3-ubyte" in msg
        assert "(5, 5)" in msg and "(6, 6)" in msg


def test_run_data_refuses_a_bad_test_split(tmp_path):
    from pdiff.run_data import load_run_data
    from pdiff.train import TrainConfig

    write_idx(tmp_path, gz=False, rng=np.random.default_rng(RNG_SEED))
    write_empty_split(tmp_path, "t10k")
    cfg = TrainConfig.for_data("mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="0 images"):
        load_run_data(cfg)


@pytest.mark.parametrize("name", ["digits", "folder", "mnist"])
def test_image_size_too_large_for_memory_is_refused(tmp_path, name):
    """Checked where a run's data is loaded, for training and evaluation alike, before any image
    is resized."""
    from pdiff.run_data import load_run_data
    from pdiff.train import TrainConfig

    if name == "folder":
        for i in range(2):
            Image.new("RGB", (5, 5)).save(tmp_path / f"{i}.png")
    if name == "mnist":
        write_idx(tmp_path, gz=True, rng=np.random.default_rng(RNG_SEED))
        assert images.load_bytes("mnist", data_dir=tmp_path, image_size=8) == 10 * 64 * 17
    cfg = TrainConfig.for_data(name, data_dir=str(tmp_path), image_size=10**6)
    with pytest.raises(ValueError, match=r"of memory.*--image-size"):
        load_run_data(cfg)


@pytest.mark.parametrize("stem", ["train", "t10k"])
def test_labels_outside_the_classes_are_refused(tmp_path, stem):
    """A label of 12 in a 10-class dataset would index past a class-conditional net's embedding
    in the middle of training: refused when the data is loaded, before a run writes anything."""
    write_idx(tmp_path, gz=False, rng=np.random.default_rng(RNG_SEED))
    labels = np.full(IDX_SIZES[stem], 3)
    labels[1] = 12
    (tmp_path / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    split = "training" if stem == "train" else "test"
    with pytest.raises(DataFileError, match=f"the {split} labels run from 3 to 12; expected "
                       "classes 0..9"):
        load_images("mnist", data_dir=tmp_path)
    from pdiff.cli import main
    out = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--data-dir", str(tmp_path), "--class-cond",
                 "--out", str(out)]) == 2
    assert not out.exists()
