"""The model card: what model.json holds, and a model directory that works on its own."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.model_card import (
    REFERENCE,
    SITE,
    ModelCard,
    load_model,
    read_card,
    write_model,
)
from fedrnn.shared.models import build_model
from fedrnn.shared.run_records import PrivacySummary, UserLevelSummary


def privacy(**changes) -> PrivacySummary:
    values = dict(level="record", epsilon_max=3.5, delta=1e-5, accountant="rdp",
                  epsilon_target=4.0, noise_multiplier=None, clip_norm=1.0, budget_epsilon=4.0,
                  budget_delta=1e-5, sites_out_of_budget=0, ledger_dir=None, user_level=None)
    return PrivacySummary(**{**values, **changes})


SERIES = RunConfig(task="classify", labels="died,survived", features="age,sbp", model="lstm",
                   hidden_size=8, num_layers=2, dropout=0.1, max_len=12, run_id="r1")
WORDS = RunConfig(dataset="", task="lm", tokenizer="word", vocab_size=50, hidden_size=8,
                  embedding_dim=4, dp=False)


def test_a_series_card_records_schema_normalisation_architecture_and_privacy():
    card = ModelCard.describe(SERIES, privacy(), reference_scaling={
        "age": (50.0, 15.0), "sbp": (130.0, 20.0), "unused": (0.0, 1.0)})
    data = card.to_json()
    assert data["task"] == "classify" and data["labels"] == ["died", "survived"]
    assert data["features"] == ["age", "sbp"] and data["tokenizer"] is None
    assert data["max_len"] == 12 and data["vocab_size"] == 0
    assert data["normalisation"] == {"source": REFERENCE, "values": {
        "age": {"mean": 50.0, "std": 15.0}, "sbp": {"mean": 130.0, "std": 20.0}}}
    assert data["architecture"] == {"model": "lstm", "hidden_size": 8, "num_layers": 2,
                                    "embedding_dim": 32, "nonlinearity": "tanh",
                                    "dropout": 0.1}
    assert data["privacy"]["level"] == "record" and data["privacy"]["epsilon_target"] == 4.0
    assert data["privacy"]["epsilon_spent"] == 3.5 and data["privacy"]["clip_norm"] == 1.0
    assert data["privacy"]["accountant"] == "rdp" and data["privacy"]["delta"] == 1e-5
    assert ModelCard.from_json(json.loads(json.dumps(data))) == card
    site = ModelCard.describe(SERIES, privacy(), reference_scaling=None)
    assert site.to_json()["normalisation"] == {"source": SITE, "values": None}


def test_a_text_card_round_trips_with_an_unbounded_epsilon_and_rebuilds_the_config():
    user = UserLevelSummary(epsilon=2.0, delta=1e-5, accountant="rdp", noise_multiplier=1.1,
                            clip_norm=0.5)
    card = ModelCard.describe(WORDS, privacy(level="user", epsilon_max=math.inf,
                                             epsilon_target=None, clip_norm=None,
                                             user_level=user), reference_scaling=None)
    text = json.dumps(card.to_json())
    assert "Infinity" not in text
    back = ModelCard.from_json(json.loads(text))
    assert back == card and back.privacy.epsilon_spent == math.inf
    assert back.privacy.user_noise_multiplier == 1.1 and back.privacy.user_epsilon == 2.0
    assert back.normalisation is None and back.tokenizer == "word"
    assert back.vocab_size == 54 and back.hash_buckets == 50  # 4 special ids
    config = back.config()
    for name in ("task", "tokenizer", "vocab_size", "max_len", "model", "hidden_size",
                 "num_layers", "embedding_dim"):
        assert getattr(config, name) == getattr(WORDS, name), name


def test_a_directory_with_model_json_and_model_pt_loads_the_same_network(tmp_path):
    card = ModelCard.describe(SERIES, privacy(), reference_scaling=None)
    torch.manual_seed(0)
    trained = build_model(SERIES)
    write_model(tmp_path, card, trained.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]
    loaded_card, model = load_model(tmp_path)
    assert loaded_card == card and not model.training
    x, lengths = torch.randn(3, 5, 5), torch.tensor([5, 2, 1])
    trained.eval()
    with torch.no_grad():
        assert torch.equal(model(x, lengths), trained(x, lengths))


def test_a_directory_that_is_not_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(FedrnnError, match="no model.json"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{\"task\": \"lm\"}")
    with pytest.raises(FedrnnError, match="not a fedrnn model card"):
        read_card(tmp_path)
    card = ModelCard.describe(SERIES, privacy(), reference_scaling=None)
    write_model(tmp_path, card, build_model(SERIES.replace(hidden_size=4)).state_dict())
    with pytest.raises(FedrnnError, match="does not fit the network"):
        load_model(tmp_path)
