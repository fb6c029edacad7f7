import numpy as np
import pytest
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import (
    client_data,
    partition_corpus,
    partition_notes,
    partition_sizes,
    resolve,
)
from fedrnn.shared.data.builtin import WINDOW_DAYS, load_nafld, load_tweets
from fedrnn.shared.data.partition import phase_roles
from fedrnn.shared.data.tokenizers import BOS, EOS, CharTokenizer, HashWordTokenizer
from fedrnn.shared.errors import DataError


def test_natural_partition_uses_client_column(text_jsonl):
    config = resolve(RunConfig(data=str(text_jsonl)))
    names, parts = partition_corpus(config)
    assert names == ["clinic-0", "clinic-1", "clinic-2"]
    assert sum(len(p) for p in parts) == 30
    assert config.labels == "neg,pos"


def test_iid_and_dirichlet_partitions_cover_every_record_once():
    for partitioner in ("iid", "dirichlet", "quantity", "record"):
        config = RunConfig(dataset="synthetic", clients=5, partitioner=partitioner,
                           dirichlet_alpha=0.3)
        _, parts = partition_corpus(config)
        everything = np.concatenate(parts)
        assert len(everything) == len(set(everything.tolist())) == 150
        assert min(len(p) for p in parts) >= (1 if partitioner == "record" else 2)


def test_dirichlet_skews_labels():
    config = resolve(RunConfig(dataset="synthetic", clients=5, partitioner="dirichlet",
                               dirichlet_alpha=0.1))
    shares = [client_data(config, i).train.labels.float().mean().item() for i in range(5)]
    assert max(shares) - min(shares) > 0.5  # iid would give about 0.5 everywhere


def test_quantity_skews_sizes_not_labels():
    config = resolve(RunConfig(dataset="synthetic", clients=10, partitioner="quantity",
                               dirichlet_alpha=0.3))
    sizes = sorted(len(p) for p in partition_corpus(config)[1])
    assert sizes[-1] > 5 * sizes[0]  # iid would give 30 each
    iid = partition_corpus(config.replace(partitioner="iid"))[1]
    assert {len(p) for p in iid} == {30}


def test_record_partitioner_one_client_per_record_trains_or_evaluates(text_jsonl):
    config = resolve(RunConfig(data=str(text_jsonl), partitioner="record"))
    names, parts = partition_corpus(config)
    assert len(names) == 30 and names[0] == "record-00" and all(len(p) == 1 for p in parts)
    roles = [(len(client_data(config, i).train), len(client_data(config, i).eval))
             for i in range(30)]
    assert set(roles) == {(1, 0), (0, 1)}  # a single record is never split
    first = client_data(config, 0)
    assert first.train.inputs.shape[0] + first.eval.inputs.shape[0] == 1


def test_natural_partition_of_many_clients_is_fast_and_exact(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(f'{{"client": "c{i % 5000}", "text": "m {i}"}}\n'
                            for i in range(10_000)))
    names, parts = partition_corpus(RunConfig(data=str(path), task="lm"))
    assert len(names) == 5000 and all(len(p) == 2 for p in parts)
    assert names[:2] == ["c0", "c1"] and parts[0].tolist() == [0, 5000]


def test_too_many_clients_is_a_clear_error(text_jsonl):
    with pytest.raises(DataError, match="use fewer --clients"):
        partition_corpus(RunConfig(data=str(text_jsonl), partitioner="iid", clients=20))


def test_client_split_and_tensors(series_csv):
    config = resolve(RunConfig(data=str(series_csv), task="classify"))
    data = client_data(config, 0)
    assert data.name == "ward-0"
    n_train, n_eval = len(data.train), len(data.eval)
    assert n_train + n_eval == 12 and n_eval >= 1
    inputs = data.train.inputs
    assert inputs.shape[2] == 2 * 2 + 1  # values, observed flags, gap
    # missing temperatures are zero with observed flag 0
    flags = inputs[:, :, 3]
    valid = torch.arange(inputs.shape[1])[None, :] < data.train.lengths[:, None]
    assert (flags[valid] == 0).any() and (inputs[:, :, 1][flags == 0] == 0).all()
    assert set(data.train.labels.tolist()) <= {0, 1}


