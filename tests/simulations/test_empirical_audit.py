"""The empirical audit as a privacy researcher runs it: one task, one draw of canaries,
trained without noise and with DP; the no-noise model shows the leak, the DP model's
bound stays below what its ledger accounts, and nothing the server writes holds a canary."""

from __future__ import annotations

import json
import random

import pytest

from fedrnn.shared.cli import main
from fedrnn.shared.data import canaries

SMALL = ["--dataset", "synthetic", "--clients", "2", "--rounds", "8", "--local-epochs", "5",
         "--canaries", "500", "--seed", "3"]


@pytest.mark.e2e
def test_the_no_noise_run_shows_the_leak_and_the_dp_run_stays_below_its_epsilon(
        tmp_path, capsys, monkeypatch):
    # a fixed stand-in for the operating system's entropy: the same draw on every machine
    fixed = random.Random(19)
    monkeypatch.setattr(canaries.secrets, "randbits", lambda bits: fixed.getrandbits(bits))
    found = {}
    same = ["--canary-draw", str(tmp_path / "clipped" / "audit" / "canaries.json")]
    for name, privacy in (("clipped", ["--epsilon", "inf"]), ("dp", ["--epsilon", "2", *same])):
        run = tmp_path / name
        assert main(["simulate", *SMALL, *privacy, "--out", str(run)]) == 0
        capsys.readouterr()
        assert main(["audit", str(run), "--empirical", "--json"]) == 0
        found[name] = json.loads(capsys.readouterr().out)["empirical"]
        draw = json.loads((run / "audit" / "canaries.json").read_text())
        # the canary site's releases, kept for the white-box score: one a round, private
        kept = sorted((run / "audit" / "releases").iterdir())
        assert found[name]["releases"] == len(kept) > 0
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in kept)
        assert (run / "audit" / "releases").stat().st_mode & 0o777 == 0o700
        # nothing the server wrote holds the draw or a planted record
        for path in run.iterdir():
            if path.is_file() and path.suffix in (".json", ".jsonl", ".toml"):
                text = path.read_text()
                assert draw["seed"] not in text and "canary:" not in text, path
    clipped, dp = found["clipped"], found["dp"]
    assert clipped["epsilon_accounted"] == "inf" and clipped["method"] == "one-run"
    assert clipped["canaries"] == 500 and clipped["confidence"] == 0.95
    assert clipped["epsilon_lower_bound"] > 1.0  # the leak, seen (1.71 on this draw)
    assert 0 < dp["epsilon_accounted"] <= 2.0 + 1e-6
    assert dp["epsilon_lower_bound"] < dp["epsilon_accounted"]
    assert dp["delta"] == 1e-5 and dp["site"] == clipped["site"] == "site-0"
    assert (tmp_path / "dp" / "audit" / "canaries.json").read_text() == \
        (tmp_path / "clipped" / "audit" / "canaries.json").read_text()  # the same canaries


@pytest.mark.e2e
def test_secrets_trained_on_without_noise_are_exposed_and_dp_hides_them(
        tmp_path, capsys, monkeypatch):
    fixed = random.Random(23)
    monkeypatch.setattr(canaries.secrets, "randbits", lambda bits: fixed.getrandbits(bits))
    lm = ["--dataset", "synthetic", "--task", "lm", "--clients", "2", "--rounds", "8",
          "--local-epochs", "5", "--canary-secrets", "4", "--canary-repeats", "10",
          "--seed", "3"]
    same = ["--canary-draw", str(tmp_path / "clipped" / "audit" / "canaries.json")]
    found = {}
    for name, privacy in (("clipped", ["--epsilon", "inf"]), ("dp", ["--epsilon", "1", *same])):
        run = tmp_path / name
        assert main(["simulate", *lm, *privacy, "--out", str(run)]) == 0
        capsys.readouterr()
        assert main(["audit", str(run), "--empirical", "--json"]) == 0
        found[name] = json.loads(capsys.readouterr().out)["empirical"]["exposure"]
        for path in run.iterdir():  # no secret in anything the server wrote
            if path.is_file() and path.suffix in (".json", ".jsonl", ".toml"):
                assert "my code is" not in path.read_text(), path
    clipped, dp = found["clipped"], found["dp"]
    assert clipped["method"] == "secret-sharer" and clipped["repeats"] == 10
    assert [s["secret"] for s in clipped["secrets"]] == [s["secret"] for s in dp["secrets"]]
    assert len(clipped["secrets"]) == 4 and clipped["space"] == 10 ** 6
    # memorised: each secret likelier than (almost) every sampled candidate
    assert clipped["max_exposure"] > 15
    assert dp["max_exposure"] < clipped["max_exposure"] - 5


def test_a_reused_draw_plants_the_same_canaries_and_a_mismatch_is_refused(tmp_path):
    from fedrnn.shared.config import RunConfig
    from fedrnn.shared.errors import ConfigError
    from fedrnn.simulations.simulate import prepare

    base = RunConfig(dataset="synthetic", clients=3, canaries=30)
    first = prepare(base.replace(out=str(tmp_path / "a")))
    draw = tmp_path / "a" / "audit" / "canaries.json"
    assert first.canary_site == "site-0"  # round 1 samples every site: the first trains
    again = prepare(base.replace(out=str(tmp_path / "b"), canary_draw=str(draw)))
    assert (tmp_path / "b" / "audit" / "canaries.json").read_text() == draw.read_text()
    assert again.canary_site == first.canary_site
    with pytest.raises(ConfigError, match="holds 30 canaries"):
        prepare(base.replace(out=str(tmp_path / "c"), canaries=40, canary_draw=str(draw)))
    with pytest.raises(ConfigError, match="not one of the run's sites"):
        prepare(base.replace(out=str(tmp_path / "d"), canary_site="site-9"))


def test_the_run_records_where_its_records_are_by_absolute_path(tmp_path, monkeypatch):
    # the audit reads the canary site's records again, from wherever it is run
    from fedrnn.shared.config import RunConfig
    from fedrnn.simulations.simulate import prepare

    rows = ["client,sequence_id,time,x,label"]
    rows += [f"c{c},{c}-{s},{t},{(s % 2) + 0.1 * t},{'ab'[s % 2]}"
             for c in range(2) for s in range(12) for t in range(3)]
    (tmp_path / "own.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    config = prepare(RunConfig(data="own.csv", task="classify", canaries=10,
                               out=str(tmp_path / "run")))
    assert config.data == str(tmp_path / "own.csv")

