"""Training in continuous time (VDM): the continuous objective, a learned schedule, and the runs
they make (saved, resumed, loaded and evaluated like any other)."""
import json

import pytest
import torch

from pdiff.cli import main
from pdiff.continuous import DiscreteLogSNR
from pdiff.train import TrainConfig, Trainer, load_run

BASE = dict(data="mixture1d", objective="continuous", variance="fixed_small", timesteps=100,
            batch_size=128, train_size=4000, test_size=1000, hidden=32, depth=2, log_every=50,
            checkpoint_every=100)


def evaluate(out, capsys, *extra):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--samples", "1000", "--metric-samples",
                 "0", "--likelihood", "bound,continuous", "--continuous-samples", "8", "--json",
                 "--no-progress", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_training_on_the_continuous_bound_lowers_both_bounds(tmp_path, capsys):
    first = tmp_path / "first"
    Trainer(TrainConfig(**BASE, iterations=1), first).train(progress=False)
    trained = tmp_path / "trained"
    Trainer(TrainConfig(**BASE, iterations=1500, lr=3e-3), trained).train(progress=False)
    before, after = evaluate(first, capsys), evaluate(trained, capsys)
    for key in ("nll_nats",):
        assert after[key] < before[key] - 1.0
        assert after["continuous"][key] < before["continuous"][key] - 1.0
    # trained, both are bounds of about the data entropy (2.06 nats)
    assert after["continuous"]["nll_nats"] > after["entropy_nats"] - 5 * after["continuous"]["nll_stderr"]
    assert after["continuous"]["nll_nats"] < after["entropy_nats"] + 1.0


def test_a_learned_schedule_is_saved_resumed_and_evaluated(tmp_path, capsys):
    out = tmp_path / "learned"
    cfg = TrainConfig(**BASE, iterations=200, learned_schedule=True)
    Trainer(cfg, out).train(progress=False)
    run = load_run(out)
    base = DiscreteLogSNR(run.model.schedule)  # the learned schedule's T steps
    assert run.log_snr is not None
    u = torch.arange(1, 101, dtype=torch.float64) / 100
    with torch.no_grad():
        torch.testing.assert_close(base(u), run.log_snr(u), rtol=1e-9, atol=1e-9)
        learned = run.log_snr(torch.linspace(0.01, 1, 500, dtype=torch.float64))
    assert (learned[1:] < learned[:-1]).all()
    # its ends are the base schedule's: the prior and decoder terms are unchanged
    linear = load_run(out).model.schedule
    from pdiff.schedules import make_schedule
    torch.testing.assert_close(linear.alpha_bar[[1, -1]], make_schedule("linear", 100).alpha_bar[[1, -1]])
    # a resumed run continues from the saved schedule
    Trainer(TrainConfig(**{**BASE, "iterations": 300, "learned_schedule": True}), out,
            resume=True).train(progress=False)
    resumed = load_run(out)
    assert resumed.step == 300
    r = evaluate(out, capsys)  # both estimators of the learned schedule's model bound its NLL
    for estimate in (r, r["continuous"]):
        assert estimate["nll_nats"] > r["entropy_nats"] - 5 * estimate["nll_stderr"]


def test_resuming_a_learned_schedule_equals_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    cfg = dict(BASE, learned_schedule=True, checkpoint_every=50)
    Trainer(TrainConfig(**cfg, iterations=100), whole).train(progress=False)
    Trainer(TrainConfig(**cfg, iterations=50), parts).train(progress=False)
    Trainer(TrainConfig(**cfg, iterations=100), parts, resume=True).train(progress=False)
    a, b = load_run(whole), load_run(parts)
    for name, value in a.log_snr.state_dict().items():
        torch.testing.assert_close(b.log_snr.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(a.model.schedule.betas, b.model.schedule.betas, rtol=0, atol=0)


@pytest.mark.parametrize("changes,message", [
    (dict(prediction="mean"), "eps, x0 or v"),
    (dict(embedding="onehot"), "sinusoidal"),
    (dict(variance="learned_range"), "fixed_small or fixed_large"),
    (dict(sampler="importance"), "uniform"),
    (dict(objective="simple", learned_schedule=True), "--objective continuous"),
])
def test_refused_combinations(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**BASE, **changes}).validate()
