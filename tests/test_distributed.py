"""Data-parallel training and sharded evaluation: two CPU processes over gloo.

Two kinds of test: a group of two processes spawned here (``torch.multiprocessing``) that run the
helpers and the ``Trainer`` and report what each rank saw, and ``torchrun`` launching the command
line, whose runs and evaluations are compared with one-process ones.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pdiff import distributed
from pdiff.cli import main
from pdiff.train import CHECKPOINT, TrainConfig, Trainer, gather_steps, load_run

from .stats import assert_within_stderr

WORLD = 2


# -- one process: every helper is a no-op ---------------------------------------------------------

def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and not distributed.active()
    assert distributed.init("cpu") == torch.device("cpu") and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_cat(x) is x
    assert torch.equal(distributed.all_reduce(x, "mean"), x)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_object(3) == [3]
    t, term = torch.tensor([1, 2]), torch.tensor([0.5, 0.25])
    assert gather_steps(t, term) == (t, term)
    with pytest.raises(ValueError, match="boom"):
        distributed.on_main(lambda: (_ for _ in ()).throw(ValueError("boom")))
    distributed.barrier()
    distributed.cleanup()
    with pytest.raises(ValueError, match="unknown reduction"):
        distributed.all_reduce(x, "prod")


def test_rank_seeds_keep_rank_0_and_differ():
    assert distributed.rank_seed(7, 0) == 7
    seeds = {distributed.rank_seed(s, r) for s in range(4) for r in range(8)}
    assert len(seeds) == 32


# -- a spawned group of two processes -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = dict(data="mixture1d", timesteps=10, batch_size=16, hidden=16, depth=2, train_size=400,
            test_size=100, log_every=5, checkpoint_every=10, warmup=2, objective="vlb",
            variance="fixed_large", sampler="importance")


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    tmp = Path(tmp)
    distributed.init("cpu")
    report = {}
    # unequal slices gathered in rank order
    mine = torch.arange(3 + rank, dtype=torch.float64) + 10 * rank
    report["gathered"] = distributed.all_gather_cat(mine, [3, 4])
    # a refusal on rank 0 reaches every rank
    try:
        distributed.on_main(lambda: (_ for _ in ()).throw(ValueError("refused on rank 0")))
    except ValueError as e:
        report["refusal"] = (str(e), getattr(e, "on_every_rank", False))
    try:
        Trainer(TrainConfig(**TINY | {"batch_size": 15, "iterations": 5}), tmp / "odd")
    except ValueError as e:
        report["odd_batch"] = str(e)
    # a run; each rank records the batches it trained on
    trainer = Trainer(TrainConfig(**TINY | {"iterations": 40}), tmp / "a")
    real, batches = trainer._loss, []
    trainer._loss = lambda x0: (batches.append(x0.clone()), real(x0))[1]
    trainer.train(progress=False)
    report["batches"] = torch.stack(batches)
    report["net"], report["ema"] = trainer.net.state_dict(), trainer.ema.state_dict()
    report["sampler"] = trainer.sampler.state_dict()
    # the same run in two halves
    Trainer(TrainConfig(**TINY | {"iterations": 20}), tmp / "b").train(progress=False)
    resumed = Trainer(TrainConfig(**TINY | {"iterations": 40}), tmp / "b", resume=True)
    resumed.train(progress=False)
    report["resumed_net"] = resumed.net.state_dict()
    torch.save(report, tmp / f"rank{rank}.pt")
    distributed.cleanup()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spawned")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gather_and_refusal_reach_every_rank(spawned):
    _, reports = spawned
    for r in reports:
        assert r["gathered"].tolist() == [0, 1, 2, 10, 11, 12, 13]
        assert r["refusal"] == ("refused on rank 0", True)
        assert "must be divisible by the number of processes, 2" in r["odd_batch"]


def test_ranks_split_the_batch_and_stay_in_step(spawned):
    """Each rank trains on its half of the global batch, different from the other's; the averaged
    gradients keep the weights, the EMA and the importance sampler identical on every rank."""
    tmp, (r0, r1) = spawned
    assert r0["batches"].shape[1] == TINY["batch_size"] // WORLD
    assert not torch.equal(r0["batches"], r1["batches"])
    for key in ("net", "ema", "resumed_net"):
        for name in r0[key]:
            torch.testing.assert_close(r0[key][name], r1[key][name], rtol=0, atol=0)
    # 40 steps x 16 terms fill every step's history: the sampler left uniform on both ranks alike
    assert bool((r0["sampler"]["counts"] == 10).all())
    for name in ("values", "counts"):
        assert torch.equal(r0["sampler"][name], r1["sampler"][name])
    state = torch.load(tmp / "a" / CHECKPOINT, weights_only=False)
    for name in state["net"]:
        torch.testing.assert_close(state["net"][name], r0["net"][name], rtol=0, atol=0)
    assert state["world_size"] == WORLD and len(state["rng"]) == WORLD
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])


def test_resume_on_as_many_ranks_is_exact(spawned):
    _, (r0, _) = spawned
    for name in r0["net"]:
        torch.testing.assert_close(r0["resumed_net"][name], r0["net"][name], rtol=0, atol=0)


def test_only_rank_0_writes(spawned):
    tmp, _ = spawned
    for run in ("a", "b"):
        assert sorted(p.name for p in (tmp / run).iterdir()) == ["checkpoint.pt", "config.json",
                                                                  "metrics.jsonl"]
        steps = [json.loads(ln)["step"] for ln in (tmp / run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(5, 41, 5))
    assert not (tmp / "odd").exists()


# -- torchrun and the command line ----------------------------------------------------------------

RUN = ["--data", "mixture1d", "--timesteps", "100", "--iterations", "400", "--batch-size", "128",
       "--hidden", "64", "--depth", "2", "--train-size", "5000", "--test-size", "2000",
       "--log-every", "100", "--checkpoint-every", "200", "--no-progress"]
EVAL = ["--samples", "2000", "--entropy-samples", "20000", "--metric-samples", "0", "--json"]


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(WORLD), "-m", "pdiff.cli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def evaluate(run, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), *EVAL]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A run trained by torchrun on two processes and its evaluation sharded over two."""
    tmp = tmp_path_factory.mktemp("torchrun")
    train = torchrun("train", *RUN, "--out", "ddp", cwd=tmp)
    assert train.returncode == 0, train.stderr
    ev = torchrun("evaluate", "--checkpoint", "ddp", *EVAL, cwd=tmp)
    assert ev.returncode == 0, ev.stderr
    return tmp, train, ev


