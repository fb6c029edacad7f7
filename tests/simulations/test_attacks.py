"""Hostile simulated sites (``--attack``): a robust strategy bounds what a scaled update does
to the model where FedAvg does not. (Malformed updates are rejected:
tests/server/test_server_trust.py for each kind, tests/client/test_hostile_server.py on a
real deployment.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrnn.client.attacks import craft, is_attacker
from fedrnn.shared.cli import main

# 10 sites, a fifth of them hostile: with seed 0 rounds 1-3 have 1, 2 and 1 attackers,
# always a minority (checked below), which is what a median can withstand
COMMON = ["simulate", "--dataset", "synthetic", "--clients", "10", "--rounds", "3",
          "--hidden-size", "8", "--batch-size", "16", "--attack-rate", "0.2", "--seed", "0"]


def _attackers(server_round: int) -> list[int]:
    return [p for p in range(10)
            if is_attacker(seed=0, server_round=server_round, partition_id=p, rate=0.2)]


def test_crafted_updates():
    g = {"w": np.zeros((2, 2), dtype=np.float32)}
    t = {"w": np.ones((2, 2), dtype=np.float32)}
    assert np.isnan(craft("nan", g, t, 10)["w"]).all()
    assert craft("shape", g, t, 10)["w"].shape == (1,)
    assert (craft("scale", g, t, 10)["w"] == 10).all()
    assert (craft("sign-flip", g, t, 10)["w"] == -10).all()


def _norm(out) -> float:
    state = torch.load(out / "model.pt")
    return float(torch.sqrt(sum((v.float() ** 2).sum() for v in state.values())))


@pytest.mark.e2e
@pytest.mark.parametrize("attack", ["scale"])
def test_a_median_bounds_a_scaled_update_where_the_mean_follows_it(tmp_path, attack):
    assert all(len(_attackers(r)) < 5 for r in (1, 2, 3))
    norms = {}
    for strategy in ("fedavg", "fedmedian"):
        out = tmp_path / strategy
        assert main([*COMMON, "--attack", attack, "--attack-scale", "1000", "--strategy",
                     strategy, "--out", str(out)]) == 0
        norms[strategy] = _norm(out)
    # the initial model's norm is about 4; one attacker per round x1000 drags the mean
    assert norms["fedavg"] > 5 * norms["fedmedian"]
    assert norms["fedmedian"] < 8
