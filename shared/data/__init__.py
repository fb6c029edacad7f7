"""Data: reading sources, splitting them into clients, and one client's tensors.

Public surface:
- ``resolve(config)``: check the data against the task; fill ``labels``/``features``;
- ``partition_corpus(config)``: client names and their record indices (simulation);
- ``partition_sizes(config)``: each client's record count; ``partition_notes(config)``: what
  a user should know of the split (clients left out, clients of one record);
- ``client_data(config, partition_id)``: one client's train/eval tensors, cached per process;
- ``split_indices(config, partition_id)``: the corpus indices of that client's train/eval
  records;
- ``site_data(config, path, secret=..., eval_fraction=...)``: a deployed site's train/eval
  tensors from its own file, split by the site's own key;
- ``encode_records(corpus, config, scaling=...)``: every record of a file encoded as
  training encoded it, for using a trained model (``fedrnn predict``);
- ``canary_tensors(config, draw)``, ``text_tensors``: an audited run's canaries and
  secrets encoded as its canary site encoded them (``shared.data.canaries``);
  ``site_records(config, site)``: a simulated site's own training records, nothing planted.

Every client's records carry their keys (``shared.data.identity``): what the ledger
charges, record by record.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.builtin import load_builtin
from fedrnn.shared.data.canaries import (
    CANARY_KEY,
    SECRET_KEY,
    CanaryDraw,
    canary_corpus,
    draw_path,
    read_draw,
    secret_texts,
)
from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.data.identity import held_out, record_keys, seeded_secret
from fedrnn.shared.data.partition import is_holdout_client, left_out_clients, partition
from fedrnn.shared.data.readers import read_file
from fedrnn.shared.data.tensors import SequenceTensors, encode_series, encode_text, local_scaling
from fedrnn.shared.data.tokenizers import make_tokenizer
from fedrnn.shared.errors import ConfigError, DataError
from fedrnn.shared.tasks import get_task

log = logging.getLogger("fedrnn")

__all__ = ["ClientData", "Corpus", "EncodedRecords", "SequenceTensors", "canary_tensors",
           "check_kind", "check_schema", "client_data", "encode_records", "load_corpus",
           "partition_corpus", "partition_notes", "partition_sizes", "planted_tensors",
           "reference_scaling", "resolve", "site_data", "split_indices", "text_tensors"]


def load_corpus(config: RunConfig) -> Corpus:
    """The configured source (``data`` file, else built-in ``dataset``), read once per process."""
    if config.data:
        path = Path(config.data).expanduser().resolve()
        stamp = path.stat().st_mtime_ns if path.exists() else 0
        return _read_cached(str(path), stamp)
    # Only synthetic data depends on these; a real dataset is the same for any of them
    # (and is read once, whatever --clients a sampler or partitioner settles on).
    keys = ("dataset", "task", "clients", "seed") if config.dataset == "synthetic" else ("dataset",)
    source = {k: getattr(config, k) for k in keys}
    return _builtin_cached(RunConfig().replace(**source))


@functools.lru_cache(maxsize=2)
def _read_cached(path: str, _mtime: int) -> Corpus:
    return read_file(path)


@functools.lru_cache(maxsize=2)
def _builtin_cached(config: RunConfig) -> Corpus:
    return load_builtin(config)


def resolve(config: RunConfig) -> RunConfig:
    """Check that the data suits the task and fill in the schema the model is built from.

    ``labels`` and ``features`` describe the schema (class names, column names), which
    every site must share to train one model. In a simulation the researcher holds all
    records, so reading them off the file is the same as fixing them in advance. A
    deployed run on sites' own records (no ``data``, no ``dataset``) has its schema from
    the server's flags alone (``schema_from_flags``).
    """
    if not config.data and not config.dataset:
        return schema_from_flags(config)
    return check_schema(load_corpus(config), config)


def reference_scaling(config: RunConfig) -> dict[str, tuple[float, float]] | None:
    """The public (mean, std) per feature the run's data fixes in advance (a built-in
    dataset's), or None: text, or numeric records each client standardises itself."""
    if not config.data and not config.dataset:
        return None
    return load_corpus(config).scaling


def schema_from_flags(config: RunConfig) -> RunConfig:
    """The schema of a run on records nobody here holds: classes from ``labels``, numeric
    columns from ``features`` (none: text). Each site checks its own file against it."""
    get_task(config.task).check_flags(config)
    return config


