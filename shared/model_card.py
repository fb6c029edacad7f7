"""A trained model's card: ``model.json`` beside ``model.pt``, all a model needs away from its run.

The server writes it with the run directory (``fedrnn.server.records``); ``fedrnn predict``,
``evaluate`` and ``generate`` read it. It holds what turns a record into the model's inputs
exactly as training did (task, classes, feature columns, tokenizer, max length, how values
were standardised), what builds the network, and the privacy the weights were trained
under. A directory holding ``model.json`` and ``model.pt`` alone is a complete model::

    card, model = load_model("runs/20250101-120000")
    card.task, card.labels, card.privacy.level

Normalisation (numeric sequences only): ``reference`` values are public, fixed in advance
(a built-in dataset's), and recorded here; ``site`` means every site standardised with
its own records' statistics, which never left it, so whoever uses the model computes
their own the same way (``shared.data.encode_records``).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fedrnn.shared.config import TASKS, RunConfig
from fedrnn.shared.errors import ConfigError, FedrnnError
from fedrnn.shared.run_records import PrivacySummary, json_value

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.pt"
CARD_FORMAT = 1
SITE = "site"  # normalisation source: each site's own statistics
REFERENCE = "reference"  # normalisation source: public values fixed in advance


@dataclass(frozen=True)
class Architecture:
    model: str  # recurrent cell: gru, lstm, rnn
    hidden_size: int
    num_layers: int
    embedding_dim: int  # text inputs only; kept for any input so the config round-trips
    nonlinearity: str  # the vanilla rnn's activation
    dropout: float  # between stacked layers, in training only


@dataclass(frozen=True)
class CardPrivacy:
    """The privacy the weights were trained under. ``None``: does not apply to the run."""

    level: str  # "record", "user", "both" or "none"
    epsilon_target: float | None  # the record-level target the noise was calibrated to
    epsilon_spent: float | None  # the largest per-record epsilon any site spent; inf: none
    delta: float | None
    noise_multiplier: float | None  # set explicitly; None when calibrated at each site
    clip_norm: float | None  # per-sample clipping norm of DP-SGD
    accountant: str | None
    user_noise_multiplier: float | None = None  # user-level (DP-FedAvg) only
    user_clip_norm: float | None = None
    user_epsilon: float | None = None

    @classmethod
    def of(cls, privacy: PrivacySummary) -> CardPrivacy:
        user = privacy.user_level
        return cls(level=privacy.level, epsilon_target=privacy.epsilon_target,
                   epsilon_spent=privacy.epsilon_max, delta=privacy.delta,
                   noise_multiplier=privacy.noise_multiplier, clip_norm=privacy.clip_norm,
                   accountant=privacy.accountant,
                   user_noise_multiplier=None if user is None else user.noise_multiplier,
                   user_clip_norm=None if user is None else user.clip_norm,
                   user_epsilon=None if user is None else user.epsilon)


@dataclass(frozen=True)
class ModelCard:
    """``model.json``; ``to_json``/``from_json`` define the file, ``config()`` rebuilds the
    settings the network and the preprocessing are built from."""

    task: str  # classify, lm or forecast
    labels: list[str]  # classify: the classes, in the order of the model's outputs
    features: list[str]  # numeric sequences: the columns, in the order the model reads them
    tokenizer: str | None  # text: char or word; None for numeric sequences
    vocab_size: int  # token ids the model embeds; 0 for numeric sequences
    hash_buckets: int | None  # the word tokenizer's buckets (vocab_size less special ids)
    max_len: int  # tokens or time steps kept per record (the rest is truncated)
    # numeric sequences: REFERENCE or SITE; None for text
    normalisation: str | None
    # REFERENCE: feature -> (mean, std) in the data's own units
    reference_scaling: dict[str, tuple[float, float]] | None
    architecture: Architecture
    privacy: CardPrivacy
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer format, kept

    @property
    def is_text(self) -> bool:
        return not self.features

    @classmethod
    def describe(cls, config: RunConfig, privacy: PrivacySummary, *,
                 reference_scaling: dict[str, tuple[float, float]] | None) -> ModelCard:
        """The card of a run's model; ``reference_scaling``: the public values sites used,
        None when each site standardised its own numeric records."""
        from fedrnn.shared.models import vocab_size

        series = bool(config.feature_names)
        return cls(
            task=config.task, labels=config.label_names, features=config.feature_names,
            tokenizer=None if series else config.tokenizer, vocab_size=vocab_size(config),
            hash_buckets=config.vocab_size if not series and config.tokenizer == "word"
            else None,
            max_len=config.max_len,
            normalisation=None if not series else REFERENCE if reference_scaling else SITE,
            reference_scaling=({f: tuple(reference_scaling[f]) for f in config.feature_names}
                               if series and reference_scaling else None),
            architecture=Architecture(
                model=config.model, hidden_size=config.hidden_size,
                num_layers=config.num_layers, embedding_dim=config.embedding_dim,
                nonlinearity=config.nonlinearity, dropout=config.dropout),
            privacy=CardPrivacy.of(privacy), run_id=config.run_id)

    def config(self) -> RunConfig:
        """The settings that build this model and encode records as its training did."""
        arch = self.architecture
        return RunConfig().replace(
            dataset="", data="", task=self.task, labels=",".join(self.labels),
            features=",".join(self.features), tokenizer=self.tokenizer or "char",
            vocab_size=self.hash_buckets or RunConfig().vocab_size, max_len=self.max_len,
            model=arch.model, hidden_size=arch.hidden_size, num_layers=arch.num_layers,
            embedding_dim=arch.embedding_dim, nonlinearity=arch.nonlinearity,
            dropout=arch.dropout, run_id=self.run_id)

    def to_json(self) -> dict[str, Any]:
        privacy = {k: json_value(v) for k, v in asdict(self.privacy).items()}
        return {
            "format": CARD_FORMAT, "task": self.task, "labels": list(self.labels),
            "features": list(self.features), "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size, "hash_buckets": self.hash_buckets,
            "max_len": self.max_len,
            "normalisation": None if self.normalisation is None else {
                "source": self.normalisation,
                "values": None if self.reference_scaling is None else {
                    f: {"mean": m, "std": s} for f, (m, s) in self.reference_scaling.items()}},
            "architecture": asdict(self.architecture), "privacy": privacy,
            "run_id": self.run_id, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        """The card a ``to_json`` object describes; KeyError/TypeError/ValueError if not one."""
        if int(data["format"]) > CARD_FORMAT:
            raise ValueError(f"card format {data['format']} is newer than this fedrnn's "
                             f"({CARD_FORMAT}): upgrade fedrnn")
        norm = data["normalisation"]
        values = None if norm is None else norm.get("values")
        privacy = {k: float(v) if v in ("inf", "-inf") else v
                   for k, v in data["privacy"].items()}
        known = {"format", "task", "labels", "features", "tokenizer", "vocab_size",
                 "hash_buckets", "max_len", "normalisation", "architecture", "privacy",
                 "run_id"}
        arch = data["architecture"]
        unknown = set(arch) - {f.name for f in fields(Architecture)}
        if unknown:  # a newer network this fedrnn would build without it
            raise ValueError(f"unknown architecture field(s) {', '.join(sorted(unknown))}")
        card = cls(
            task=str(data["task"]), labels=[str(x) for x in _list(data["labels"])],
            features=[str(x) for x in _list(data["features"])], tokenizer=data["tokenizer"],
            vocab_size=_int(data["vocab_size"]),
            hash_buckets=None if data["hash_buckets"] is None else _int(data["hash_buckets"]),
            max_len=_int(data["max_len"]),
            normalisation=None if norm is None else str(norm["source"]),
            reference_scaling=None if values is None else {
                f: (float(v["mean"]), float(v["std"])) for f, v in values.items()},
            architecture=Architecture(
                model=str(arch["model"]), hidden_size=_int(arch["hidden_size"]),
                num_layers=_int(arch["num_layers"]), embedding_dim=_int(arch["embedding_dim"]),
                nonlinearity=str(arch["nonlinearity"]), dropout=float(arch["dropout"])),
            privacy=CardPrivacy(**privacy), run_id=str(data.get("run_id", "")),
            extra={k: v for k, v in data.items() if k not in known})
        card._check()
        return card

    def _check(self) -> None:
        """ValueError when the card's fields contradict each other (a damaged or forged
        card): each field alone is checked where the settings are built (``config()``)."""
        for name, value in asdict(self.privacy).items():
            if name not in ("level", "accountant") and not (
                    value is None or isinstance(value, int | float)
                    and not isinstance(value, bool)):
                raise ValueError(f"privacy {name} must be a number or null, not {value!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if len(set(self.labels)) != len(self.labels) or len(set(self.features)) != len(
                self.features):
            raise ValueError("labels and features must be distinct names")
        if self.task == "classify" and len(self.labels) < 2:
            raise ValueError("a classify model needs at least two labels")
        if self.task != "classify" and self.labels:
            raise ValueError(f"task {self.task} has no labels")
        if self.task == "lm" and not self.is_text:
            raise ValueError("an lm model reads text: it has no features")
        if self.task == "forecast" and self.is_text:
            raise ValueError("a forecast model reads numeric sequences: it needs features")
        if self.is_text:
            if self.normalisation is not None:
                raise ValueError("a text model has no normalisation")
            return
        if self.normalisation not in (REFERENCE, SITE):
            raise ValueError(f"normalisation source must be {REFERENCE} or {SITE}, "
                             f"not {self.normalisation!r}")
        scaling = self.reference_scaling
        if (self.normalisation == REFERENCE) != (scaling is not None):
            raise ValueError(f"normalisation values are given for, and only for, "
                             f"source {REFERENCE}")
        if scaling is not None:
            if sorted(scaling) != sorted(self.features):
                raise ValueError("normalisation values must name exactly the features")
            if not all(math.isfinite(m) and math.isfinite(s) and s > 0
                       for m, s in scaling.values()):
                raise ValueError("normalisation means must be finite, stds finite and > 0")

    def describe_privacy(self) -> str:
        """One line: the DP the model was trained under."""
        p = self.privacy
        if p.level == "none":
            return "no DP"
        parts = [f"dp-level {p.level}"]
        if p.epsilon_spent is not None and math.isfinite(p.epsilon_spent):
            parts.append(f"epsilon spent {p.epsilon_spent:.3g} (delta {p.delta:g})")
        elif p.epsilon_target is not None:
            parts.append(f"epsilon target {p.epsilon_target:g} (delta {p.delta:g})")
        return ", ".join(parts)


def write_model(directory: str | Path, card: ModelCard,
                state_dict: dict[str, torch.Tensor]) -> None:
    """``model.pt`` and ``model.json`` into ``directory``, each whole or not at all; the
    weights first, so a card never describes weights that are not there."""
    from fedrnn.shared.files import write_atomic

    directory = Path(directory)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    write_atomic(directory / WEIGHTS_FILE, buffer.getvalue())
    write_atomic(directory / CARD_FILE, (json.dumps(card.to_json(), indent=2) + "\n").encode())


def read_card(directory: str | Path) -> ModelCard:
    """``directory``'s ``model.json``; a FedrnnError naming the problem if it has none."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FedrnnError(f"{directory}: not a directory (give a run directory, or one "
                          f"holding {CARD_FILE} and {WEIGHTS_FILE})")
    path = directory / CARD_FILE
    if not path.is_file() and (directory / "config.toml").is_file():
        raise FedrnnError(f"{directory}: no {CARD_FILE}: the run finished before model cards "
                          "were written, or has not finished yet")
    if not path.is_file():
        raise FedrnnError(f"{directory}: no {CARD_FILE} (a run directory from fedrnn "
                          f"simulate or fedrnn server, or a copy of its {CARD_FILE} and "
                          f"{WEIGHTS_FILE})")
    try:
        card = ModelCard.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FedrnnError(f"{path}: not a fedrnn model card ({type(exc).__name__}: {exc})"
                          ) from None
    from fedrnn.shared.models import vocab_size

    try:
        config = card.config()  # every setting the card holds, checked as a run's flags are
    except ConfigError as exc:
        raise FedrnnError(f"{path}: not a usable model card ({exc})") from None
    if card.vocab_size != vocab_size(config):
        raise FedrnnError(f"{path}: not a usable model card (vocab_size {card.vocab_size}, "
                          f"but its inputs make {vocab_size(config)})")
    return card


