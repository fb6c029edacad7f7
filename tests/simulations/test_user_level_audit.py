"""End to end: canary clients in a simulation (Ray), and the user-level empirical audit."""

from __future__ import annotations

import json

import pytest
from conftest import releases_by_site

from fedrnn.shared.cli import main

SMALL = ["simulate", "--dataset", "synthetic", "--task", "classify", "--rounds", "2",
         "--clients", "3", "--hidden-size", "8", "--batch-size", "16", "--seed", "3",
         "--canary-clients", "4"]


def _audit(run, capsys) -> dict:
    capsys.readouterr()
    assert main(["audit", str(run), "--empirical", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["empirical"]["user_level"]


@pytest.mark.e2e
def test_the_estimate_sees_a_noise_free_run_and_stays_low_with_dp(tmp_path, capsys):
    private, open_ = tmp_path / "dp", tmp_path / "no-noise"
    # both levels: the sites' DP-SGD charges their ledgers, the canaries charge nothing
    assert main([*SMALL, "--dp-level", "both", "--epsilon", "8",
                 "--user-noise-multiplier", "2", "--out", str(private)]) == 0
    assert main([*SMALL, "--dp-level", "user", "--user-noise-multiplier", "0.01",
                 "--out", str(open_)]) == 0
    assert sorted(releases_by_site(private / "ledgers")) == ["site-0", "site-1", "site-2"]
    rows = [json.loads(line) for line in (private / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [3, 3]  # the sites, not the 4 canaries

    dp, free = _audit(private, capsys), _audit(open_, capsys)
    for section in (dp, free):
        assert section["method"] == "one-shot (Andrew et al. 2023)"
        assert section["canary_clients"] == 4 and len(section["cosines"]["inserted"]) == 4
        assert section["unseen"] == section["cosines"]["unseen"]["count"] == 1000
    # an estimate from four canaries: near the accounted epsilon, not certainly below it
    low, high = dp["epsilon_interval_95"]
    assert low < dp["epsilon_accounted"] < 2 * high
    assert free["epsilon_estimate"] > 10 * dp["epsilon_estimate"]
    assert free["epsilon_estimate"] > 20


def test_a_round_may_sample_sites_and_canaries_together(tmp_path):
    from fedrnn.shared.config import RunConfig
    from fedrnn.shared.errors import ConfigError
    from fedrnn.simulations.simulate import prepare

    config = RunConfig(dataset="synthetic", clients=3, dp_level="user", canary_clients=4,
                       clients_per_round=6, eval_clients_per_round=2, out=str(tmp_path / "r"))
    assert prepare(config).clients_per_round == 6  # of 3 sites and 4 canaries
    with pytest.raises(ConfigError, match="exceeds the 7 clients"):
        prepare(config.replace(clients_per_round=8))
    with pytest.raises(ConfigError, match="evaluate"):  # canaries never evaluate
        prepare(config.replace(eval_clients_per_round=0))
