"""The user-level section from a run directory, without a simulation: a final model whose
change holds the canaries' directions shows them; a run without canaries has no section."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrnn.client.empirical.user_level import user_level_section
from fedrnn.server.records import RunRecord
from fedrnn.shared import canary_clients as cc
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import resolve
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.models import build_model
from fedrnn.shared.run_records import PrivacySummary, UserLevelSummary

CONFIG = RunConfig(dataset="synthetic", hidden_size=8, dp_level="user", canary_clients=6,
                   clients=3, seed=2)


def _run(tmp_path, *, planted: float, canaries: bool = True):
    config = resolve(CONFIG.replace(out=str(tmp_path)))
    torch.manual_seed(0)
    initial = build_model(config).state_dict()
    dim = cc.dimension({k: v.numpy() for k, v in initial.items()})
    change = np.random.default_rng(0).normal(0, 0.01, dim)  # the sites' updates and noise
    for i in range(config.canary_clients):
        change += planted * cc.direction(seed=2, index=i, dim=dim)
    final, start = {}, 0
    for name in cc.float_names(initial):
        n = initial[name].numel()
        final[name] = initial[name] + torch.from_numpy(
            change[start:start + n].reshape(initial[name].shape)).float()
        start += n
    record = RunRecord(tmp_path, config)
    record.finish(final, privacy=PrivacySummary(
        level="user", epsilon_max=float("inf"), delta=1e-5, accountant="rdp",
        epsilon_target=None, noise_multiplier=None, clip_norm=None, budget_epsilon=None,
        budget_delta=None, sites_out_of_budget=0, ledger_dir=None,
        user_level=UserLevelSummary(epsilon=4.0, delta=1e-5, accountant="rdp",
                                    noise_multiplier=1.0, clip_norm=1.0)))
    if canaries:
        cc.write_record(tmp_path, seed=2, clients=3, canaries=config.canary_clients,
                        user_clip_norm=1.0, initial=initial)
    return tmp_path


def test_planted_directions_show_and_absent_ones_do_not(tmp_path):
    shown = user_level_section(_run(tmp_path / "a", planted=0.2), unseen=200)
    assert shown["canary_clients"] == 6 and shown["unseen"] == 200
    assert shown["epsilon_accounted"] == 4.0 and shown["delta"] == 1e-5
    assert min(shown["cosines"]["inserted"]) > 0.1 > abs(shown["cosines"]["unseen"]["mean"])
    assert shown["epsilon_estimate"] > 50
    hidden = user_level_section(_run(tmp_path / "b", planted=0.0), unseen=200)
    assert hidden["epsilon_interval_95"][0] < 1 < shown["epsilon_interval_95"][0]


def test_no_canaries_no_section_and_a_missing_start_is_one_error(tmp_path):
    assert user_level_section(_run(tmp_path / "none", planted=0.0, canaries=False)) is None
    run = _run(tmp_path / "cut", planted=0.0)
    (run / cc.AUDIT_DIR / cc.INITIAL_MODEL).unlink()
    with pytest.raises(FedrnnError, match="initial weights"):
        user_level_section(run)