def test_text_tensors_truncate_records_not_split_them(text_jsonl):
    config = resolve(RunConfig(data=str(text_jsonl), task="lm", max_len=10))
    data = client_data(config, 0)
    assert data.train.inputs.shape[1] == 11  # max_len inputs + 1 target
    assert (data.train.inputs[:, 0] == BOS).all()
    assert len(data.train) + len(data.eval) == 10  # one record per message


def test_tokenizers_are_fixed_and_data_independent():
    char = CharTokenizer()
    assert char.decode(char.encode("Hi there!")) == "Hi there!"
    word = HashWordTokenizer(64)
    assert word.encode("Fever, fever") == word.encode("fever , FEVER")
    assert all(4 <= i < word.vocab_size for i in word.encode("any words at all"))
    assert EOS not in char.encode("text")


def test_task_mismatch_messages(text_jsonl, series_csv):
    with pytest.raises(DataError, match="task forecast needs numeric sequences"):
        resolve(RunConfig(data=str(text_jsonl), task="forecast"))
    with pytest.raises(DataError, match="task lm needs text"):
        resolve(RunConfig(data=str(series_csv), task="lm"))


def test_nafld_window_keeps_follow_up_out_of_the_input():
    corpus = load_nafld(RunConfig())
    assert corpus.kind == "series" and len(corpus) > 15_000
    assert max(t.max() for t in corpus.times) <= WINDOW_DAYS
    assert min(t.min() for t in corpus.times) >= -WINDOW_DAYS
    assert corpus.label_set == ["died", "survived"]
    died = (corpus.labels == "died").mean()
    assert 0.03 < died < 0.12


def test_tweets_are_messages_labelled_by_app():
    corpus = load_tweets(RunConfig())
    assert corpus.kind == "text" and len(corpus) == 20_761
    assert corpus.label_set == ["android", "iphone", "other", "web"]
    assert corpus.clients is None  # split by --partitioner


def test_natural_partition_keeps_one_record_clients_each_in_one_role(long_tailed_jsonl):
    config = resolve(RunConfig(data=str(long_tailed_jsonl), task="lm"))
    names, parts = partition_corpus(config)
    assert len(names) == 43 and not any(n.startswith("silent") for n in names)
    sizes = partition_sizes(config)
    assert (sizes == 1).sum() == 40 and sizes.sum() == 70
    trains, evaluates = phase_roles(sizes, seed=config.seed,
                                    eval_fraction=config.eval_fraction)
    for i, name in enumerate(names):
        data = client_data(config, i)
        if name.startswith("once"):  # a single record is never split: one role
            assert (len(data.train), len(data.eval)) in {(1, 0), (0, 1)}
            assert (trains[i], evaluates[i]) == (len(data.train) == 1, len(data.eval) == 1)
        else:
            assert trains[i] and evaluates[i]
    assert trains.sum() > 3 and evaluates.sum() > 3  # both roles drawn among the singles
    roles_again = phase_roles(sizes, seed=config.seed, eval_fraction=config.eval_fraction)
    assert (roles_again[0] == trains).all()  # chosen by the seed, the same every time


def test_natural_partition_notes_give_the_counts(long_tailed_jsonl):
    warning, info = partition_notes(resolve(RunConfig(data=str(long_tailed_jsonl), task="lm")))
    assert warning.endswith("2 of 45 clients hold no usable record (only empty texts) and "
                            "are left out")
    assert info.startswith("40 of 43 clients hold one record")
    assert partition_notes(RunConfig(dataset="synthetic", partitioner="iid")) == (None, None)
