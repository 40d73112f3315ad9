"""The trainer: exact resume, atomic checkpoints, refusals that overwrite nothing."""
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from pdiff.cli import main
from pdiff.train import CHECKPOINT, TrainConfig, Trainer, TrainingError, load_run

TINY = dict(data="mixture1d", timesteps=20, iterations=40, batch_size=32, hidden=16, depth=2,
            train_size=500, test_size=200, log_every=10, checkpoint_every=20, warmup=5)


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**(TINY | changes))


def weights(out):
    return torch.load(out / CHECKPOINT, weights_only=False)


@pytest.mark.parametrize("objective, variance, sampler", [
    ("hybrid", "learned_range", "uniform"), ("vlb", "fixed_large", "importance"),
])
def test_resumed_run_equals_uninterrupted(tmp_path, objective, variance, sampler):
    cfg = tiny(objective=objective, variance=variance, sampler=sampler)
    Trainer(cfg, tmp_path / "a").train(progress=False)
    half = tiny(objective=objective, variance=variance, sampler=sampler, iterations=20)
    Trainer(half, tmp_path / "b").train(progress=False)
    Trainer(cfg, tmp_path / "b", resume=True).train(progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a["step"] == b["step"] == 40
    for key in ("net", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_data_on_host_resumes_exactly_and_keeps_its_index_stream(tmp_path):
    """With the train split in host memory the batch indices come from a host stream of their own,
    saved in the checkpoint: an interrupted run resumes draw for draw, and a run saved with the
    data on the device resumes with it on the host (a runtime option) and trains on."""
    cfg = tiny(data_on="host", objective="hybrid")
    Trainer(cfg, tmp_path / "a").train(progress=False)
    Trainer(replace(cfg, iterations=20), tmp_path / "b").train(progress=False)
    assert "index_generator" in weights(tmp_path / "b")["rng"][0]
    Trainer(cfg, tmp_path / "b", resume=True).train(progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a["net"]:
        torch.testing.assert_close(a["net"][name], b["net"][name], rtol=0, atol=0)
    Trainer(replace(cfg, data_on="device", iterations=20), tmp_path / "c").train(progress=False)
    resumed = Trainer(cfg, tmp_path / "c", resume=True)
    assert resumed.train_x.device.type == "cpu" and resumed.index_gen is not resumed.gen
    resumed.train(progress=False)
    assert weights(tmp_path / "c")["step"] == 40


def test_data_on_is_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown data_on 'disk'; valid: device, host"):
        Trainer(tiny(data_on="disk"), tmp_path / "x")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "mixture1d", "--data-on", "disk", "--out", str(tmp_path / "y")])
    assert exit_.value.code == 2
    assert "--data-on" in capsys.readouterr().err and not (tmp_path / "y").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_data_on_host_feeds_a_gpu_from_pinned_memory(tmp_path):
    """On a GPU, host data is pinned and each batch reaches the device; labels too."""
    trainer = Trainer(TrainConfig.for_data("digits", data_on="host", device="cuda", iterations=4,
                                           batch_size=8, timesteps=10, class_cond=True,
                                           log_every=2, checkpoint_every=4), tmp_path)
    assert trainer.train_x.is_pinned() and trainer.train_y.is_pinned()
    idx, x0 = trainer._batch()
    assert x0.device.type == "cuda" and idx.device.type == "cpu"
    torch.testing.assert_close(x0.cpu(), trainer.train_x[idx], rtol=0, atol=0)
    assert math.isfinite(trainer.train(progress=False)["loss"])


def test_existing_run_is_not_overwritten(tmp_path):
    Trainer(tiny(iterations=5), tmp_path).train(progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match="--resume.*--force"):
        Trainer(tiny(), tmp_path)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_resume_with_another_configuration_is_refused(tmp_path):
    Trainer(tiny(iterations=5), tmp_path).train(progress=False)
    with pytest.raises(ValueError, match="differs in lr"):
        Trainer(tiny(lr=1e-4), tmp_path, resume=True)


def test_corrupt_or_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        load_run(tmp_path)
    Trainer(tiny(iterations=5), tmp_path).train(progress=False)
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_run(tmp_path)


@pytest.mark.parametrize("fails_on_nan_weights", [False, True])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, fails_on_nan_weights):
    """The loss is checked at log and checkpoint steps (10, 20, 30), always before saving. Where the
    NaN weights make the very next step fail (as a validated distribution refuses a NaN parameter),
    that failure is reported as the non-finite loss instead."""
    trainer = Trainer(tiny(iterations=40, checkpoint_every=10), tmp_path)
    real = trainer._loss

    def loss(x0):
        nan_weights = any(not torch.isfinite(p).all() for p in trainer.net.parameters())
        if fails_on_nan_weights and nan_weights:
            raise ValueError("Expected parameter loc to satisfy the constraint Real()")
        value = real(x0)
        return value * math.nan if trainer.step >= 25 else value

    trainer._loss = loss
    stop = 26 if fails_on_nan_weights else 30
    with pytest.raises(TrainingError, match=f"non-finite loss at step 25; stopped at step {stop} "
                       "before saving"):
        trainer.train(progress=False)
    assert load_run(tmp_path).step == 20
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]


def test_other_errors_pass_through(tmp_path):
    trainer = Trainer(tiny(iterations=40), tmp_path)
    trainer._loss = lambda x0: (_ for _ in ()).throw(ValueError("a real mistake"))
    with pytest.raises(ValueError, match="a real mistake"):
        trainer.train(progress=False)