def check_schema(corpus: Corpus, config: RunConfig, *, site: bool = False) -> RunConfig:
    """``resolve`` for a corpus already read: check it against the task and the run's schema
    (where the run fixes one) and fill in what the run leaves open.

    ``site``: a deployed site's check of its own file against a server's run. Only the
    file's form is checked (its kind, its columns), never what its records hold: a refusal
    that depended on a record's label would answer a server's question about it for free.
    """
    task = get_task(config.task)
    changes = task.check_corpus(corpus, config, site=site)
    # a site's numeric columns must be the run's, by name and in order, whatever the task:
    # the model reads column i as the run's feature i
    if corpus.kind == "series":
        if not config.features:
            changes["features"] = ",".join(corpus.feature_names)
        else:
            _check_features(corpus, config)
    return config.replace(**changes) if changes else config


def check_kind(corpus: Corpus, config: RunConfig, *, whose: str) -> None:
    """DataError unless ``corpus`` holds the kind of records (text, or numeric sequences
    with the run's feature columns) that ``config`` fixes; ``whose`` names the run."""
    if corpus.kind == "series" and not config.features:
        raise DataError(corpus.source, f"holds numeric sequences, but {whose} is on text "
                                       "(it sets no --features)")
    if corpus.kind == "text" and config.features:
        raise DataError(corpus.source, f"holds text, but {whose} is on numeric sequences "
                                       f"(features {config.features})")
    if corpus.kind == "series":
        _check_features(corpus, config)


def _check_features(corpus: Corpus, config: RunConfig) -> None:
    if tuple(config.feature_names) != corpus.feature_names:
        raise DataError(corpus.source, f"feature columns {', '.join(corpus.feature_names)} "
                                       f"differ from the run's features {config.features}")


def site_data(config: RunConfig, path: str | Path, *, name: str = "", secret: bytes,
              eval_fraction: float) -> ClientData:
    """A deployed site's tensors: every record in its own file is its own (a ``client``
    column, if present, is ignored). Read once per process and reused across rounds.

    The split is the site's: record by record, by ``secret`` (kept in its ledger) and its
    own ``eval_fraction``; nothing the server sends moves a record across it. The run's
    schema comes from the server: a file whose kind, feature columns or labels do not fit
    it is refused with a message naming the file.
    """
    path = Path(path).expanduser().resolve()
    stamp = path.stat().st_mtime_ns if path.exists() else 0
    return _site_data_cached(_data_only(config), str(path), stamp, name or path.stem, secret,
                             eval_fraction)


@functools.lru_cache(maxsize=2)
def _site_data_cached(config: RunConfig, path: str, _mtime: int, name: str, secret: bytes,
                      eval_fraction: float) -> ClientData:
    corpus = _read_cached(path, _mtime)
    check_kind(corpus, config, whose="the server's run")
    config = check_schema(corpus, config, site=True)
    every = np.arange(len(corpus), dtype=np.int64)
    keys = _keys_cached(path, _mtime)
    evaluating = held_out(keys, secret=secret, eval_fraction=eval_fraction)
    if get_task(config.task).uses_labels:
        # records of classes the run does not have take no part (and decline nothing)
        known = np.isin(corpus.labels.astype(str), config.label_names)
        if not known.all():
            log.warning("%s: %d record(s) of classes the run does not have are left out",
                        path, int((~known).sum()))
        every, evaluating = every[known], evaluating[known]
    if len(every) < 2:
        raise DataError(path, f"holds {len(every)} usable record(s); a site needs at least 2 "
                              "(one to train on, one to evaluate)")
    return _client(corpus, config, name, keys, every[~evaluating], every[evaluating])


@functools.lru_cache(maxsize=2)
def _keys_cached(path: str, _mtime: int) -> list[str]:
    return record_keys(_read_cached(path, _mtime))


def partition_corpus(config: RunConfig) -> tuple[list[str], list[np.ndarray]]:
    """Client names and record indices, deterministic in ``config.seed``."""
    return _partition_cached(_data_only(config))


def partition_sizes(config: RunConfig) -> np.ndarray:
    """Each client's record count, in partition order."""
    return np.array([len(p) for p in partition_corpus(config)[1]], dtype=np.int64)


