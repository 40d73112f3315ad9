"""Every option reachable from the command line: the schedule's parameters and a file of betas,
the U-Net's and the MLP's sizes, the objectives' own options, and sampling's choices; each one
changes what it names, and a wrong value is refused in one line with exit code 2."""
import json

import numpy as np
import pytest
import torch

from pdiff.cli import main
from pdiff.compare import draw_samples
from pdiff.nets.embeddings import SinusoidalEmbedding
from pdiff.nets.unet import UNet
from pdiff.schedules import make_schedule
from pdiff.train import TrainConfig, Trainer, load_run

TINY = ["--data", "mixture1d", "--iterations", "5", "--timesteps", "20", "--train-size", "200",
        "--test-size", "100", "--batch-size", "32", "--no-progress"]


def train(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["train", *TINY, "--out", str(out), *extra]) == 0
    return load_run(out)


def test_schedule_parameters_reach_the_schedule(tmp_path, capsys):
    run = train(tmp_path, "ends", "--beta-start", "0.001", "--beta-end", "0.05")
    assert float(run.model.schedule.betas[1]) == pytest.approx(0.001)
    assert float(run.model.schedule.betas[-1]) == pytest.approx(0.05)
    run = train(tmp_path, "cos", "--schedule", "cosine", "--cosine-s", "0.02")
    expected = make_schedule("cosine", 20, cosine_s=0.02, warn=False)
    torch.testing.assert_close(run.model.schedule.betas, expected.betas)
    assert not torch.allclose(expected.betas, make_schedule("cosine", 20, warn=False).betas)
    run = train(tmp_path, "poly", "--schedule", "polynomial", "--schedule-power", "3")
    torch.testing.assert_close(run.model.schedule.betas,
                               make_schedule("polynomial", 20, power=3.0, warn=False).betas)
    run = train(tmp_path, "const", "--schedule", "const", "--const-beta", "0.1")
    assert torch.all(run.model.schedule.betas[1:] == 0.1)