def load_model(directory: str | Path) -> tuple[ModelCard, torch.nn.Module]:
    """The card and the trained network (in eval mode) of a run directory, or of any
    directory holding ``model.json`` and ``model.pt``."""
    from fedrnn.shared.models import build_model

    card = read_card(directory)
    weights = Path(directory).expanduser() / WEIGHTS_FILE
    if not weights.is_file():
        raise FedrnnError(f"{weights}: missing (the run has not finished, or the weights "
                          "were not copied beside the card)")
    try:
        # weights_only: a file that is a pickle of anything but tensors is refused, never run
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings about a foreign pickle
            state = torch.load(weights, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        # not torch's own message: it suggests weights_only=False, which would run the file
        raise FedrnnError(f"{weights}: refused: not tensors alone (a model.pt holds weights "
                          "only; fedrnn never unpickles anything else)") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise FedrnnError(f"{weights}: not a PyTorch state dict of tensors "
                          f"({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FedrnnError(f"{weights}: not a state dict (names to tensors)")
    config = card.config()
    # The card's sizes are checked against the weights on the meta device (no memory), so
    # a card whose sizes lie is refused before its network would be allocated.
    try:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in build_model(config).state_dict().items()}
    except RuntimeError as exc:
        raise FedrnnError(f"{weights}: does not fit the network {CARD_FILE} describes "
                          f"({_first_line(exc)})") from None
    if shapes != {k: v.shape for k, v in state.items()}:
        differ = sorted(set(shapes) ^ set(state) or
                        {k for k in shapes if shapes[k] != state[k].shape})
        raise FedrnnError(f"{weights}: does not fit the network {CARD_FILE} describes "
                          f"(differs in {', '.join(differ[:3])})")
    model = build_model(config)
    model.load_state_dict(state)
    return card, model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _int(value: Any) -> int:
    """An integer field: a JSON integer, never a string, a bool or a fraction."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    return value
