"""``fedrnn bench reference``: what "good" is for a classify run.

A non-federated, non-private model on the simulation's own split: logistic regression on
per-record summaries, trained on every client's training records pooled, scored on every
client's evaluation records, the very records ``fedrnn simulate`` evaluates on with the
same data, partition and seed settings (``shared.data.split_indices``). Its AUROC beside a
federated run's says how much of the attainable signal the recurrent model found.

The summaries of a numeric sequence, per feature: the last observed value, the mean of
the observed values and the number of observations (a constant channel such as nafld's
age, sex and BMI gives its value twice and the record's length); plus the record's number
of time steps and its time span. Only the most recent ``max-len`` steps are read, as the
recurrent model reads them. The summary of a message is its bag of tokens (the run's
tokenizer, each token's share of its first ``max-len`` tokens) and its length.
Features are standardised with the training records' mean and standard deviation; a
feature never observed in a record sits at that mean, its count (zero) telling the model
so. The majority class of the training records is printed beside, as the accuracy of
always guessing it.

The model is multinomial logistic regression with a small L2 penalty, fitted full-batch
by L-BFGS in float64: a convex problem, so the fit does not depend on a learning rate or
a seed.

    fedrnn bench reference                      # the default run's split (nafld, 10 sites)
    fedrnn bench reference --clients 30 --partitioner quantity --json
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import load_corpus, partition_corpus, resolve, split_indices
from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.tasks.classify import auroc

L2 = 1e-3  # penalty on the weights (not the bias), per record of the mean loss


@dataclass(frozen=True)
class Split:
    """Corpus indices of the training records and the test records (the simulation's
    evaluation records), with the client each test record belongs to."""

    clients: int
    train: np.ndarray
    test: np.ndarray
    test_client: np.ndarray


@dataclass(frozen=True)
class ReferenceResult:
    clients: int
    train_records: int
    test_records: int
    accuracy: float
    majority_accuracy: float  # always guessing the training records' most common class
    loss: float
    auroc: float | None  # pooled over every test record; None unless two classes
    auroc_by_client: float | None  # each client's AUROC weighted by its records, as runs report


def simulation_split(config: RunConfig) -> Split:
    """The train and evaluation records of every simulated client, in client order."""
    names, _ = partition_corpus(config)
    train, test, client = [], [], []
    for pid in range(len(names)):
        train_idx, eval_idx = split_indices(config, pid)
        train.append(train_idx)
        test.append(eval_idx)
        client.append(np.full(len(eval_idx), pid))
    return Split(len(names), np.concatenate(train), np.concatenate(test),
                 np.concatenate(client))


def summary_features(corpus: Corpus, index: np.ndarray, *, max_len: int) -> np.ndarray:
    """``[len(index), 3F + 2]``: per feature last, mean and count of observed values, then
    log steps and time span (raw units; standardise before fitting). Unobserved: NaN."""
    n_features = len(corpus.feature_names)
    out = np.full((len(index), 3 * n_features + 2), np.nan)
    for row, i in enumerate(index):
        values, times = corpus.values[i][-max_len:], corpus.times[i][-max_len:]
        observed = ~np.isnan(values)
        count = observed.sum(axis=0)
        for f in np.flatnonzero(count):
            seen = values[observed[:, f], f]
            out[row, f] = seen[-1]
            out[row, n_features + f] = seen.mean()
        out[row, 2 * n_features: 3 * n_features] = np.log1p(count)
        out[row, -2] = math.log1p(len(values))
        out[row, -1] = float(times[-1] - times[0])
    return out


def text_features(corpus: Corpus, index: np.ndarray, config: RunConfig) -> np.ndarray:
    """``[len(index), vocabulary + 1]``: each token's share of the message's first
    ``max-len`` tokens (the run's tokenizer), then the log of their number."""
    from fedrnn.shared.data.tokenizers import make_tokenizer

    tokenizer = make_tokenizer(config.tokenizer, config.vocab_size)
    out = np.zeros((len(index), tokenizer.vocab_size + 1))
    for row, i in enumerate(index):
        ids = tokenizer.encode(corpus.texts[i])[: config.max_len]
        if ids:
            np.add.at(out[row], ids, 1.0 / len(ids))
        out[row, -1] = math.log1p(len(ids))
    return out


def features(corpus: Corpus, index: np.ndarray, config: RunConfig) -> np.ndarray:
    """The records' summaries, unscaled: ``summary_features`` or ``text_features``."""
    if corpus.kind == "text":
        return text_features(corpus, index, config)
    return summary_features(corpus, index, max_len=config.max_len)


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both z-scored with the training columns' statistics; unobserved values at 0."""
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(train, axis=0))
        std = np.nan_to_num(np.nanstd(train, axis=0))
    std = np.where(std > 1e-8, std, 1.0)
    return (np.nan_to_num((train - mean) / std), np.nan_to_num((test - mean) / std))


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = L2,
                 ) -> torch.nn.Linear:
    """Multinomial logistic regression, the mean cross-entropy plus ``l2`` x squared
    weights minimised by L-BFGS (float64, full batch)."""
    inputs = torch.as_tensor(x, dtype=torch.float64)
    targets = torch.as_tensor(y, dtype=torch.long)
    model = torch.nn.Linear(x.shape[1], n_classes, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500,
                                  tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(model(inputs), targets)
                + l2 * model.weight.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def reference(config: RunConfig) -> ReferenceResult:
    """Fit on the simulation's training records, score on its evaluation records."""
    if config.task != "classify":
        raise ConfigError(f"the reference is a classifier: it needs --task classify, "
                          f"not {config.task}")
    config = resolve(config)
    corpus = load_corpus(config)
    split = simulation_split(config)
    classes = {name: i for i, name in enumerate(config.label_names)}
    y_train = np.array([classes[corpus.labels[i]] for i in split.train])
    y_test = np.array([classes[corpus.labels[i]] for i in split.test])
    x_train, x_test = standardise(features(corpus, split.train, config),
                                  features(corpus, split.test, config))
    model = fit_logistic(x_train, y_train, len(classes))
    with torch.no_grad():
        logits = model(torch.as_tensor(x_test, dtype=torch.float64))
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y_test)).item()
        scores = torch.softmax(logits, -1).numpy()
    accuracy = float((scores.argmax(-1) == y_test).mean())
    majority = float((y_test == np.bincount(y_train, minlength=len(classes)).argmax()).mean())
    pooled = by_client = None
    if len(classes) == 2:
        pooled = auroc(scores[:, 1], y_test)
        by_client = _weighted_auroc(scores[:, 1], y_test, split.test_client)
    return ReferenceResult(clients=split.clients, train_records=len(split.train),
                           test_records=len(split.test), accuracy=accuracy,
                           majority_accuracy=majority, loss=loss,
                           auroc=pooled, auroc_by_client=by_client)


