"""Image runs end to end: train, resume, evaluate in bits/dim, sample PNG grids, compare."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pdiff.cli import main
from pdiff.compare import GridSpec, compare, evaluate_run
from pdiff.data.images import IDX_FILES, to_uint8_grid
from pdiff.elbo import full_bound
from pdiff.train import CHECKPOINT, TrainConfig, Trainer, load_run

TINY = dict(data="digits", timesteps=5, iterations=6, batch_size=8, channels=8, log_every=3,
            checkpoint_every=3, warmup=2)


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**(TINY | changes))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "run"
    Trainer(tiny(objective="hybrid", variance="learned_range"), out).train(progress=False)
    return out


def test_image_run_has_a_discretized_decoder_over_the_digits_levels(digits_run):
    run = load_run(digits_run)
    assert run.event_shape == (1, 8, 8)
    assert run.model.decoder_type == "discretized" and run.model.num_levels == 17
    assert run.model.event_dims == 3
    assert json.loads((digits_run / "config.json").read_text())["net"] == "auto"


def test_discrete_bound_is_nonnegative_and_bits_per_dim_is_consistent(digits_run):
    """Every term is a KL or -log of a probability, so each example's bound is >= 0; bits/dim is
    the bound over D ln 2."""
    run = load_run(digits_run)
    report = evaluate_run(run, samples=12, seed=0)
    assert report["num_samples"] == 12 and report["dim"] == 64
    assert report["entropy_nats"] is None and report["gap_nats"] is None
    assert report["bits_per_dim"] == pytest.approx(report["nll_nats"] / (64 * math.log(2)))
    assert report["nll_nats"] == pytest.approx(report["prior_nats"] + sum(report["terms_nats"]))
    from pdiff.run_data import load_run_data

    test = load_run_data(run.config, train=False).test[:12].float()
    bound = full_bound(run.model, test, generator=torch.Generator().manual_seed(0))
    assert (bound.total >= 0).all() and (bound.terms[:, 0] >= 0).all()


def test_evaluate_asks_for_at_most_the_test_split(digits_run):
    report = evaluate_run(load_run(digits_run), samples=10_000, seed=0)
    assert report["num_samples"] == 300  # the digits' test split


def test_resumed_image_run_equals_uninterrupted(tmp_path):
    Trainer(tiny(), tmp_path / "a").train(progress=False)
    Trainer(tiny(iterations=3), tmp_path / "b").train(progress=False)
    Trainer(tiny(), tmp_path / "b", resume=True).train(progress=False)
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)
    for key in ("net", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)


@pytest.mark.parametrize("changes, message", [
    (dict(net="mlp"), "--net must be unet or auto"),
    (dict(rescale="standardize"), "--rescale must be none"),
    (dict(data="mixture1d", net="unet"), "the U-Net takes images"),
    (dict(image_size=2), "image_size must be >= 4"),
    (dict(dropout=1.5), "dropout"),
])
def test_inconsistent_image_options_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes).validate()


def test_cli_sample_writes_a_png_grid_and_refuses_text(digits_run, tmp_path, capsys):
    png, npy = tmp_path / "grid.png", tmp_path / "s.npy"
    for out in (png, npy):
        assert main(["sample", "--checkpoint", str(digits_run), "--num", "9", "--seed", "3",
                     "--out", str(out)]) == 0
    x = np.load(npy)
    assert x.shape == (9, 1, 8, 8) and np.abs(x).max() <= 1
    k = (x + 1) * 16 / 2  # samples of the discretized decoder lie on the 17 levels
    np.testing.assert_allclose(k, np.round(k), atol=1e-5)
    # the PNG is the grid of the same samples (same seed)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), to_uint8_grid(torch.from_numpy(x), 17))
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(digits_run), "--num", "4",
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "valid: .png, .npy" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def _tiny_mnist(folder, rng):
    folder.mkdir(parents=True)
    for stem in IDX_FILES:
        n = 16 if stem.startswith("train") else 4
        if "images" in stem:
            arr = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
            magic = 2051
        else:
            arr = rng.integers(0, 10, n, dtype=np.uint8)
            magic = 2049
        header = magic.to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in arr.shape)
        (folder / stem).write_bytes(header + arr.tobytes())


def test_mnist_from_a_data_dir_trains_and_evaluates(tmp_path, capsys):
    data = tmp_path / "mnist"
    _tiny_mnist(data, np.random.default_rng(0))
    out = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--data-dir", str(data), "--timesteps", "4",
                 "--iterations", "2", "--batch-size", "4", "--channels", "8", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    moved = tmp_path / "moved"
    data.rename(moved)
    assert main(["evaluate", "--checkpoint", str(out), "--json", "--metric-samples", "0"]) == 2
    assert "mnist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(out), "--data-dir", str(moved), "--json",
                 "--metric-samples", "0", "--samples", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dim"] == 64 and report["num_samples"] == 4 and report["bits_per_dim"] > 0


def test_bad_image_input_exits_2(tmp_path, capsys):
    assert main(["train", "--data", "mnist", "--out", str(tmp_path / "r")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    bad = tmp_path / "bad"
    _tiny_mnist(bad, np.random.default_rng(1))
    path = bad / IDX_FILES[0]
    path.write_bytes(path.read_bytes()[:-5])  # truncated
    assert main(["train", "--data", "mnist", "--data-dir", str(bad), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert IDX_FILES[0] in err
    assert main(["train", "--data", "digits", "--net", "mlp", "--out", str(tmp_path / "r3")]) == 2


def test_compare_on_digits_reports_bits_per_dim_and_draws_image_figures(tmp_path):
    spec = GridSpec(tiny(iterations=3), {"objective": ("simple", "vlb"),
                                         "variance": ("fixed_large", "learned_range")},
                    seeds=(0,), eval_samples=8, metric_samples=4)
    result = compare(spec, tmp_path / "cmp", jobs=1, command="test")
    assert all(r["ok"] == 1 for r in result.rows)
    for r in result.rows:
        assert r["bits_per_dim"] == pytest.approx(r["nll_nats"] / (64 * math.log(2)))
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "bits/dim" in md and "gap to H" not in md
    names = {p.name for p in (tmp_path / "cmp" / "figures").iterdir()}
    assert {"data.png", "forward.png", "bound_terms.png", "best_progression.png",
            "best_x0_predictions.png", "samples_simple-fixed_large.png"} <= names


def test_image_datasets_get_image_defaults_unless_given():
    from pdiff.cli import _config_from_args, build_parser
    from pdiff.train import IMAGE_DEFAULTS

    parse = build_parser().parse_args
    cfg = _config_from_args(parse(["train", "--data", "digits", "--out", "x"]))
    assert {k: getattr(cfg, k) for k in IMAGE_DEFAULTS} == IMAGE_DEFAULTS
    cfg = _config_from_args(parse(["train", "--data", "digits", "--batch-size", "8", "--out", "x"]))
    assert cfg.batch_size == 8 and cfg.lr == IMAGE_DEFAULTS["lr"]
    toy = _config_from_args(parse(["train", "--data", "moons", "--out", "x"]))
    assert toy == TrainConfig(data="moons")


# -- class conditioning and classifier-free guidance --------------------------------------------

@pytest.mark.parametrize("dropout, trained", [(0.0, "classes"), (1.0, "null")])
def test_label_dropout_decides_which_label_embeddings_train(tmp_path, dropout, trained):
    """With label_dropout 0 only the ten class rows get gradients, with 1 only the null row."""
    trainer = Trainer(tiny(class_cond=True, label_dropout=dropout, iterations=4), tmp_path / "run")
    before = trainer.net.label_embed.weight.detach().clone()
    trainer.train(progress=False)
    changed = (trainer.net.label_embed.weight != before).any(-1)
    assert changed.shape == (11,)
    if trained == "classes":
        assert not changed[10] and changed[:10].any()
    else:
        assert changed[10] and not changed[:10].any()


def test_class_conditional_run_samples_classes_with_guidance(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--class-cond", "--timesteps", "5", "--iterations", "3",
                 "--batch-size", "8", "--channels", "8", "--out", str(out), "--no-progress"]) == 0
    run = load_run(out)
    assert run.model.net.num_classes == 10
    report = evaluate_run(run, samples=6, seed=0)  # the null label: the model's p(x)
    assert math.isfinite(report["bits_per_dim"])
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(out), "--num", "10", "--out", str(png), "--label", "all",
                 "--guidance", "2"]) == 0
    assert Image.open(png).size[0] > 8
    capsys.readouterr()
    # DDIM with guidance: guided x0_hat, the last one rounded to the decoder's levels
    ddim = tmp_path / "ddim.npy"
    assert main(["sample", "--checkpoint", str(out), "--num", "10", "--out", str(ddim), "--label",
                 "all", "--guidance", "2", "--sampler", "ddim", "--eta", "0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["sampler"], printed["eta"]) == ("ddim", 0.5)
    x = np.load(ddim)
    levels = (x + 1) * (run.model.num_levels - 1) / 2
    assert x.shape[0] == 10 and np.abs(levels - levels.round()).max() < 1e-4
    npy = tmp_path / "s.npy"
    for args, message in [(["--label", "10"], "0..9"), (["--label", "x"], "0..9"),
                          (["--guidance", "1"], "needs --label"),
                          (["--label", "1", "--guidance", "-1"], ">= 0")]:
        assert main(["sample", "--checkpoint", str(out), "--num", "2", "--out", str(npy), *args]) == 2
        assert message in capsys.readouterr().err
    assert not npy.exists()


def test_labels_on_an_unconditional_run_or_toy_data_are_refused(digits_run, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(digits_run), "--num", "2", "--out",
                 str(tmp_path / "s.png"), "--label", "1"]) == 2
    assert "not class-conditional" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vector data"):
        TrainConfig(data="mixture1d", class_cond=True).validate()
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\]"):
        tiny(class_cond=True, label_dropout=1.5).validate()


@pytest.mark.parametrize("class_cond", [False, True])
@pytest.mark.parametrize("objective", ["simple", "vlb", "hybrid", "trajectory"])
def test_every_objective_trains_the_unet(tmp_path, objective, class_cond):
    """Each objective runs on images, the trajectory one with the U-Net at all (N, T) steps at
    once, and the bound it reports afterwards is finite."""
    cfg = tiny(objective=objective, variance="learned_range", iterations=2, batch_size=3,
               class_cond=class_cond)
    last = Trainer(cfg, tmp_path / "run").train(progress=False)
    assert last["step"] == 2 and math.isfinite(last["loss"])
    report = evaluate_run(load_run(tmp_path / "run"), samples=4, seed=0)
    assert math.isfinite(report["nll_nats"])


def test_evaluate_clip_denoised_and_a_respaced_chain(tmp_path, capsys):
    """--clip-denoised clips x_0 inside the bound (Improved DDPM's NLL convention): an untrained
    network's x_0 leaves [-1, 1], so the bound changes; --sampling-timesteps K evaluates the K-step
    chain. Both are recorded; --clip-denoised is refused for vector data."""
    out = tmp_path / "run"
    Trainer(tiny(timesteps=20), out).train(progress=False)
    base = ["evaluate", "--checkpoint", str(out), "--samples", "8", "--seed", "3", "--json"]
    reports = {}
    for name, extra in (("plain", []), ("clipped", ["--clip-denoised"]),
                        ("respaced", ["--sampling-timesteps", "5"])):
        assert main(base + extra) == 0
        reports[name] = json.loads(capsys.readouterr().out)
    plain, clipped, respaced = reports["plain"], reports["clipped"], reports["respaced"]
    assert (plain["clip_denoised"], clipped["clip_denoised"]) == (False, True)
    assert clipped["nll_nats"] != plain["nll_nats"]
    assert respaced["sampling_timesteps"] == 5 and len(respaced["terms_nats"]) == 5
    assert len(plain["terms_nats"]) == 20 and plain["sampling_timesteps"] is None
    assert main(base + ["--sampling-timesteps", "21"]) == 2
    assert "at most T = 20" in capsys.readouterr().err


def test_a_run_saved_at_the_older_default_width_loads_and_resumes_at_it(tmp_path):
    """Before unet_for's default width at 17x17..32x32 went from 64 to 32, a run with channels 0
    was built 64 wide and its checkpoint did not record the width: it must still load and resume
    at 64, while a new run records the width it was built with."""
    from pdiff.checkpoint import read_checkpoint, save_checkpoint

    out = tmp_path / "old"
    Trainer(tiny(image_size=20, channels=64, iterations=3, checkpoint_every=3), out).train(progress=False)
    # rewrite it as the older version saved it: channels 0 (the default) and no base_channels
    state = read_checkpoint(out / CHECKPOINT)
    state["config"]["channels"] = 0
    del state["base_channels"]
    save_checkpoint(state, out / CHECKPOINT)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"channels": 0}))

    run = load_run(out)
    assert run.model.net.down[0][0].out_channels == 64
    resumed = Trainer(tiny(image_size=20, channels=0, iterations=6, checkpoint_every=3), out,
                      resume=True)
    assert resumed.net.down[0][0].out_channels == 64
    resumed.train(progress=False)
    assert read_checkpoint(out / CHECKPOINT)["base_channels"] == 64

    new = tmp_path / "new"
    Trainer(tiny(image_size=20, channels=0, iterations=3, checkpoint_every=3), new).train(progress=False)
    assert read_checkpoint(new / CHECKPOINT)["base_channels"] == 32
    assert load_run(new).model.net.down[0][0].out_channels == 32


def test_draw_samples_chunks_image_chains_by_the_memory_budget(digits_run, monkeypatch):
    """By default the chains run as many at a time as the memory budget holds for the network's
    activations, not a fixed count: a budget of three samples' worth sends at most three."""
    import pdiff.compare
    from pdiff.compare import draw_samples
    from pdiff.evaluation import pair_bytes

    run = load_run(digits_run)
    per_sample = pair_bytes(run.model, torch.zeros((1,) + tuple(run.event_shape), dtype=torch.float32))
    monkeypatch.setattr(pdiff.compare, "default_memory_budget", lambda device: 3 * per_sample + 1)
    batches = []
    hook = run.model.net.register_forward_hook(lambda m, inputs, out: batches.append(len(inputs[0])))
    try:
        x = draw_samples(run, 7, seed=0)
    finally:
        hook.remove()
    assert batches[0] == 1  # the dry run that measures a sample's activations
    chains = batches[1:]
    assert x.shape == (7, 1, 8, 8) and max(chains) == 3 and sum(chains) == 7 * run.model.num_timesteps
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        draw_samples(run, 2, chunk=0)