def test_torchrun_run_matches_a_one_process_run(launched, tmp_path, capsys):
    """The same global batch on two processes and on one: bounds that agree within their standard
    errors (a broken gradient average or a rank training on nothing would not)."""
    tmp, train, _ = launched
    assert len(train.stdout.strip().splitlines()) == 1  # rank 0 alone prints
    assert json.loads(train.stdout)["step"] == 400
    assert main(["train", *RUN, "--out", str(tmp_path / "one")]) == 0
    two, one = evaluate(tmp / "ddp", capsys), evaluate(tmp_path / "one", capsys)
    assert two["num_samples"] == one["num_samples"] == 2000
    assert_within_stderr(two["nll_nats"], one["nll_nats"],
                         math.hypot(two["nll_stderr"], one["nll_stderr"]), z=4)
    assert load_run(tmp / "ddp").config == load_run(tmp_path / "one").config


def test_torchrun_rank_0_writes_one_log(launched):
    tmp, _, _ = launched
    assert sorted(p.name for p in (tmp / "ddp").iterdir()) == ["checkpoint.pt", "config.json",
                                                              "metrics.jsonl"]
    lines = (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [100, 200, 300, 400]


def test_sharded_evaluation_equals_one_process(launched, capsys):
    tmp, _, ev = launched
    lines = ev.stdout.strip().splitlines()
    assert len(lines) == 1
    sharded, single = json.loads(lines[0]), evaluate(tmp / "ddp", capsys)
    assert sharded["eval_processes"] == WORLD and single["eval_processes"] == 1
    assert sharded["num_samples"] == single["num_samples"] and sharded["dim"] == single["dim"]
    assert len(sharded["terms_nats"]) == len(single["terms_nats"]) == 100
    assert sharded["nll_nats"] != single["nll_nats"]  # rank 1 drew its own noise
    for key in ("nll", "gap", "entropy"):  # (this process evaluates in float64, torchrun's in float32)
        assert_within_stderr(sharded[f"{key}_nats"], single[f"{key}_nats"],
                             math.hypot(sharded[f"{key}_stderr"], single[f"{key}_stderr"]), z=4)


def test_torchrun_run_resumes_on_one_process(launched, tmp_path):
    """A two-process checkpoint continues in one process, with a warning that the random streams
    start afresh; its log goes on without duplicates."""
    import shutil

    tmp, _, _ = launched
    shutil.copytree(tmp / "ddp", tmp_path / "run")
    args = [a if a != "400" else "500" for a in RUN]
    with pytest.warns(UserWarning, match="saved by 2 process.es. and is resumed on 1"):
        assert main(["train", *args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [100, 200, 300, 400, 500]


def test_torchrun_refusal_is_reported_once(launched):
    tmp, _, _ = launched
    again = torchrun("train", *RUN, "--out", "ddp", cwd=tmp)
    assert again.returncode != 0
    assert again.stderr.count("pdiff train: error: run directory 'ddp' exists") == 1