def _weighted_auroc(scores: np.ndarray, labels: np.ndarray, clients: np.ndarray
                    ) -> float | None:
    """Each client's AUROC on its own records, averaged weighted by records: the federated
    ``auroc`` of a run (a client with one class has none and counts for nothing)."""
    total, weight = 0.0, 0
    for client in np.unique(clients):
        mine = clients == client
        value = auroc(scores[mine], labels[mine])
        if value is not None:
            total += value * int(mine.sum())
            weight += int(mine.sum())
    return total / weight if weight else None


def format_result(result: ReferenceResult, config: RunConfig) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    source = config.data or config.dataset
    return "\n".join([
        f"reference: logistic regression on per-record summaries, non-federated, non-private "
        f"({source}; the simulation's split: {result.clients} clients, partitioner "
        f"{config.partitioner}, eval-fraction {config.eval_fraction}, seed {config.seed})",
        f"records: {result.train_records} train, {result.test_records} test (the "
        "simulation's evaluation records)",
        f"auroc {number(result.auroc)} (pooled), {number(result.auroc_by_client)} (by "
        f"client, weighted by records: as a run reports it) | accuracy "
        f"{result.accuracy:.4f} (majority class {result.majority_accuracy:.4f}) | "
        f"loss {result.loss:.4f}",
    ])


def main_reference(config: RunConfig, *, as_json: bool) -> None:
    result = reference(config)
    print(json.dumps(asdict(result)) if as_json else format_result(result, config))
