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
    # the same draw for both runs (a fixed stand-in for the operating system's entropy)
    fixed = random.Random(19)
    monkeypatch.setattr(canaries.secrets, "randbits", lambda bits: fixed.getrandbits(bits))
    found = {}
    for name, privacy in (("clipped", ["--epsilon", "inf"]), ("dp", ["--epsilon", "2"])):
        fixed.seed(19)
        run = tmp_path / name
        assert main(["simulate", *SMALL, *privacy, "--out", str(run)]) == 0
        capsys.readouterr()
        assert main(["audit", str(run), "--empirical", "--json"]) == 0
        found[name] = json.loads(capsys.readouterr().out)["empirical"]
        draw = json.loads((run / "audit" / "canaries.json").read_text())
        # nothing the server wrote holds the draw or a planted record
        for path in run.iterdir():
            if path.is_file() and path.suffix in (".json", ".jsonl", ".toml"):
                text = path.read_text()
                assert draw["seed"] not in text and "canary:" not in text, path
    clipped, dp = found["clipped"], found["dp"]
    assert clipped["epsilon_accounted"] == "inf" and clipped["method"] == "one-run"
    assert clipped["canaries"] == 500 and clipped["confidence"] == 0.95
    assert clipped["epsilon_lower_bound"] > 0.5  # the leak, seen
    assert 0 < dp["epsilon_accounted"] <= 2.0 + 1e-6
    assert dp["epsilon_lower_bound"] < dp["epsilon_accounted"]
    assert dp["delta"] == 1e-5 and dp["site"] == clipped["site"] == "site-0"
