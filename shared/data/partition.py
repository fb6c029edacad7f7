"""Splitting a corpus into simulated clients, and each client into train and eval parts.

Flower Datasets' partitioners (flwr-datasets) operate on Hugging Face ``datasets``
objects; that package and its hub are not part of this project's dependencies, and the
three splits below are a few lines of numpy each over record indices.
"""

from __future__ import annotations

import numpy as np

from shared.config import RunConfig
from shared.data.corpus import Corpus
from shared.errors import ConfigError, DataError

MIN_RECORDS = 2  # one to train on and one to evaluate


def partition(corpus: Corpus, config: RunConfig) -> tuple[list[str], list[np.ndarray]]:
    """Client names and the record indices of each client, in a fixed order."""
    mode = config.partitioner
    if mode == "auto":
        mode = "natural" if corpus.clients is not None else "iid"
    rng = np.random.default_rng(config.seed)
    if mode == "natural":
        if corpus.clients is None:
            raise DataError(corpus.source, "the natural partitioner needs a 'client' column; "
                                           "use --partitioner iid or dirichlet")
        names = sorted(set(corpus.clients.tolist()))
        parts = [np.flatnonzero(corpus.clients == name) for name in names]
    elif mode == "iid":
        _check_enough(corpus, config.clients)
        parts = np.array_split(rng.permutation(len(corpus)), config.clients)
        names = [f"site-{i}" for i in range(config.clients)]
    elif mode == "dirichlet":
        if corpus.labels is None:
            raise ConfigError("the dirichlet partitioner skews labels and needs labelled "
                              "records; use --partitioner iid")
        _check_enough(corpus, config.clients)
        parts = _dirichlet(corpus.labels, config.clients, config.dirichlet_alpha, rng)
        names = [f"site-{i}" for i in range(config.clients)]
    else:
        raise ConfigError(f"unknown partitioner {mode!r}")
    for name, part in zip(names, parts, strict=True):
        if len(part) < MIN_RECORDS:
            raise DataError(corpus.source, f"client {name!r} has {len(part)} record(s); every "
                                           f"client needs at least {MIN_RECORDS}")
    return names, [np.sort(p) for p in parts]


def _check_enough(corpus: Corpus, clients: int) -> None:
    if len(corpus) < MIN_RECORDS * clients:
        raise DataError(corpus.source, f"{len(corpus)} records cannot make {clients} clients "
                                       f"of at least {MIN_RECORDS}; use fewer --clients")


def _dirichlet(labels: np.ndarray, clients: int, alpha: float,
               rng: np.random.Generator, tries: int = 100) -> list[np.ndarray]:
    """Label skew: each class is divided among clients in Dirichlet(alpha) proportions."""
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_RECORDS:
            return [np.array(p, dtype=int) for p in parts]
    raise DataError("dirichlet partitioner", f"could not give each of {clients} clients at "
                                             f"least {MIN_RECORDS} records with alpha={alpha}; "
                                             "raise --dirichlet-alpha or lower --clients")


def train_eval_split(indices: np.ndarray, *, eval_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own split of its records: at least one record on each side."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    n_eval = min(max(1, round(eval_fraction * len(indices))), len(indices) - 1)
    return np.sort(shuffled[n_eval:]), np.sort(shuffled[:n_eval])
