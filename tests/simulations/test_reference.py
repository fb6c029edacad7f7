"""`fedrnn bench reference`: a non-federated classifier on exactly a simulation's split."""

import json

import numpy as np
import pytest

from fedrnn.shared.cli import main
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import client_data, load_corpus, partition_corpus, resolve
from fedrnn.shared.data.identity import record_keys
from fedrnn.shared.errors import ConfigError
from fedrnn.simulations.reference import (
    _weighted_auroc,
    reference,
    simulation_split,
    summary_features,
)


def _synthetic(**changes) -> RunConfig:
    return resolve(RunConfig(dataset="synthetic", task="classify", clients=6).replace(**changes))


@pytest.mark.parametrize("partitioner", ["iid", "record", "dirichlet"])
def test_split_is_the_simulations_split(partitioner):
    """The reference tests on the very records each simulated client evaluates on, and
    trains on the very records they train on: every record on one side, once."""
    config = _synthetic(partitioner=partitioner, seed=3)
    split = simulation_split(config)
    keys = record_keys(load_corpus(config))
    names, _ = partition_corpus(config)
    run_eval, run_train, run_client = [], [], []
    for pid in range(len(names)):
        data = client_data(config, pid)
        run_eval += data.eval_keys
        run_train += data.train_keys
        run_client += [pid] * len(data.eval_keys)
    assert [keys[i] for i in split.test] == run_eval
    assert [keys[i] for i in split.train] == run_train
    assert split.test_client.tolist() == run_client
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(len(keys)))


def test_split_follows_the_seed():
    a, b = simulation_split(_synthetic(seed=0)), simulation_split(_synthetic(seed=1))
    assert a.test.tolist() != b.test.tolist()


def test_beats_chance_on_learnable_data():
    """Synthetic classes differ in the mean of one feature: the summaries carry it."""
    result = reference(_synthetic(clients=10))
    assert result.test_records > 20
    assert result.auroc > 0.85 and result.auroc_by_client > 0.85
    assert result.accuracy > 0.7


def test_chance_when_labels_carry_nothing(tmp_path):
    """Labels drawn independently of the values: no AUROC far from 0.5 (a leak of the
    test labels into the fit would show here)."""
    rng = np.random.default_rng(0)
    lines = ["sequence_id,time,x,y,label"]
    for seq in range(400):
        label = "a" if rng.random() < 0.5 else "b"
        for t in range(int(rng.integers(2, 6))):
            lines.append(f"s{seq},{t},{rng.normal():.4f},{rng.normal():.4f},{label}")
    path = tmp_path / "noise.csv"
    path.write_text("\n".join(lines) + "\n")
    result = reference(RunConfig(data=str(path), task="classify", clients=4))
    assert 0.35 < result.auroc < 0.65


def test_summaries_of_a_record():
    from fedrnn.shared.data.corpus import Corpus

    nan = np.nan
    corpus = Corpus(kind="series", source="t", feature_names=("a", "b"),
                    values=[np.array([[1.0, nan], [3.0, nan], [nan, nan]])],
                    times=[np.array([0.0, 2.0, 5.0])], labels=np.array(["x"], dtype=object))
    row = summary_features(corpus, np.array([0]), max_len=48)[0]
    # last a, last b (never seen), mean a, mean b, log1p counts, log1p steps, span
    np.testing.assert_allclose(row[[0, 2, 4, 5, 6, 7]],
                               [3.0, 2.0, np.log1p(2), 0.0, np.log1p(3), 5.0])
    assert np.isnan(row[1]) and np.isnan(row[3])
    # only the most recent max-len steps are read, as the recurrent model reads them
    short = summary_features(corpus, np.array([0]), max_len=2)[0]
    np.testing.assert_allclose(short[[0, 2, 4, 6, 7]], [3.0, 3.0, np.log1p(1), np.log1p(2), 3.0])


def test_auroc_by_client_as_a_run_reports_it():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.4, 0.5])
    labels = np.array([0, 1, 1, 0, 0, 1, 1])
    clients = np.array([0, 0, 1, 1, 1, 2, 2])  # client 2 has one class: no AUROC
    # client 0 ranks its positive first (1.0, 2 records), client 1 last (0.0, 3 records);
    # pooled, these scores would rank otherwise
    assert _weighted_auroc(scores, labels, clients) == pytest.approx((1.0 * 2 + 0.0 * 3) / 5)


def test_command_prints_json(capsys):
    assert main(["bench", "reference", "--dataset", "synthetic", "--clients", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["clients"] == 6 and 0.0 <= row["auroc"] <= 1.0
    assert set(row) == {"clients", "train_records", "test_records", "accuracy",
                        "majority_accuracy", "loss", "auroc", "auroc_by_client"}


def test_messages_by_their_tokens(tmp_path):
    """Text: the label is in the words (the majority guess is the baseline to beat)."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(300):
        label = "pos" if rng.random() < 0.6 else "neg"
        word = ("good", "fine") if label == "pos" else ("bad", "poor")
        rows.append(json.dumps({"text": f"visit {i} was {word[i % 2]} today", "label": label}))
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(rows) + "\n")
    result = reference(RunConfig(data=str(path), task="classify", clients=3))
    assert result.accuracy > 0.95 > result.majority_accuracy > 0.4
    assert result.auroc > 0.95


def test_refuses_other_tasks(capsys, text_jsonl):
    assert main(["bench", "reference", "--data", str(text_jsonl), "--task", "lm"]) == 2
    err = capsys.readouterr().err
    assert "needs --task classify" in err and "Traceback" not in err
    with pytest.raises(ConfigError):
        reference(RunConfig(task="lm"))