def test_training_lowers_the_bound(tmp_path):
    """A short run's EMA model has a lower bound on held-out data than the untrained network."""
    from pdiff.elbo import full_bound
    from pdiff.data import get_toy, toy_split

    cfg = tiny(iterations=300, checkpoint_every=300, ema_decay=0.9)
    trainer = Trainer(cfg, tmp_path)
    _, test = toy_split(get_toy("mixture1d"), 0, 1000, 1)
    test = test.float()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = full_bound(trainer.model, test, generator=gen()).total
    trainer.train(progress=False)
    after = full_bound(load_run(tmp_path).model, test, generator=gen()).total
    diff = before - after
    assert diff.mean() > 5 * diff.std() / math.sqrt(len(diff))


def test_pyro_engine_trains(tmp_path):
    cfg = tiny(engine="pyro", objective="vlb", variance="fixed_large", timesteps=5, iterations=20)
    Trainer(cfg, tmp_path).train(progress=False)
    assert load_run(tmp_path).step == 20


def test_cli_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "mixture1d", "--timesteps", "20", "--iterations", "20", "--batch-size",
            "32", "--hidden", "16", "--train-size", "500", "--test-size", "300", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # the run exists
    assert "exists" in capsys.readouterr().err
    # --metric-samples 0: a 20-step run's sampling chain can diverge (evaluate then exits 1)
    assert main(["evaluate", "--checkpoint", str(out), "--samples", "200", "--entropy-samples",
                 "1000", "--metric-samples", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["num_samples"] == 200 and len(r["terms_nats"]) == 20 and r["entropy_nats"] is not None
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none")]) == 2
    assert main(["train", "--data", "mixture1d", "--engine", "pyro", "--objective", "hybrid",
                 "--out", str(tmp_path / "p")]) == 2
    assert "vlb or trajectory" in capsys.readouterr().err


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("user data")
    assert main(["train", "--data", "mixture1d", "--out", str(blocker / "run")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert blocker.read_text() == "user data"


def test_bf16_runs_the_network_in_bfloat16_and_the_loss_in_full_precision(tmp_path):
    trainer = Trainer(tiny(precision="bf16", iterations=10), tmp_path)
    inside, outside = set(), set()
    for m in trainer.net.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: inside.add(out.dtype))
    trainer.model.net.register_forward_hook(lambda mod, inp, out: outside.add(out.dtype))
    losses = []
    real = trainer._loss
    trainer._loss = lambda x0: (losses.append(real(x0)), losses[-1])[1]
    last = trainer.train(progress=False)
    assert inside == {torch.bfloat16} and outside == {torch.float32}
    assert torch.bfloat16 not in {loss.dtype for loss in losses} and math.isfinite(last["loss"])
    run = load_run(tmp_path)
    assert all(p.dtype == torch.float32 for p in run.model.net.parameters())


def test_precision_and_compile_options(tmp_path, capsys, monkeypatch):
    base = ["train", "--data", "mixture1d", "--timesteps", "10", "--iterations", "10", "--batch-size",
            "16", "--hidden", "16", "--train-size", "200", "--test-size", "100", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(base + ["--out", str(tmp_path / "x"), "--precision", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(net) or net)
    out = tmp_path / "run"
    assert main(base + ["--out", str(out), "--compile", "--precision", "bf16"]) == 0
    assert len(compiled) == 1 and json.loads((out / "config.json").read_text())["compile"] is True
    # how fast a run trains is not what it trains: a resume may change both
    assert main(base[:6] + ["20"] + base[7:] + ["--out", str(out), "--resume"]) == 0
    assert load_run(out).step == 20
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--samples", "50", "--entropy-samples", "500",
                 "--metric-samples", "0", "--precision", "bf16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["eval_precision"] == "bf16" and math.isfinite(r["nll_nats"])
    assert main(["evaluate", "--data", "clusters8", "--precision", "bf16"]) == 2
    assert "--precision applies to a trained network" in capsys.readouterr().err
    monkeypatch.setattr("pdiff.train._compile_supported", lambda: False)
    assert main(base + ["--out", str(tmp_path / "y"), "--compile"]) == 2
    assert "--compile needs torch.compile" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                    reason="torch.compile's CPU backend needs a C compiler")
def test_compiled_training_computes_what_eager_does(tmp_path):
    """A real torch.compile (inductor on the CPU): the same seeded steps give the same weights as
    the eager run to float32 rounding, and the checkpoint holds the plain network's names."""
    from pdiff.train import _compile_supported
    if not _compile_supported():
        pytest.skip("torch.compile is not supported here")
    cfg = tiny(iterations=3, log_every=3, checkpoint_every=3)
    eager = Trainer(cfg, tmp_path / "eager")
    eager.train(progress=False)
    compiled = Trainer(replace(cfg, compile=True), tmp_path / "compiled")
    compiled.train(progress=False)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    for part in ("net", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-6)


def test_ema_follows_its_recurrence(tmp_path):
    """After step s (from 0) the EMA is d_s e + (1 - d_s) w with d_s = min(decay, (1 + s)/(10 + s))
    and w the weights just updated: checked step by step against the trainer's own weights."""
    trainer = Trainer(tiny(iterations=3, ema_decay=0.15), tmp_path)
    want = [p.detach().clone() for p in trainer.ema.parameters()]
    for s in range(3):
        trainer.cfg.iterations = s + 1
        trainer.train(progress=False)
        d = min(0.15, (1 + s) / (10 + s))
        want = [d * e + (1 - d) * w.detach() for e, w in zip(want, trainer.net.parameters())]
        for got, expected in zip(trainer.ema.parameters(), want):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(e, w) for e, w in zip(trainer.ema.parameters(),
                                                     trainer.net.parameters()))
