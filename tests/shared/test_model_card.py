"""The model card: what model.json holds, and a model directory that works on its own."""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

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


def _saved(tmp_path, change=None):
    """A saved SERIES model whose model.json ``change(data)`` has altered."""
    card = ModelCard.describe(SERIES, privacy(), reference_scaling={"age": (50.0, 15.0),
                                                                    "sbp": (130.0, 20.0)})
    write_model(tmp_path, card, build_model(SERIES).state_dict())
    if change is not None:
        data = json.loads((tmp_path / "model.json").read_text())
        change(data)
        (tmp_path / "model.json").write_text(json.dumps(data))
    return tmp_path


def _set(key, value, within=None):
    def change(data):
        (data[within] if within else data)[key] = value
    return change


@pytest.mark.parametrize("change, problem", [
    (_set("hidden_size", "8", "architecture"), "expected an integer"),
    (_set("bidirectional", True, "architecture"), "unknown architecture field"),
    (_set("max_len", -5), "max-len must be at least 1"),
    (_set("vocab_size", 10**12), "vocab_size"),
    (_set("task", "regress"), "task must be one of"),
    (_set("task", "lm"), "has no labels"),
    (_set("labels", []), "at least two labels"),
    (_set("labels", ["a", "a"]), "distinct"),
    (_set("labels", "died,survived"), "expected a list"),
    (_set("features", ["age"]), "exactly the features"),
    (_set("normalisation", {"source": "bogus"}), "normalisation source"),
    (lambda d: d["normalisation"]["values"]["age"].update(std=0), "stds finite and > 0"),
    (lambda d: d["normalisation"]["values"]["age"].update(mean="nan"), "means must be finite"),
    (_set("delta", "x", "privacy"), "privacy delta must be a number"),
])
def test_a_card_whose_fields_lie_is_refused_with_one_error(tmp_path, change, problem):
    with pytest.raises(FedrnnError, match=problem):
        load_model(_saved(tmp_path, change))


def test_a_card_whose_sizes_lie_is_refused_before_its_network_is_allocated(tmp_path):
    # 10^9 hidden units would need terabytes: the sizes are compared on the meta device
    with pytest.raises(FedrnnError, match="does not fit the network"):
        load_model(_saved(tmp_path, _set("hidden_size", 10**9, "architecture")))
    with pytest.raises(FedrnnError, match=r"does not fit the network.*head\."):
        load_model(_saved(tmp_path, _set("labels", ["a", "b", "c"])))


class _Planted:
    """Unpickling it creates the file ``marker``: proof that a load ran the file's code."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Planted.marker),))


@pytest.mark.parametrize("content", ["pickle", "torch-pickle", "garbage", "empty", "truncated",
                                     "list"])
def test_a_model_pt_that_is_not_weights_is_refused_and_never_unpickled(tmp_path, content):
    _saved(tmp_path)
    _Planted.marker = str(tmp_path / "ran")
    weights = tmp_path / "model.pt"
    buffer = io.BytesIO()
    if content == "pickle":
        data = pickle.dumps(_Planted())
    elif content == "torch-pickle":
        torch.save({"head.weight": _Planted()}, buffer)
        data = buffer.getvalue()
    elif content == "garbage":
        data = b"not a checkpoint"
    elif content == "empty":
        data = b""
    elif content == "truncated":
        data = weights.read_bytes()[:200]
    else:
        torch.save([torch.zeros(2)], buffer)
        data = buffer.getvalue()
    weights.write_bytes(data)
    with pytest.raises(FedrnnError, match="model.pt: (refused|not a)") as caught:
        load_model(tmp_path)
    assert "weights_only" not in str(caught.value)  # never advice to unpickle it
    assert not (tmp_path / "ran").exists()
