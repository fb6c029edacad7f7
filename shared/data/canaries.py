"""Canaries for the empirical privacy audit: records planted at one simulated site.

Two kinds (docs/empirical-audit.md):

- **one-run canaries** (``canaries`` = M): M records no real record resembles, each
  trained on with probability 1/2 by a secret draw. Per task: ``classify``, an
  out-of-distribution input (random values at every step, or random characters) with a
  random label, so that only memorising that one record can lower its loss; ``lm``, a
  message of random characters; ``forecast``, a calm series whose next step jumps out of
  distribution.
- **secrets** (``canary-secrets`` = K, task lm): "my code is 4 8 1 5 0 9" with random
  digits, each planted ``canary-repeats`` times, for the exposure test of Carlini et al.

``RUN/audit/canaries.json`` (0600) holds the draw: which site, a 128-bit seed that
regenerates every canary and secret exactly, and the inclusion of each canary. Only the
canary site's own data (``client_data``) and the audit read it; nothing the server
writes or receives holds it. A deployed site plants nothing: canaries are ``fedrnn
simulate``'s alone.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.files import write_atomic

AUDIT_DIR = "audit"
CANARY_FILE = "canaries.json"
FORMAT = 1
CANARY_KEY = "canary:"  # ledger keys of planted records: never a real record's ("id:", "h:")
SECRET_KEY = "secret:"
SECRET_PREFIX = "my code is "
SECRET_DIGITS = 6  # candidate space 10^6
SERIES_STEPS = 8  # observations of a series canary
TEXT_CHARS = 24  # characters of a text canary
OOD_Z = 4.0  # standardised values of out-of-distribution steps: well outside the data
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class CanaryDraw:
    """The secret of an audited run: where the canaries are and which were trained on."""

    site: str
    seed: int  # regenerates every canary and secret (``canary_corpus``, ``secret_texts``)
    included: tuple[bool, ...]  # one per canary
    secrets: int = 0
    repeats: int = 1

    def to_json(self) -> dict:
        return {"format": FORMAT, "site": self.site, "seed": f"{self.seed:032x}",
                "included": [int(b) for b in self.included], "secrets": self.secrets,
                "repeats": self.repeats}

    @classmethod
    def from_json(cls, data: dict) -> CanaryDraw:
        if data.get("format") != FORMAT:
            raise ConfigError(f"{CANARY_FILE}: format {data.get('format')!r}, expected {FORMAT}")
        return cls(site=str(data["site"]), seed=int(data["seed"], 16),
                   included=tuple(bool(b) for b in data["included"]),
                   secrets=int(data.get("secrets", 0)), repeats=int(data.get("repeats", 1)))


def new_draw(config: RunConfig, site: str) -> CanaryDraw:
    """A fresh draw from the operating system's entropy: unrelated to the run's seed, so
    nothing the run's configuration says predicts which canaries were trained on."""
    rng = np.random.default_rng(secrets.randbits(128))
    return CanaryDraw(site=site, seed=secrets.randbits(128),
                      included=tuple(bool(b) for b in rng.random(config.canaries) < 0.5),
                      secrets=config.canary_secrets, repeats=config.canary_repeats)


def draw_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / AUDIT_DIR / CANARY_FILE


def write_draw(run_dir: str | Path, draw: CanaryDraw) -> Path:
    path = draw_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(draw.to_json()).encode(), private=True)
    return path


def read_draw(run_dir: str | Path) -> CanaryDraw | None:
    """The run's draw, or None when the run planted no canaries."""
    path = draw_path(run_dir)
    if not path.is_file():
        return None
    return read_draw_file(path)


def read_draw_file(path: str | Path) -> CanaryDraw:
    """The draw in ``path`` (a ``canaries.json``); a ConfigError naming it otherwise."""
    path = Path(path)
    try:
        return CanaryDraw.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a canary draw ({exc})") from None


def canary_corpus(config: RunConfig, draw: CanaryDraw, label_names: list[str]) -> Corpus:
    """Every one-run canary, in order, as records of the run's kind. Series values are in
    standardised units (the channels training sees, whatever the site's scaling)."""
    rng = np.random.default_rng([draw.seed, 0])
    m = len(draw.included)
    labels = (np.array([label_names[i] for i in rng.integers(0, len(label_names), m)],
                       dtype=object) if label_names else None)
    if config.features:  # numeric sequences
        n_features = len(config.feature_names)
        values, times = [], []
        for _ in range(m):
            steps = min(SERIES_STEPS, config.max_len)
            if config.task == "forecast":
                z = rng.normal(0.0, 0.3, size=(steps, n_features))  # calm, in distribution
                z[-1] = rng.choice([-OOD_Z, OOD_Z], size=n_features)  # then a jump
            else:
                z = rng.uniform(-OOD_Z, OOD_Z, size=(steps, n_features))
            values.append(z)
            times.append(np.cumsum(rng.uniform(0.5, 1.5, size=steps)))
        return Corpus(kind="series", source="canaries", values=values, times=times,
                      feature_names=tuple(config.feature_names),
                      scaling={f: (0.0, 1.0) for f in config.feature_names}, labels=labels)
    texts = ["".join(rng.choice(list(ALPHABET), size=TEXT_CHARS)) for _ in range(m)]
    return Corpus(kind="text", source="canaries", texts=texts, labels=labels)


def secret_texts(draw: CanaryDraw) -> list[str]:
    """The K secrets, "my code is d d d d d d" with random digits."""
    rng = np.random.default_rng([draw.seed, 1])
    return [format_secret(rng.integers(0, 10, SECRET_DIGITS)) for _ in range(draw.secrets)]


def format_secret(digits: np.ndarray) -> str:
    return SECRET_PREFIX + " ".join(str(int(d)) for d in digits)


def is_planted(key: str) -> bool:
    """Whether a ledger key is a canary's or a secret's (not one of the site's records)."""
    return key.startswith((CANARY_KEY, SECRET_KEY))
