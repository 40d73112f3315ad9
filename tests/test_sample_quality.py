"""Sample quality: the Fréchet distance against closed forms, precision/recall on sets whose answer
is known, both on the digits classifier's features, and the feature network's cache."""
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import pdiff.feature_net as feature_net
from pdiff.data.images import load_images
from pdiff.feature_net import TrainedFeatureNet, default_cache_dir, feature_net_for, recipe_steps
from pdiff.sample_quality import frechet_distance, precision_recall, sample_quality

QUICK = 30  # training steps for the cache tests: any network will do there


def exact_moments(mean: torch.Tensor, std: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n points whose sample mean is ``mean`` and sample covariance exactly diag(std^2): columns
    orthonormal and orthogonal to the ones vector, scaled by sqrt(n - 1) std."""
    g = torch.Generator().manual_seed(seed)
    a = torch.cat([torch.ones(n, 1), torch.randn(n, len(mean), generator=g)], 1)
    q = torch.linalg.qr(a).Q[:, 1:]  # (n, D), q^T 1 = 0, q^T q = I
    return mean + (n - 1) ** 0.5 * q * std


@pytest.mark.parametrize("dim", [1, 3, 16])
def test_frechet_distance_closed_form_for_diagonal_covariances(dim):
    g = torch.Generator().manual_seed(dim)
    mu_a, mu_b = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    s_a, s_b = torch.rand(dim, generator=g) + 0.1, 2 * torch.rand(dim, generator=g) + 0.1
    a, b = exact_moments(mu_a, s_a, 50, seed=1), exact_moments(mu_b, s_b, 70, seed=2)
    # W_2^2 between N(mu_a, diag s_a^2) and N(mu_b, diag s_b^2): the square root is elementwise
    expected = ((mu_a - mu_b) ** 2).sum() + ((s_a - s_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n, dim", [(40, 5), (300, 32)])
def test_frechet_distance_matches_scipy_sqrtm(n, dim):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, dim, generator=g) @ torch.randn(dim, dim, generator=g)
    b = torch.randn(n + 7, dim, generator=g) @ torch.randn(dim, dim, generator=g) + 1
    an, bn = a.numpy(), b.numpy()
    s_a, s_b = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real  # the usual FID code's route, independent of eigh
    expected = ((an.mean(0) - bn.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("n, dim", [(100, 4), (10, 32)])  # (10, 32): singular covariances
def test_frechet_distance_symmetric_and_zero_for_identical_sets(n, dim):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, dim, generator=g), 3 * torch.randn(n + 5, dim, generator=g)
    # a singular covariance's zero eigenvalues come out near 1e-16 and their square roots near
    # 1e-8: the tolerance, relative to the traces
    tol = 1e-7 * torch.cov(a.T).trace().item()
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), abs=tol)
    assert frechet_distance(a, a) <= tol
    assert frechet_distance(a, a + 2) == pytest.approx(4 * dim, abs=tol)  # a shift: |d mu|^2


def test_frechet_distance_refuses_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def brute_force_precision_recall(real, fake, k):
    d = lambda x, y: np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))  # noqa: E731
    r_real = np.sort(d(real, real), 1)[:, k]
    r_fake = np.sort(d(fake, fake), 1)[:, k]
    d_fr = d(fake, real)
    return (d_fr <= r_real[None]).any(1).mean(), (d_fr <= r_fake[:, None]).any(0).mean()


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_precision_recall_against_brute_force(k, chunk_size):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(120, 6, generator=g)
    fake = 1.3 * torch.randn(90, 6, generator=g) + 0.5
    expected = brute_force_precision_recall(real.numpy(), fake.numpy(), k)
    assert precision_recall(real, fake, k=k, chunk_size=chunk_size) == pytest.approx(expected)


def test_precision_recall_identical_and_disjoint_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    assert precision_recall(real, real, chunk_size=13) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(real, real[:3], k=3)


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


@pytest.fixture(scope="module")
def digits_net(digits, tmp_path_factory):
    return feature_net_for("digits", data=digits, cache_dir=tmp_path_factory.mktemp("features"))


def halves(x: torch.Tensor, seed: int):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = len(x) // 2
    return x[perm[:n]], x[perm[n:2 * n]]


def test_digits_classifier_is_recorded_with_its_features(digits, digits_net):
    info = digits_net.info
    assert info["test_accuracy"] > 0.9
    assert info["recipe"]["steps"] == recipe_steps(len(digits.train)) == 585
    assert digits_net.features(digits.test[:5]).shape == (5, info["recipe"]["feature_dim"])
    report = sample_quality(digits.test[:40], digits.test[40:100], digits_net)
    assert set(report) == {"fid", "precision", "recall", "num_fake", "num_real", "features"}
    assert (report["num_fake"], report["num_real"]) == (40, 60)
    for word in ("digits", "1x8x8", "K=17", f"{100 * info['test_accuracy']:.2f}%", "128 features"):
        assert word in report["features"]


def test_fid_of_test_halves_is_near_the_finite_sample_floor(digits, digits_net):
    """Two halves of the test split differ only by sampling: their FID is the size of the FID
    between disjoint halves of the training split of the same size (150 images; the floor a
    finite sample sets), and far below that of noise or of a single class."""
    features = digits_net.features
    n = len(digits.test) // 2
    fid_test = frechet_distance(*map(features, halves(digits.test, seed=0)))
    floor = np.mean([frechet_distance(*map(features, halves(digits.train[:2 * n * 4][i::4], i)))
                     for i in range(4)])
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    ones = digits.train[digits.train_labels == 1][:n]
    real = halves(digits.test, seed=0)[1]
    fid_noise = sample_quality(noise, real, digits_net)["fid"]
    fid_ones = sample_quality(ones, real, digits_net)["fid"]
    assert floor / 3 < fid_test < 3 * floor, (fid_test, floor)
    assert min(fid_noise, fid_ones) > 8 * max(fid_test, floor), (fid_noise, fid_ones, floor)


def test_precision_recall_on_digits(digits, digits_net):
    real = digits.test
    g = torch.Generator().manual_seed(0)
    noise = sample_quality(torch.rand(300, 1, 8, 8, generator=g) * 2 - 1, real, digits_net)
    assert noise["precision"] < 0.05 and noise["recall"] < 0.05
    ones = sample_quality(digits.train[digits.train_labels == 1], real, digits_net)
    assert ones["precision"] > 0.8 and ones["recall"] < 0.3  # one class of ten: a tenth covered
    same = sample_quality(real, real, digits_net)
    assert (same["precision"], same["recall"]) == (1.0, 1.0) and same["fid"] < 1e-3
    held_out = sample_quality(digits.train[:300], real, digits_net)
    assert held_out["precision"] > 0.8 and held_out["recall"] > 0.8


def test_samples_are_compared_on_the_data_grid(digits, digits_net):
    """Samples off the K-level grid are rounded first: within half a level they count as the
    image they round to; outside [-1, 1] as the clamped one."""
    x = digits.test[:50]
    jitter = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.9 / 16
    assert torch.equal(digits_net.features(x + jitter), digits_net.features(x))
    assert torch.equal(digits_net.features(3 * x.sign()), digits_net.features(x.sign()))
    with pytest.raises(ValueError, match=r"takes images \(N, 1, 8, 8\)"):
        digits_net.features(torch.zeros(2, 3, 8, 8))


def test_cache_loads_instead_of_retraining(digits, tmp_path, monkeypatch):
    first = feature_net_for("digits", data=digits, cache_dir=tmp_path, steps=QUICK)
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("feature_net_digits_1x8x8_K17_v1_")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache was valid")
    monkeypatch.setattr(feature_net, "train_feature_net", no_training)
    second = feature_net_for("digits", data=digits, cache_dir=tmp_path, steps=QUICK)
    assert second.info == first.info
    assert torch.equal(second.features(digits.test), first.features(digits.test))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_cache_is_retrained(digits, tmp_path, damage):
    first = feature_net_for("digits", data=digits, cache_dir=tmp_path, steps=QUICK)
    (path,) = tmp_path.iterdir()
    raw = bytearray(path.read_bytes())
    if damage == "flip":  # a bit inside the weights (the largest share of the file)
        raw[len(raw) // 2] ^= 0x10
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="(?s)cannot be used .* retraining"):
        again = feature_net_for("digits", data=digits, cache_dir=tmp_path, steps=QUICK)
    # training is deterministic given the seed: the retrained network is the same network
    assert torch.equal(again.features(digits.test), first.features(digits.test))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is valid again
        feature_net_for("digits", data=digits, cache_dir=tmp_path, steps=QUICK)


def test_unwritable_cache_warns_once_and_still_computes(digits, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folder = blocker / "cache"  # below a file: cannot be created, even by root
    with pytest.warns(UserWarning, match="not cached"):
        net = feature_net_for("digits", data=digits, cache_dir=folder, steps=QUICK)
    assert isinstance(net, TrainedFeatureNet) and 0 <= net.info["test_accuracy"] <= 1
    monkeypatch.setattr(feature_net, "train_feature_net", None)  # kept for this process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert feature_net_for("digits", data=digits, cache_dir=folder, steps=QUICK) is net


def test_read_only_data_folder_is_left_alone(digits, tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o555)  # marked read-only: not written even by root
    try:
        with pytest.warns(UserWarning, match="read-only"):
            feature_net_for("digits", folder, data=digits, steps=QUICK)
        assert not any(folder.iterdir())
    finally:
        folder.chmod(0o755)


def test_cache_file_names_the_recipe_and_the_data(tmp_path, digits):
    feature_net_for("digits", data=digits, cache_dir=tmp_path, steps=QUICK)
    feature_net_for("digits", data=digits, cache_dir=tmp_path, steps=QUICK + 1)
    feature_net_for("digits", data=load_images("digits", seed=1), cache_dir=tmp_path, steps=QUICK)
    assert len(list(tmp_path.iterdir())) == 3  # another recipe, another split: other networks


def test_default_cache_dir(monkeypatch, tmp_path):
    assert default_cache_dir(tmp_path / "data") == tmp_path / "data"
    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("PDIFF_CACHE")
    assert default_cache_dir(None) == default_cache_dir(None).home() / ".cache" / "pdiff"


def test_feature_net_needs_labels_and_the_named_data(digits):
    with pytest.raises(ValueError, match="not 'mnist'"):
        feature_net_for("mnist", data=digits)