def partition_notes(config: RunConfig) -> tuple[str | None, str | None]:
    """(warning, info) about the split, each one line or None: the natural partition's
    clients left out for holding no usable record, and its clients of one record."""
    corpus = load_corpus(config)
    if config.partitioner not in ("auto", "natural") or corpus.clients is None:
        return None, None
    left_out, total = left_out_clients(corpus)
    warning = (f"{corpus.source}: {left_out} of {total} clients hold no usable record "
               "(only empty texts) and are left out" if left_out else None)
    singles = int((partition_sizes(config) == 1).sum())
    info = (f"{singles} of {total - left_out} clients hold one record: each trains or "
            "evaluates with it, chosen by the seed" if singles else None)
    return warning, info


@functools.lru_cache(maxsize=2)
def _partition_cached(config: RunConfig) -> tuple[list[str], list[np.ndarray]]:
    # Computed once per process: every client of a 15,000-client run reads its slice here.
    return partition(load_corpus(config), config)


@dataclass
class ClientData:
    name: str
    train: SequenceTensors
    eval: SequenceTensors
    # each record's key (shared.data.identity), aligned with train / eval: its ledger entry
    train_keys: list[str]
    eval_keys: list[str]

    def active(self, keys: set[str], part: str = "train") -> SequenceTensors:
        """The records of ``part`` whose key is in ``keys`` (those the ledger lets train)."""
        tensors, own = (self.train, self.train_keys) if part == "train" else (self.eval,
                                                                               self.eval_keys)
        if len(keys) == len(own):
            return tensors
        return tensors.subset(np.array([k in keys for k in own], dtype=bool))


def client_data(config: RunConfig, partition_id: int) -> ClientData:
    """One simulated client's tensors, built once per process and reused across rounds.
    The canary site's training part ends with the canaries its draw includes
    (``shared.data.canaries``); no other client's data holds any."""
    data = _client_data_cached(_data_only(config), partition_id)
    if (config.canaries or config.canary_secrets) and data.name == config.canary_site:
        return _planted_cached(_data_only(config), partition_id, config.out)
    return data


@functools.lru_cache(maxsize=2)
def _planted_cached(config: RunConfig, partition_id: int, out: str) -> ClientData:
    data = _client_data_cached(config, partition_id)
    draw = read_draw(out)
    if draw is None or draw.site != data.name:
        raise ConfigError(f"{draw_path(out)}: no canary draw for site {data.name} (canaries "
                          "are planted by fedrnn simulate, which writes it)")
    planted = planted_tensors(config, draw)
    keys = [f"{CANARY_KEY}{i}" for i, inside in enumerate(draw.included) if inside]
    keys += [f"{SECRET_KEY}{k}:{j}" for k in range(draw.secrets) for j in range(draw.repeats)]
    return ClientData(name=data.name, train=concat(data.train, planted), eval=data.eval,
                      train_keys=data.train_keys + keys, eval_keys=data.eval_keys)


def site_records(config: RunConfig, site: str) -> SequenceTensors:
    """Simulated client ``site``'s own training records, without the canaries or secrets
    planted there: the records besides the canaries, which the one-run audit's auditor
    may know (Steinke et al. fix them; only the canaries' inclusion is secret)."""
    names, _ = partition_corpus(config)
    if site not in names:
        raise ConfigError(f"no client named {site!r} in this run's split")
    return _client_data_cached(_data_only(config), names.index(site)).train


def canary_tensors(config: RunConfig, draw: CanaryDraw) -> SequenceTensors:
    """Every one-run canary of ``draw`` (included or not), in order, encoded as the canary
    site encodes its records; labels set where the task has them."""
    corpus = canary_corpus(config, draw, config.label_names)
    every = np.arange(len(corpus), dtype=np.int64)
    if corpus.kind == "text":
        return _encode_text(corpus, config, every)
    n = len(corpus.feature_names)
    return _encode_series(corpus, config, every, np.zeros(n), np.ones(n))


def text_tensors(config: RunConfig, texts: list[str]) -> SequenceTensors:
    """``texts`` encoded as the run's clients encode text records (no labels)."""
    corpus = Corpus(kind="text", source="texts", texts=texts)
    return _encode_text(corpus, config, np.arange(len(texts), dtype=np.int64), labelled=False)