def test_a_file_of_betas_is_the_schedule_and_stays_with_the_run(tmp_path, capsys):
    path = tmp_path / "betas.npy"
    betas = np.linspace(1e-3, 0.2, 30)
    np.save(path, betas)
    out = tmp_path / "run"
    argv = [a for a in TINY if a not in ("--timesteps", "20")]
    assert main(["train", *argv, "--betas", str(path), "--out", str(out)]) == 0  # T from the file
    run = load_run(out)
    assert run.model.num_timesteps == 30
    torch.testing.assert_close(run.model.schedule.betas[1:], torch.as_tensor(betas))
    np.save(path, betas * 0.5)  # the run keeps its own betas: resuming on others is refused
    capsys.readouterr()
    assert main(["train", *argv, "--betas", str(path), "--out", str(out), "--resume",
                 "--iterations", "10"]) == 2
    assert "no longer holds the betas" in capsys.readouterr().err
    path.unlink()  # evaluating needs the checkpoint only
    assert main(["evaluate", "--checkpoint", str(out), "--samples", "50", "--metric-samples", "0",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["betas"] == str(path)


def test_network_sizes(tmp_path):
    run = train(tmp_path, "mlp", "--hidden", "24", "--depth", "2", "--embedding-dim", "10")
    embed = [m for m in run.model.net.modules() if isinstance(m, SinusoidalEmbedding)]
    assert embed[0].dim == 10
    assert [m.out_features for m in run.model.net.body if hasattr(m, "out_features")] == [24, 24]
    cfg = TrainConfig.for_data("digits", channels=8, channel_mults="1,2,3", num_res_blocks=2,
                               attention_resolutions="none", num_heads=2).validate()
    from pdiff.train import build_net
    net = build_net(cfg, (1, 8, 8))
    assert isinstance(net, UNet)
    # "none": no attention at the levels, only the middle block's (as in DDPM's U-Net)
    assert sum("Attention" in type(m).__name__ for m in net.modules()) == 1
    widths = {m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {8, 16, 24} <= widths
    with_attention = build_net(TrainConfig.for_data("digits", channels=8, num_heads=2,
                                                    attention_resolutions="8/4"), (1, 8, 8))
    heads = [m.num_heads for m in with_attention.modules() if hasattr(m, "num_heads")]
    assert heads and set(heads) == {2}
    assert len(heads) > len([m for m in build_net(TrainConfig.for_data("digits", channels=8),
                                                  (1, 8, 8)).modules() if hasattr(m, "num_heads")])


@pytest.mark.parametrize("objective,option,value,key", [
    ("hybrid", "--hybrid-weight", "0.01", "hybrid_weight"),
    ("min_snr", "--min-snr-gamma", "2", "gamma"),
    ("p2", "--p2-gamma", "0.5", "gamma"),
])
def test_objective_options_reach_the_loss(tmp_path, objective, option, value, key):
    cfg = TrainConfig(data="mixture1d", objective=objective, timesteps=20, train_size=200,
                      test_size=100, iterations=1)
    changed = TrainConfig(**{**cfg.__dict__, option[2:].replace("-", "_"): float(value)})
    a, b = Trainer(cfg, tmp_path / "a"), Trainer(changed, tmp_path / "b")
    assert b.loss_options[key] == float(value) != a.loss_options[key]
    x0 = a.train_x[:64]
    la = a.loss_fn(a.model, x0, sampler=a.sampler, generator=torch.Generator().manual_seed(0),
                   **a.loss_options).loss
    lb = b.loss_fn(a.model, x0, sampler=a.sampler, generator=torch.Generator().manual_seed(0),
                   **b.loss_options).loss
    assert not torch.allclose(la, lb)


def test_compare_grids_over_the_new_options(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", "mixture1d", "--objectives", "hybrid", "--variances",
                 "learned_range", "--seeds", "1", "--iterations", "5", "--timesteps", "20",
                 "--eval-samples", "50", "--metric-samples", "0", "--no-figures", "--jobs", "1",
                 "--grid", "hybrid_weight=0.001,0.01", "--grid", "beta_end=0.02,0.05",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert {tuple(r["cell"].values()) for r in doc["runs"]} == {
        ("hybrid", "learned_range", w, e) for w in (0.001, 0.01) for e in (0.02, 0.05)}


def test_sampling_choices(tmp_path, capsys):
    run = train(tmp_path, "learned", "--variance", "learned_range")
    fixed = draw_samples(run, 200, seed=3, sampling_variance="fixed_large")
    by_hand = draw_samples(type(run)(**{**run.__dict__,
                                       "model": run.model.with_variance("fixed_large")}), 200, seed=3)
    torch.testing.assert_close(fixed, by_hand, rtol=0, atol=0)
    assert not torch.equal(fixed, draw_samples(run, 200, seed=3))
    # the noiseless last step is the decoder's mean: the same x_1 gives a different x_0
    a = draw_samples(run, 200, seed=4, noiseless_last_step=True)
    b = draw_samples(run, 200, seed=4)
    assert not torch.equal(a, b) and (a - b).abs().max() < 1.0
    # another schedule with K steps: the chain has K steps, each a training step of the network
    other = run.model.with_schedule(make_schedule("cosine", 7))
    assert other.num_timesteps == 7 and int(other.timestep_map.max()) <= 20
    capsys.readouterr()
    target = tmp_path / "s.npy"
    assert main(["sample", "--checkpoint", str(tmp_path / "learned"), "--num", "50", "--out",
                 str(target), "--sampling-schedule", "cosine", "--sampling-timesteps", "7",
                 "--sampling-variance", "fixed_small", "--noiseless-last-step"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["sampling_schedule"] == "cosine" and r["sampling_variance"] == "fixed_small"
    assert np.load(target).shape == (50, 1)


@pytest.mark.parametrize("extra,message", [
    (["--beta-start", "-1"], "betas must lie"),
    (["--channel-mults", "1,x", "--data", "digits"], "channel_mults must be positive integers"),
    (["--num-heads", "0"], "num_heads >= 1"),
    (["--embedding-dim", "1"], "embedding_dim >= 2"),
    (["--hybrid-weight", "nan"], "hybrid_weight must be finite"),
    (["--betas", "missing.npy"], "does not exist"),
])
def test_bad_options_are_refused(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(["train", *TINY, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sampling_refusals(tmp_path, capsys):
    train(tmp_path, "run")
    capsys.readouterr()
    for extra, message in ((["--clip-denoised"], "vector data"),
                           (["--sampler", "ddim", "--noiseless-last-step"], "--sampler ddpm")):
        assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--num", "5", "--out",
                     str(tmp_path / "x.npy"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_a_run_saved_before_an_option_existed_resumes(tmp_path, capsys):
    """Options are added with the default that keeps the old behaviour: a run whose saved
    configuration lacks one resumes (and compare --resume reuses it)."""
    out = tmp_path / "old"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    for newer in ("hybrid_weight", "channel_mults", "beta_start"):
        del conf[newer]
    (out / "config.json").write_text(json.dumps(conf))
    capsys.readouterr()
    assert main(["train", *[a if a != "5" else "8" for a in TINY], "--out", str(out),
                 "--resume"]) == 0
    assert load_run(out).step == 8
