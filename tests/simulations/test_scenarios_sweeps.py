"""Scenarios, sweeps and the simulation benchmark, through the real CLI."""

import csv
import json

import pytest
import torch

from fedrnn.shared.cli import build_parser, main
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError
from fedrnn.simulations.bench_simulation import bench_simulation
from fedrnn.simulations.commands import simulation_config
from fedrnn.simulations.scenarios import describe, load_scenario, scenario_names
from fedrnn.simulations.sweep import parse_sweeps


def test_every_scenario_is_a_valid_config():
    names = scenario_names()
    assert {"nafld-hospitals", "nafld-patients", "tweets-messages", "synthetic-classify",
            "synthetic-lm", "synthetic-forecast"} <= set(names)
    assert all(describe()[name] for name in names)
    patients = RunConfig.from_flat(load_scenario("nafld-patients"))
    assert patients.partitioner == "record" and patients.clients_per_round == 100


def test_flags_and_config_file_override_the_scenario(tmp_path):
    parse = build_parser().parse_args
    config = simulation_config(parse(["simulate", "--scenario", "nafld-hospitals"]))
    assert (config.clients, config.partitioner) == (30, "quantity")
    assert simulation_config(parse(["simulate", "--scenario", "nafld-hospitals",
                                    "--clients", "12"])).clients == 12
    file = tmp_path / "c.toml"
    file.write_text("rounds = 4\n")
    config = simulation_config(parse(["simulate", "--scenario", "nafld-hospitals",
                                      "--config", str(file), "--rounds", "5"]))
    assert (config.clients, config.rounds) == (30, 5)


@pytest.mark.parametrize("argv,expected", [
    (["--scenario", "nope"], "unknown scenario 'nope'; scenarios: nafld-hospitals"),
    (["--sweep", "epsilon"], "expected KEY=V1,V2"),
    (["--sweep", "epsilon=1,x"], "epsilon must be a float, not 'x'"),
    (["--sweep", "colour=1,2"], "unknown setting(s): colour"),
    (["--sweep", "out=a,b"], "each variant already gets its own"),
])
def test_bad_scenario_or_sweep_is_one_line(tmp_path, capsys, argv, expected):
    out = tmp_path / "never"
    assert main(["simulate", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedrnn: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_parse_sweeps_checks_every_value():
    assert parse_sweeps(["epsilon=1, 3,inf", "model=gru,lstm"], RunConfig()) == [
        ("epsilon", ["1", "3", "inf"]), ("model", ["gru", "lstm"])]
    with pytest.raises(ConfigError, match="model must be one of"):
        parse_sweeps(["model=gru,transformer"], RunConfig())


@pytest.mark.e2e
def test_sweep_runs_every_variant_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["simulate", "--scenario", "synthetic-classify", "--rounds", "1",
                 "--sweep", "epsilon=2,inf", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["epsilon"] for r in rows] == ["2", "inf"]
    assert 0 < float(rows[0]["epsilon_spent"]) <= 2.0 and rows[1]["epsilon_spent"] == "inf"
    assert all(r["auroc"] and r["loss"] for r in rows)
    assert (out / "epsilon=2" / "summary.json").exists()
    assert (out / "sweep.png").stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["keys"] == ["epsilon"]
    assert "epsilon_spent" in capsys.readouterr().out


@pytest.mark.e2e
def test_bench_simulation_reports_both_runs_and_their_ratio():
    result = bench_simulation({"dataset": "synthetic", "clients": 4, "clients-per-round": 2,
                               "eval-clients-per-round": 2, "rounds": 1,
                               "hidden-size": 8}, repeats=1, progress=lambda _m: None)
    # both runs ran and are what the summary reports (their timings are the machine's)
    assert result["simulation_s"] == result["simulation"]["total_s"]
    assert result["compute_s"] == result["plain"]["total_s"]
    assert result["overhead_ratio"] == pytest.approx(result["simulation_s"]
                                                     / result["compute_s"])
    assert result["ratios"] == [result["overhead_ratio"]]
    assert {"train_s", "total_s"} <= result["plain"].keys()
    assert {"rounds_s", "total_s"} <= result["simulation"].keys()


def test_bench_simulation_alternates_and_reports_the_median_pair(monkeypatch):
    """Pairs run plain first, then simulated; the median pair is reported (the lower one
    of an even count). The two runners are replaced by canned timings: what is tested is
    the order and the choice, which the test above cannot see in one pair."""
    from fedrnn.simulations import bench_simulation as bench

    order, plain_s, sim_s = [], iter([10.0, 10.0, 10.0, 10.0]), iter([15.0, 12.0, 11.0, 13.0])
    monkeypatch.setattr(bench, "run_plain", lambda w, d: order.append("plain")
                        or {"total_s": next(plain_s)})
    monkeypatch.setattr(bench, "run_simulation", lambda w, d: order.append("simulation")
                        or {"total_s": next(sim_s)})
    result = bench.bench_simulation(repeats=4, progress=lambda _m: None)
    assert order == ["plain", "simulation"] * 4
    assert result["ratios"] == [1.5, 1.2, 1.1, 1.3]
    assert result["overhead_ratio"] == 1.2 and result["simulation_s"] == 12.0


def test_the_plain_runs_fedavg_is_flowers():
    # the plain process averages without Flower; it must compute what Flower's FedAvg does
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedrnn.shared import protocol as P
    from fedrnn.simulations.bench_simulation import fedavg

    generator = torch.Generator().manual_seed(0)
    updates = [(n, {"w": torch.randn(4, 3, generator=generator),
                    "b": torch.randn(3, generator=generator)}) for n in (10.0, 30.0, 5.0)]
    flower = aggregate_arrayrecords(
        [RecordDict({P.ARRAYS: ArrayRecord(s), P.METRICS: MetricRecord({P.NUM_EXAMPLES: n})})
         for n, s in updates], P.NUM_EXAMPLES).to_torch_state_dict()
    plain = fedavg(updates)
    assert plain.keys() == flower.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], flower[name])


@pytest.mark.parametrize("workload", [{"strategy": "fedadam"}, {"dp-level": "both"}])
def test_bench_simulation_refuses_what_the_plain_run_cannot_reproduce(workload):
    with pytest.raises(ValueError, match="reproduces FedAvg"):
        bench_simulation(workload, repeats=1, progress=lambda _m: None)
