"""The benchmark command runs end to end on tiny settings (no test asserts a time)."""
import json
import math

import pytest
import torch

from pdiff import bench, bench_baselines, bench_profile


def _timings(rows):
    for r in rows:
        for key in ("seconds", "baseline_seconds", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
        assert r["ratio_range"][0] <= r["ratio_ci"][0] <= r["ratio"] <= r["ratio_ci"][1] \
            <= r["ratio_range"][1]
        assert math.isfinite(r["fastest_ratio"]) and r["fastest_ratio"] > 0


def test_quick_run_writes_every_section(tmp_path):
    out_json, out_md = tmp_path / "b.json", tmp_path / "docs" / "benchmarks.md"
    argv = ["--quick", "--out-json", str(out_json), "--out-md", str(out_md)]
    threads = torch.get_num_threads()
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads  # the bench's setting does not outlive it
    report = json.loads(out_json.read_text())
    sections = report["sections"]
    assert set(sections) == set(bench.SECTIONS)
    assert [r["objective"] for r in sections["training"]] == [
        "simple", "vlb", "hybrid", "trajectory", "simple", "hybrid", "hybrid"]
    mnist = sections["training"][-1]  # quick: random images at 8x8, the files need not exist
    assert mnist["shape"] == [1, 8, 8] and mnist["data"].startswith("random 8x8 images")
    assert all(r["examples_per_s"] > 0 and r["baseline_examples_per_s"] > 0
               for r in sections["training"])
    profile = sections["profile"]
    assert [r["threads"] for r in profile["runs"]] == [1] and profile["conv_macs"] > 0
    for run in profile["runs"]:
        assert list(run["components"]) == list(bench_profile.COMPONENTS)
        assert all(v >= 0 for v in run["components"].values())
        assert run["components"]["convolution"] > 0 and run["wall_seconds"] > 0
    width = profile["width"]  # the default width against the old default's, in one run
    assert width["baseline_channels"] == bench.QUICK.width_baseline
    assert width["images_per_s"] > 0 and width["baseline_images_per_s"] > 0
    assert width["ci"][0] <= width["ratio"] <= width["ci"][1]
    assert "the default before" in out_md.read_text()
    assert [r["estimator"] for r in sections["pyro"]] == ["trajectory", "vlb"]
    for name in ("full_bound", "training", "pyro"):
        _timings(sections[name])
        assert all(isinstance(r["met"], bool) and r["target"] > 1 for r in sections[name])
    for key in ("T", "N", "D"):
        _timings(sections["growth"][key])
    cuda = sections["cuda"]
    assert "skipped" in cuda or all("error" in m or m["images_per_s"] > 0
                                    for m in cuda["modes"].values())
    assert report["machine"]["torch"] and report["date"]
    md = out_md.read_text()
    assert report["command"] in md and report["command"].startswith("python -m pdiff.bench --quick")
    for title in ("Full-bound evaluation", "Training overhead", "Where an MNIST training step",
                  "Pyro engine", "grows", "GPU"):
        assert title in md
    assert (out_md.parent / report["figure"]).is_file()
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically, nothing left behind


def test_only_and_bad_names(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--only", "growth", "--set", "growth_timesteps=5",
                       "--out-json", str(out), "--out-md", str(tmp_path / "b.md")]) == 0
    report = json.loads(out.read_text())
    assert set(report["sections"]) == {"growth"}
    assert [r["T"] for r in report["sections"]["growth"]["T"]] == [5]
    before = out.read_bytes()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"rows": []}')
    for args, message in [
        (["--only", "growth,speed"], "unknown section(s) speed; valid: full_bound, training"),
        (["--set", "nonsense=1"], "'nonsense=1': expected NAME=VALUE with NAME one of repeats"),
        (["--set", "repeats"], "'repeats': expected NAME=VALUE"),
        (["--set", "repeats=many"], "'repeats=many': repeats takes an integer, got 'many'"),
        (["--set", "growth_dims=2,x"], "growth_dims takes comma-separated integers"),
        (["--set", "repeats=0"], "'repeats=0': repeats must be >= 1"),
        (["--device", "tpu"], "unknown device 'tpu'; valid: cpu, cuda, cuda:N"),
        (["--threads", "0"], "--threads takes an integer >= 1, got '0'"),
        (["--mnist-dir", str(tmp_path)], "does not hold the four MNIST IDX files"),
        (["--include-json", str(tmp_path / "missing.json")], "cannot read"),
        (["--include-json", str(bad_json)], "is not a pdiff bench report"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--quick", "--only", "growth", *args, "--out-json", str(out),
                        "--out-md", str(tmp_path / "b.md")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, (args, err)
    assert out.read_bytes() == before  # nothing measured, nothing written


def test_output_paths_are_checked_before_measuring(tmp_path, capsys, monkeypatch):
    """A report that cannot be written is refused in one line before minutes of measuring: a
    directory, a folder that is a file, both reports at one path; nothing is written."""
    def measured(*args, **kwargs):
        raise AssertionError("measured before the output paths were checked")
    monkeypatch.setattr(bench, "run", measured)
    folder = tmp_path / "report.md"
    folder.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    good_json, good_md = tmp_path / "b.json", tmp_path / "b.md"
    for json_path, md_path, message in [
        (good_json, folder, "is a directory"),
        (a_file / "b.json", good_md, "is not a folder"),
        (good_json, a_file / "sub" / "b.md", "is not a folder"),
        (good_json, good_json, "the same file"),
    ]:
        code = bench.main(["--quick", "--only", "growth", "--out-json", str(json_path),
                           "--out-md", str(md_path)], prog="pdiff bench")
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("pdiff bench: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "report.md"]


def test_growth_figure_folder_is_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a: pytest.fail("measured"))
    (tmp_path / "figures").write_text("a file where the figures' folder goes")
    code = bench.main(["--quick", "--only", "growth", "--out-json", str(tmp_path / "b.json"),
                       "--out-md", str(tmp_path / "b.md")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a folder" in err and "growth.png" in err


def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    def full(text, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(bench, "atomic_write_text", full)
    code = bench.main(["--quick", "--only", "growth", "--set", "growth_timesteps=5",
                       "--out-json", str(tmp_path / "b.json"), "--out-md", str(tmp_path / "b.md")])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[bench]")]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert "b.json" in lines[0]


def test_include_json_takes_the_sections_this_run_skips(tmp_path):
    """A GPU machine's report merged into a CPU run: its cuda section, with its own date, replaces
    this run's skipped one; the sections this run measured are its own."""
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"date": "2026-01-01 00:00 UTC", "sections": {
        "cuda": {"gpu": "NVIDIA H200", "batch": 128, "examples": 8, "T": 1000, "modes": {
            "eager_fp32": {"images_per_s": 100.0, "full_bound_seconds": 2.0},
            "bf16_compile": {"images_per_s": 250.0, "full_bound_seconds": 0.8}}},
        "growth": {"T": []}}}))
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    assert bench.main(["--quick", "--only", "growth,cuda", "--set", "growth_timesteps=5",
                       "--include-json", str(gpu), "--out-json", str(out),
                       "--out-md", str(md)]) == 0
    sections = json.loads(out.read_text())["sections"]
    if torch.cuda.is_available():  # this machine measured its own
        assert sections["cuda"]["date"] != "2026-01-01 00:00 UTC"
    else:
        assert sections["cuda"]["gpu"] == "NVIDIA H200"
        assert sections["cuda"]["date"] == "2026-01-01 00:00 UTC"
        assert "NVIDIA H200, measured 2026-01-01 00:00 UTC" in md.read_text()
        assert "training 2.50x the images/s, full bound 2.50x as fast" in md.read_text()
    assert [r["T"] for r in sections["growth"]["T"]] == [5]
    report = json.loads(out.read_text())
    if not torch.cuda.is_available():
        assert report["included"] == {"cuda": "2026-01-01 00:00 UTC"}
        assert ("Measured in this run: growth. Merged from earlier reports (`--include-json`), "
                "measured under their own load: cuda on 2026-01-01 00:00 UTC.") in md.read_text()


def test_include_keeps_when_each_section_was_measured():
    """A report merged twice: each section keeps the date it was measured on, not the date of the
    report it was merged from."""
    first = {"date": "day 1", "sections": {"pyro": [], "growth": {"T": []}}}
    second = {"date": "day 2", "sections": {"full_bound": []}}
    bench.include(second, first)
    assert second["included"] == {"pyro": "day 1", "growth": "day 1"}
    third = {"date": "day 3", "sections": {"training": []}}
    bench.include(third, second)
    assert third["included"] == {"full_bound": "day 2", "pyro": "day 1", "growth": "day 1"}
    assert third["sections"]["growth"]["date"] == "day 1"


@pytest.mark.parametrize("objective,image", [("simple", False), ("vlb", False), ("hybrid", False),
                                             ("trajectory", False), ("simple", True),
                                             ("hybrid", True)])
def test_hand_loop_does_the_same_arithmetic(objective, image):
    """The baseline is fair: on the same draws of t and eps (the same generator stream), the
    hand-written loss equals pdiff's objective, and so do its gradients."""
    import torch

    from pdiff.distributions import quantize
    from pdiff.objectives import UniformSampler, get_objective
    from pdiff.train import TrainConfig, build_model, build_net

    T = 12
    cfg = TrainConfig.for_data("digits" if image else "8gaussians", objective=objective,
                               timesteps=T, channels=8)
    shape = (1, 8, 8) if image else (2,)
    torch.manual_seed(0)
    net = build_net(cfg, shape)
    for p in net.parameters():  # away from the zero-initialised output layer
        torch.nn.init.normal_(p, std=0.2)
    data = torch.rand((6,) + shape) * 2 - 1
    data = quantize(data, 17) if image else data
    model = build_model(cfg, net, 17 if image else None)
    hand = bench_baselines.HandLoop(cfg, net, data, 17 if image else None, torch.device("cpu"))
    hand.gen = torch.Generator().manual_seed(3)
    got = hand.loss(data)
    want = get_objective(objective)(model, data, sampler=UniformSampler(T),
                                    generator=torch.Generator().manual_seed(3)).loss.mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    params = list(net.parameters())
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_median_interval_ranks():
    """The order statistics of the binomial rule: ranks 4 and 12 of 15 (P(B <= 3) = 0.018 <= 0.025
    < P(B <= 4) = 0.059), ranks 41 and 61 of 101 (P(B <= 40) = 0.023); too few values give the
    whole range."""
    assert bench.median_interval(list(range(1, 16))) == (4, 12)
    assert bench.median_interval(list(range(1, 102))) == (41, 61)
    assert bench.median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)


def test_median_interval_covers_the_median():
    """Over 2000 seeded samples of 21 skewed (log-normal) ratios around a true median of 1.05,
    the 95% interval covers it in at least 95% of them, less three binomial standard errors."""
    gen, trials, covered = torch.Generator().manual_seed(0), 2000, 0
    for _ in range(trials):
        xs = (1.05 * torch.exp(0.1 * torch.randn(21, generator=gen))).tolist()
        lo, hi = bench.median_interval(xs)
        covered += lo <= 1.05 <= hi
    level = 0.95
    assert covered / trials >= level - 3 * math.sqrt(level * (1 - level) / trials)


def test_gpu_section_runs_its_modes_and_reports_speed_ups():
    """The GPU measurement's code path on the CPU (no time asserted): the MNIST-sized U-Net under
    the wrappers Trainer uses, eager fp32 and bf16 autocast (compilation is left out here: it needs
    a compiler toolchain and minutes); the report gives each mode's speed-up against eager fp32."""
    from dataclasses import replace
    s = replace(bench.QUICK, timesteps=4, cuda_batch=2, cuda_examples=1, cuda_repeats=1)
    cuda = bench.bench_cuda(s, device=torch.device("cpu"), modes=("eager_fp32", "bf16"))
    assert set(cuda["modes"]) == {"eager_fp32", "bf16"}
    for mode in cuda["modes"].values():
        assert "error" not in mode, mode
        assert mode["images_per_s"] > 0 and mode["full_bound_seconds"] > 0
    report = {"command": "pdiff bench", "date": "today", "load_average_end": [0.0],
              "machine": {"cpu": "cpu", "cpu_count": 1, "torch": torch.__version__,
                          "torch_threads": 1, "python": "3", "load_average": [0.0]},
              "sections": {"cuda": {**cuda, "gpu": "a GPU"}}}
    md = bench.markdown(report)
    assert "| eager_fp32 |" in md and "| 1.00x |" in md and "| bf16 |" in md


def test_versus_estimators():
    """The median of the paired ratios and the ratio of each side's fastest call, per unit."""
    r = bench.versus({"a": [2.0, 6.0, 4.0], "b": [1.0, 4.0, 1.0]}, "a", "b", per=2)
    assert r["ratio"] == 2.0 and r["ratio_range"] == [1.5, 4.0] and r["repeats"] == 3
    assert r["fastest_ratio"] == 2.0 and r["seconds"] == 2.0 and r["baseline_seconds"] == 0.5


def _idx_folder(folder, size):
    bench._random_idx(folder, size, train=8, test=2)
    return folder


def test_mnist_data_takes_the_files_at_their_size_else_random(tmp_path):
    """The MNIST case trains on the files where they are and the size is theirs (28); at another
    size, or without the files, on random images of that size, which the loader reads as MNIST."""
    from pdiff.data import load_images

    real = _idx_folder(tmp_path / "real", 28)
    assert bench.mnist_data(tmp_path / "work", 28, str(real)) == (
        str(real), f"the MNIST files in {real}")
    for size, where in ((8, str(real)), (28, str(tmp_path / "missing"))):
        folder, held = bench.mnist_data(tmp_path / "work", size, where)
        assert folder != str(real) and held.startswith(f"random {size}x{size} images")
        images = load_images("mnist", data_dir=folder)
        assert images.train.shape[1:] == (1, size, size) and images.num_levels == 256


def test_profile_charges_backward_ops_to_their_forward_components():
    """Under the profiler, a U-Net's forward and backward: every op inside an autograd node made
    by a convolution, GroupNorm or SiLU is charged to that component, nothing to the trainer, and
    the charged self times add up to the profile's total."""
    from torch.profiler import ProfilerActivity, profile

    from pdiff.nets import UNet, unet_for

    torch.manual_seed(0)
    net = UNet(**unet_for(8, 1, base_channels=8))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 5])
    with bench_profile.marked(net), profile(activities=[ProfilerActivity.CPU]) as prof:
        net(x, t).square().mean().backward()
    events = prof.events()
    charged = bench_profile.charge(events)
    expect = {"ConvolutionBackward0": {"convolution", "attention"},  # attention: 1x1 conv1d
              "NativeGroupNormBackward0": {"groupnorm"}, "SiluBackward0": {"silu"},
              "BmmBackward0": {"attention"}}
    seen = set()
    for e, comp in zip(events, charged):
        node = bench_profile._backward_node(e)
        name = node.name.rsplit(": ", 1)[-1] if node is not None else None
        if name in expect:
            assert comp in expect[name], (e.name, name, comp)
            seen.add(name)
    assert seen == set(expect)
    # the loss here is outside any scope: its ops and their backward alone are the trainer's
    for e, comp in zip(events, charged):
        node = bench_profile._backward_node(e)
        if comp == "trainer other" and node is not None:
            assert node.name.endswith(("PowBackward0", "MeanBackward0")), (e.name, node.name)
    totals = bench_profile.breakdown(events)
    assert sum(totals.values()) == pytest.approx(sum(e.self_cpu_time_total for e in events) / 1e6)
    assert totals["attention"] > 0 and totals["data"] == 0


def test_profile_command_runs(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert bench_profile.main(["--data", "digits", "--channels", "8", "--batch-size", "2",
                               "--threads", "1", "--steps", "1", "--timed", "1",
                               "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| convolution |" in printed and "using 1 thread" in printed
    result = json.loads(out.read_text())
    assert result["wall_seconds"] > 0 and len(result["timed_seconds"]) == 1
