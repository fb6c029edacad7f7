"""Splitting a corpus into simulated clients, and each client into train and eval parts.

Partitioners (``--partitioner``):

- ``natural``: one client per distinct value of the ``client`` column (a client of one
  record trains or evaluates with it, as with ``record``; one with no usable record, only
  empty texts, is left out);
- ``record``: one client per record (cross-device: one person, one record);
- ``iid``: records shuffled and dealt into ``clients`` equal parts;
- ``dirichlet``: label skew, each class divided in Dirichlet(``dirichlet-alpha``) shares;
- ``quantity``: size skew, client sizes in Dirichlet(``dirichlet-alpha``) shares.

Why not Flower Datasets' partitioners: they do work offline on an in-memory
``datasets.Dataset`` (checked: flwr-datasets 0.6.1, datasets 4.8.5), but they bring
pyarrow, ``datasets``, ``huggingface_hub``, aiohttp and seaborn (16 packages) into every
site's install, and importing them lengthens every simulation worker's start-up, which
is the overhead this harness is built to remove. The splits below are a few lines of numpy
each over record indices, computed once per process.
"""

from __future__ import annotations

import numpy as np

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.errors import ConfigError, DataError

MIN_RECORDS = 2  # one to train on and one to evaluate, except with one client per record


def partition(corpus: Corpus, config: RunConfig) -> tuple[list[str], list[np.ndarray]]:
    """Client names and the record indices of each client, in a fixed order."""
    mode = config.partitioner
    if mode == "auto":
        mode = "natural" if corpus.clients is not None else "iid"
    rng = np.random.default_rng(config.seed)
    minimum = MIN_RECORDS
    if mode == "natural":
        if corpus.clients is None:
            raise DataError(corpus.source, "the natural partitioner needs a 'client' column; "
                                           "use --partitioner iid, dirichlet or quantity")
        minimum = 1  # real data is long-tailed: many speakers write once
        names_arr, inverse = np.unique(corpus.clients.astype(str), return_inverse=True)
        groups = _groups(inverse, len(names_arr))
        usable = usable_records(corpus)
        keep = [i for i, g in enumerate(groups) if usable[g].any()]
        names = [str(names_arr[i]) for i in keep]
        parts = [groups[i] for i in keep]
    elif mode == "record":
        minimum = 1
        width = len(str(len(corpus) - 1))
        names = [f"record-{i:0{width}d}" for i in range(len(corpus))]
        parts = [np.array([i]) for i in range(len(corpus))]
    elif mode == "iid":
        _check_enough(corpus, config.clients)
        parts = np.array_split(rng.permutation(len(corpus)), config.clients)
        names = [f"site-{i}" for i in range(config.clients)]
    elif mode == "dirichlet":
        if corpus.labels is None:
            raise ConfigError("the dirichlet partitioner skews labels and needs labelled "
                              "records; use --partitioner iid or quantity")
        _check_enough(corpus, config.clients)
        parts = _dirichlet(corpus.labels, config.clients, config.dirichlet_alpha, rng)
        names = [f"site-{i}" for i in range(config.clients)]
    elif mode == "quantity":
        _check_enough(corpus, config.clients)
        parts = _quantity(len(corpus), config.clients, config.dirichlet_alpha, rng)
        names = [f"site-{i}" for i in range(config.clients)]
    else:
        raise ConfigError(f"unknown partitioner {mode!r}")
    for name, part in zip(names, parts, strict=True):
        if len(part) < minimum:
            raise DataError(corpus.source, f"client {name!r} has {len(part)} record(s); every "
                                           f"client needs at least {minimum}")
    return names, [np.sort(p) for p in parts]


def usable_records(corpus: Corpus) -> np.ndarray:
    """Which records a model can learn from: a text with at least one visible character;
    every numeric sequence (the reader refuses empty ones)."""
    if corpus.kind != "text":
        return np.ones(len(corpus), dtype=bool)
    return np.array([bool(t.strip()) for t in corpus.texts], dtype=bool)


def left_out_clients(corpus: Corpus) -> tuple[int, int]:
    """(clients of the ``client`` column the natural partitioner leaves out for holding no
    usable record, clients in the column)."""
    if corpus.clients is None:
        return 0, 0
    names = np.unique(corpus.clients.astype(str))
    usable = np.unique(corpus.clients.astype(str)[usable_records(corpus)])
    return len(names) - len(usable), len(names)


def phase_roles(sizes: np.ndarray, *, seed: int, eval_fraction: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(can train, can evaluate): a boolean per client, from each client's record count.

    A client of one record either trains or evaluates with it (``is_holdout_client``);
    a larger one does both. A pure function of its arguments, so the server's sampler
    never offers a client a phase it holds no record for.
    """
    single = np.asarray(sizes) == 1
    holdout = np.array([bool(one) and is_holdout_client(i, seed=seed,
                                                        eval_fraction=eval_fraction)
                        for i, one in enumerate(single)], dtype=bool)
    return ~holdout, ~single | holdout


def _groups(inverse: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Indices of each group id in ``inverse``: one sort, not one scan per group."""
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=n_groups))[:-1]
    return np.split(order, bounds)


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


def _quantity(n: int, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Size skew: every client gets MIN_RECORDS, the rest is dealt in Dirichlet(alpha) shares."""
    spare = n - MIN_RECORDS * clients
    shares = rng.dirichlet(np.full(clients, alpha))
    extra = np.floor(shares * spare).astype(int)
    extra[: spare - extra.sum()] += 1  # the rounding remainder, one record each
    sizes = extra + MIN_RECORDS
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def is_holdout_client(partition_id: int, *, seed: int, eval_fraction: float) -> bool:
    """With one record per client, whether this client's record is held out for evaluation.

    A single record cannot be split, so whole clients are held out instead: a client
    either trains or evaluates. A pure function of its arguments, so the server samples
    training and evaluation clients without seeing any data.
    """
    return bool(np.random.default_rng([seed, partition_id, 1]).random() < eval_fraction)
