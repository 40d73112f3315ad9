"""pdiff evaluate --likelihood: the estimators beside the discrete bound, on the same test points,
and their options refused where they do not apply."""
import json
import math

import pytest

from pdiff.cli import main

ORACLE = ["evaluate", "--data", "mixture1d", "--variance", "fixed_small", "--schedule", "linear",
          "--timesteps", "400", "--samples", "1500", "--entropy-samples", "5000", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def strict(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_the_continuous_bound_of_the_oracle_sits_between_the_entropy_and_the_discrete_bound(capsys):
    """With the posterior's variance the T-step bound of the exact denoiser is above the
    continuous-time bound on the same schedule (VDM sec. 4), which is above the data entropy."""
    code, out, _ = run([*ORACLE, "--likelihood", "bound,continuous", "--continuous-samples", "32",
                        "--json"], capsys)
    assert code == 0
    r = strict(out)
    c = r["continuous"]
    assert c["num_samples"] == r["num_samples"] == 1500 and c["num_u"] == 32
    assert c["nll_nats"] == pytest.approx(c["prior_nats"] + c["decoder_nats"] + c["diffusion_nats"])
    assert c["bits_per_dim"] == pytest.approx(c["nll_nats"] / math.log(2))
    assert c["wall_seconds"] > 0 and r["wall_seconds"] > 0
    se = math.hypot(c["nll_stderr"], r["nll_stderr"])
    assert c["nll_nats"] < r["nll_nats"] + 5 * se
    assert c["nll_nats"] > r["entropy_nats"] - 5 * math.hypot(c["nll_stderr"], r["entropy_stderr"])


def test_the_summary_names_each_estimator(capsys):
    code, out, _ = run([*ORACLE, "--samples", "100", "--likelihood", "continuous"], capsys)
    assert code == 0
    assert "bound on -log p(x)" in out and "continuous-time bound" in out


@pytest.mark.parametrize("extra,message", [
    (["--ode-rtol", "1e-3"], "--ode-rtol applies to --likelihood ode"),
    (["--ode-probes", "2", "--likelihood", "continuous"], "--ode-probes applies to --likelihood ode"),
    (["--continuous-samples", "4"], "--continuous-samples applies to --likelihood continuous"),
    (["--likelihood", "continuous", "--sampling-timesteps", "10"],
     "--sampling-timesteps applies to the discrete bound"),
])
def test_options_of_another_estimator_are_refused(extra, message, capsys):
    code, _, err = run([*ORACLE, *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["foo", "bound,bound", "", "ode,exact"])
def test_unknown_likelihoods_are_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*ORACLE, "--likelihood", value])
    assert e.value.code == 2
    assert "choose from bound, continuous, ode" in capsys.readouterr().err or value == "bound,bound"


@pytest.mark.parametrize("value", ["0", "-1e-3", "nan", "inf"])
def test_ode_tolerances_must_be_positive_and_finite(value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*ORACLE, "--likelihood", "ode", "--ode-rtol", value])
    assert e.value.code == 2


def test_a_network_with_a_table_of_steps_has_no_continuous_time(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "mixture1d", "--iterations", "2", "--timesteps", "10",
                 "--embedding", "onehot", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = run(["evaluate", "--checkpoint", str(out), "--samples", "20",
                        "--likelihood", "continuous", "--no-progress"], capsys)
    assert code == 2 and "sinusoidal" in err


def test_compare_puts_the_estimators_side_by_side(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", "mixture1d", "--objectives", "elbo,continuous", "--variances",
            "fixed_small", "--seeds", "1", "--iterations", "20", "--timesteps", "20",
            "--eval-samples", "50", "--metric-samples", "0", "--no-figures", "--jobs", "1",
            "--out", str(out)]
    assert main(argv) == 0
    doc = strict((out / "results.json").read_text())
    assert all("continuous" not in r["eval"] for r in doc["runs"])
    capsys.readouterr()
    # resumed with more estimators: the runs are not retrained, and evaluated again
    assert main(argv + ["--resume", "--likelihood", "continuous,ode"]) == 0
    table = capsys.readouterr().out
    assert "continuous bound (nats)" in table and "ODE NLL (nats)" in table
    doc = strict((out / "results.json").read_text())
    for r in doc["runs"]:
        assert r["eval"]["continuous"]["num_samples"] == 50 and r["eval"]["ode"]["num_samples"] == 50
        assert r.get("trained_steps") == 0  # resumed at its last checkpoint
    row = doc["summary"][0]
    assert row["ode_nll_nats"] == pytest.approx(doc["runs"][0]["eval"]["ode"]["nll_nats"])
