"""The run directory's model: model.pt with its card, model.json, beside it."""

from __future__ import annotations

import json

import torch

from fedrnn.server.records import RunRecord
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import resolve
from fedrnn.shared.model_card import load_model
from fedrnn.shared.models import build_model
from fedrnn.shared.run_records import PrivacySummary


def _privacy(ledger_dir: str | None) -> PrivacySummary:
    return PrivacySummary(level="record", epsilon_max=2.0, delta=1e-5, accountant="rdp",
                          epsilon_target=8.0, noise_multiplier=None, clip_norm=1.0,
                          budget_epsilon=8.0, budget_delta=1e-5, sites_out_of_budget=0,
                          ledger_dir=ledger_dir, user_level=None)


def _finish(out, config: RunConfig, ledger_dir: str | None) -> dict:
    config = resolve(config.replace(out=str(out)))
    model = build_model(config)
    RunRecord(out, config).finish(model.state_dict(), _privacy(ledger_dir))
    card, loaded = load_model(out)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    return json.loads((out / "model.json").read_text())


def test_a_simulated_run_on_built_in_data_records_its_public_normalisation(tmp_path):
    config = RunConfig(dataset="synthetic", task="forecast", clients=2, hidden_size=4)
    card = _finish(tmp_path, config, ledger_dir=str(tmp_path / "ledgers"))
    assert card["task"] == "forecast" and card["features"] == ["sin", "cos"]
    assert card["normalisation"]["source"] == "reference"
    assert card["normalisation"]["values"]["sin"] == {"mean": 0.0, "std": 1.0}
    assert card["privacy"]["epsilon_spent"] == 2.0 and card["privacy"]["epsilon_target"] == 8.0


def test_sites_that_standardise_their_own_records_are_recorded_as_site(tmp_path, series_csv):
    own_file = RunConfig(data=str(series_csv), task="forecast", hidden_size=4)
    assert _finish(tmp_path / "file", own_file, str(tmp_path))["normalisation"] == {
        "source": "site", "values": None}
    # deployed (the server holds no ledger): each site standardised its own file, even
    # when a built-in dataset gave the run its schema
    deployed = RunConfig(dataset="synthetic", task="forecast", clients=2, hidden_size=4)
    assert _finish(tmp_path / "deployed", deployed, None)["normalisation"]["source"] == "site"