def planted_tensors(config: RunConfig, draw: CanaryDraw) -> SequenceTensors:
    """What the canary site trains on beyond its records: the included canaries, then each
    secret ``repeats`` times."""
    parts = []
    if draw.included:
        parts.append(canary_tensors(config, draw).subset(np.array(draw.included, dtype=bool)))
    if draw.secrets:
        parts.append(text_tensors(config, [t for t in secret_texts(draw)
                                           for _ in range(draw.repeats)]))
    result = parts[0]
    for part in parts[1:]:
        result = concat(result, part)
    return result


def concat(a: SequenceTensors, b: SequenceTensors) -> SequenceTensors:
    """``a``'s records then ``b``'s, padded to one width (padding is 0 in both encodings)."""
    width = max(a.inputs.shape[1], b.inputs.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        extra = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
        return torch.nn.functional.pad(x, extra)

    return SequenceTensors(torch.cat([pad(a.inputs), pad(b.inputs)]),
                           torch.cat([a.lengths, b.lengths]), torch.cat([a.labels, b.labels]))


_DATA_FIELDS = ("dataset", "data", "task", "tokenizer", "vocab_size", "max_len", "labels",
                "features", "partitioner", "dirichlet_alpha", "clients", "eval_fraction", "seed")


def _data_only(config: RunConfig) -> RunConfig:
    """The config with every non-data setting at its default: the cache key of a client's data."""
    return RunConfig().replace(**{k: getattr(config, k) for k in _DATA_FIELDS})


# Bounded: a process holds the tensors of the clients it served last, never of all clients.
@functools.lru_cache(maxsize=256)
def _client_data_cached(config: RunConfig, partition_id: int) -> ClientData:
    names, _ = _partition_cached(config)
    train_idx, eval_idx = split_indices(config, partition_id)
    return _client(load_corpus(config), config, names[partition_id], _corpus_keys(config),
                   train_idx, eval_idx)


def split_indices(config: RunConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Corpus indices of one simulated client's train and eval records: the split every
    simulation trains and evaluates on (and a non-federated reference reproduces)."""
    config = _data_only(config)
    corpus = load_corpus(config)
    _, parts = _partition_cached(config)
    if not 0 <= partition_id < len(parts):
        raise DataError(corpus.source, f"client {partition_id} requested but the data has "
                                       f"{len(parts)} clients")
    part = parts[partition_id]
    if len(part) == 1:  # one record: the whole client trains or evaluates
        evaluating = np.array([is_holdout_client(partition_id, seed=config.seed,
                                                 eval_fraction=config.eval_fraction)])
    else:  # as a deployed site splits, keyed by the run's seed (reproducible)
        keys = _corpus_keys(config)
        evaluating = held_out([keys[i] for i in part], secret=seeded_secret(config.seed),
                              eval_fraction=config.eval_fraction)
    return part[~evaluating], part[evaluating]


@functools.lru_cache(maxsize=2)
def _corpus_keys(config: RunConfig) -> list[str]:
    return record_keys(load_corpus(config))


def _client(corpus: Corpus, config: RunConfig, name: str, keys: list[str],
            train_idx: np.ndarray, eval_idx: np.ndarray) -> ClientData:
    train, evaluation = encode_split(corpus, config, train_idx, eval_idx)
    return ClientData(name=name, train=train, eval=evaluation,
                      train_keys=[keys[i] for i in train_idx],
                      eval_keys=[keys[i] for i in eval_idx])


def encode_split(corpus: Corpus, config: RunConfig, train_idx: np.ndarray,
                 eval_idx: np.ndarray) -> tuple[SequenceTensors, SequenceTensors]:
    """Tensors for a client's train and eval records (scaling from its train part only)."""
    if corpus.kind == "text":
        return (_encode_text(corpus, config, train_idx),
                _encode_text(corpus, config, eval_idx))
    if corpus.scaling is not None:
        mean, std = _fixed_scaling(corpus.scaling, corpus.feature_names)
    else:
        # a held-out single-record client has no training part: its own record
        mean, std = local_scaling([corpus.values[i] for i in (train_idx if len(train_idx)
                                                              else eval_idx)])
    return (_encode_series(corpus, config, train_idx, mean, std),
            _encode_series(corpus, config, eval_idx, mean, std))


@dataclass
class EncodedRecords:
    """Every record of a file as a model's inputs, in the file's order."""

    tensors: SequenceTensors  # labels -1 unless asked for
    # numeric sequences: each record's standardisation [N, F] (mean, std in the file's units)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


def encode_records(corpus: Corpus, config: RunConfig, *,
                   scaling: dict[str, tuple[float, float]] | None,
                   labelled: bool = False) -> EncodedRecords:
    """Every record of ``corpus`` encoded as the run's clients encoded theirs: the same
    tokenizer and truncation; numeric values standardised by ``scaling`` (public values
    fixed in advance), or, with None, by the statistics of each site's own records, as a
    site computes them (``local_scaling``): per ``client`` when the file has that column,
    else over the whole file. ``labelled``: the records' labels as the run's class indices
    (a DataError for a class the run does not have)."""
    every = np.arange(len(corpus), dtype=np.int64)
    if corpus.kind == "text":
        return EncodedRecords(_encode_text(corpus, config, every, labelled=labelled))
    n_features = len(corpus.feature_names)
    mean, std = np.zeros((len(corpus), n_features)), np.ones((len(corpus), n_features))
    if scaling is not None:
        mean[:], std[:] = _fixed_scaling(scaling, corpus.feature_names)
        groups = [every]
    else:
        sites = corpus.clients if corpus.clients is not None else np.zeros(len(corpus))
        groups = [every[sites == site] for site in dict.fromkeys(sites.tolist())]
        for idx in groups:
            mean[idx], std[idx] = local_scaling([corpus.values[i] for i in idx])
    parts = [_encode_series(corpus, config, idx, mean[idx[0]], std[idx[0]], labelled=labelled)
             for idx in groups]
    order = np.argsort(np.concatenate(groups), kind="stable")  # back to the file's order
    width = max(p.inputs.shape[1] for p in parts)
    inputs = torch.cat([torch.nn.functional.pad(p.inputs, (0, 0, 0, width - p.inputs.shape[1]))
                        for p in parts])
    tensors = SequenceTensors(inputs, torch.cat([p.lengths for p in parts]),
                              torch.cat([p.labels for p in parts]))
    return EncodedRecords(tensors.subset(order), mean=mean, std=std)


def _fixed_scaling(scaling: dict[str, tuple[float, float]], names: tuple[str, ...]
                   ) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([scaling[f][0] for f in names]), np.array([scaling[f][1] for f in names]))


def _labels_of(corpus: Corpus, config: RunConfig, idx: np.ndarray, *, labelled: bool
               ) -> torch.Tensor:
    if not labelled:
        return torch.full((len(idx),), -1, dtype=torch.long)
    if corpus.labels is None:
        raise DataError(corpus.source, f"task {config.task} needs a 'label' for every record")
    label_index = {name: i for i, name in enumerate(config.label_names)}
    unknown = sorted({corpus.labels[i] for i in idx} - set(label_index))
    if unknown:
        raise DataError(corpus.source, f"label(s) {', '.join(unknown)} are not among the "
                                       f"run's labels {config.labels}")
    return torch.tensor([label_index[corpus.labels[i]] for i in idx], dtype=torch.long)


def _encode_text(corpus: Corpus, config: RunConfig, idx: np.ndarray, *,
                 labelled: bool | None = None) -> SequenceTensors:
    tokenizer = make_tokenizer(config.tokenizer, config.vocab_size)
    tokens, lengths = encode_text([corpus.texts[i] for i in idx], tokenizer, config.max_len)
    if labelled is None:
        labelled = get_task(config.task).uses_labels
    return SequenceTensors(tokens, lengths, _labels_of(corpus, config, idx, labelled=labelled))


def _encode_series(corpus: Corpus, config: RunConfig, idx: np.ndarray, mean: np.ndarray,
                   std: np.ndarray, *, labelled: bool | None = None) -> SequenceTensors:
    inputs, lengths = encode_series([corpus.values[i] for i in idx],
                                    [corpus.times[i] for i in idx],
                                    mean=mean, std=std, max_len=config.max_len)
    if labelled is None:
        labelled = get_task(config.task).uses_labels
    return SequenceTensors(inputs, lengths, _labels_of(corpus, config, idx, labelled=labelled))
