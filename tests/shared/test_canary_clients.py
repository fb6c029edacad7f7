"""Canary clients' directions and updates, and what the run directory keeps of them."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch

from fedrnn.shared import canary_clients as cc
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError

STATE = {"w": np.ones((4, 3), dtype=np.float32), "steps": np.array([7], dtype=np.int64),
         "b": np.zeros(3, dtype=np.float32)}


def test_directions_are_unit_seeded_and_distinct():
    a = cc.direction(seed=1, index=0, dim=15)
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert np.array_equal(a, cc.direction(seed=1, index=0, dim=15))
    assert not np.allclose(a, cc.direction(seed=1, index=1, dim=15))
    assert not np.allclose(a, cc.direction(seed=2, index=0, dim=15))


def test_a_canary_update_is_its_direction_above_the_clip_on_float_weights_only():
    weights = cc.canary_weights(STATE, seed=3, index=2, user_clip_norm=0.5)
    assert np.array_equal(weights["steps"], STATE["steps"])  # no direction in integers
    update = cc.flatten(weights) - cc.flatten(STATE)
    assert np.linalg.norm(update) == pytest.approx(cc.CANARY_NORM_FACTOR * 0.5, rel=1e-5)
    assert np.allclose(update / np.linalg.norm(update),
                       cc.direction(seed=3, index=2, dim=cc.dimension(STATE)), atol=1e-5)


def test_the_record_keeps_seeds_and_initial_weights_private(tmp_path):
    initial = {k: torch.from_numpy(v) for k, v in STATE.items()}
    cc.write_record(tmp_path, seed=5, clients=4, canaries=2, user_clip_norm=1.0,
                    initial=initial)
    record = cc.read_record(tmp_path)
    assert record["partition_ids"] == [4, 5]
    assert record["direction_keys"] == [[5, cc.DOMAIN, 0], [5, cc.DOMAIN, 1]]
    assert record["dimension"] == 15
    for name in (cc.CANARY_FILE, cc.INITIAL_MODEL):
        assert stat.S_IMODE((tmp_path / cc.AUDIT_DIR / name).stat().st_mode) == 0o600
    saved = torch.load(tmp_path / cc.AUDIT_DIR / cc.INITIAL_MODEL, weights_only=True)
    assert torch.equal(saved["w"], initial["w"])
    assert "vector" not in json.dumps(record)
    assert cc.read_record(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("settings", [
    {},  # record-level DP: no server clipping of whole updates to audit
    {"dp": False, "dp_level": "user"},
    {"dp_level": "user", "canary_clients": -1},
])
def test_canary_clients_need_user_level_dp(settings):
    with pytest.raises(ConfigError, match="canary-clients"):
        RunConfig(**{"canary_clients": 3, **settings})
    assert RunConfig(dp_level="both", canary_clients=3).canary_clients == 3


def test_the_command_refuses_them_without_user_level_dp_in_one_line(capsys):
    from fedrnn.shared.cli import main

    assert main(["simulate", "--canary-clients", "3", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dp-level user or both" in err[0]
