"""Using a trained model on a data owner's own records: predict, evaluate, generate.

Everything runs where the records are; nothing is sent anywhere. A file's records go
through exactly the preprocessing of training (``shared.data.encode_records``), with the
schema and the normalisation the model's card records (``shared.model_card``). A file that
does not fit the model ends in a ``DataError`` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrnn.shared.data import EncodedRecords, check_kind, encode_records
from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.data.readers import read_file
from fedrnn.shared.data.tokenizers import BOS, EOS, PAD, make_tokenizer
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.model_card import ModelCard
from fedrnn.shared.tasks import Batch, get_task

BATCH = 256  # records per forward pass: bounds memory on large files


@dataclass
class Predictions:
    """One row per record of a file, in its order: the ids, then the task's columns."""

    columns: list[str]
    rows: list[list[object]]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return out.getvalue()

    def to_jsonl(self) -> str:
        return "".join(json.dumps(dict(zip(self.columns, [_json(v) for v in row], strict=True)))
                       + "\n" for row in self.rows)


def read_for(card: ModelCard, path: str | Path) -> Corpus:
    """``path``'s records, checked against the model's schema (kind and feature columns)."""
    corpus = read_file(Path(path).expanduser())
    check_kind(corpus, card.config(), whose="the model")
    return corpus


def encode_for(card: ModelCard, corpus: Corpus, *, labelled: bool = False) -> EncodedRecords:
    """``corpus`` encoded as the model's training encoded its records."""
    return encode_records(corpus, card.config(), scaling=card.reference_scaling,
                          labelled=labelled)


def predict(card: ModelCard, model: torch.nn.Module, path: str | Path) -> Predictions:
    """The model's prediction for every record of ``path``, identified as the file
    identifies it (``client``; ``sequence_id``, or a text's ``id``, else its ``line``)."""
    corpus = read_for(card, path)
    encoded = encode_for(card, corpus)
    config, task = card.config(), get_task(card.task)
    id_columns, ids = record_ids(corpus, Path(path).expanduser())
    columns: list[str] = []
    values: dict[str, list] = {}
    for lo, batch in _batches(encoded):
        hi = lo + len(batch[1])
        part = task.predict(model, batch, config,
                            mean=None if encoded.mean is None else encoded.mean[lo:hi],
                            std=None if encoded.std is None else encoded.std[lo:hi])
        for name, column in part.items():
            values.setdefault(name, []).extend(column)
        columns = list(part)
    rows = [[*ids[i], *(values[c][i] for c in columns)] for i in range(len(corpus))]
    return Predictions(columns=[*id_columns, *columns], rows=rows)


def evaluate(card: ModelCard, model: torch.nn.Module, path: str | Path) -> dict[str, float]:
    """The task's metrics on every record of ``path`` (``num-examples`` and the metrics a
    run reports, by the same code as a simulated client's evaluation)."""
    corpus = read_for(card, path)
    task = get_task(card.task)
    encoded = encode_for(card, corpus, labelled=task.uses_labels)
    metrics = task.evaluate(model, (b for _, b in _batches(encoded)), card.config())
    return {"num-examples": metrics["num-examples"],
            **{m: metrics[m] for m in task.metrics if m in metrics}}


def generate(card: ModelCard, model: torch.nn.Module, prompt: str, *, length: int,
             temperature: float, top_k: int, seed: int) -> str:
    """Up to ``length`` characters sampled after ``prompt`` (fewer if the model ends the
    text), each from the last ``max_len`` tokens; the same seed gives the same text.
    ``temperature`` 0: always the likeliest."""
    if card.task != "lm":
        raise ConfigError(f"generate needs a language model (task lm); this model's task "
                          f"is {card.task}: use fedrnn predict")
    tokenizer = make_tokenizer(card.tokenizer or "char", card.config().vocab_size)
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        raise ConfigError(f"the {card.tokenizer} tokenizer hashes words into buckets, which "
                          "cannot be turned back into text: generate needs a char model")
    if length < 1:
        raise ConfigError(f"--length {length}: must be at least 1")
    if not 0 <= temperature < math.inf:
        raise ConfigError(f"--temperature {temperature}: must be a finite number >= 0")
    if top_k < 0:
        raise ConfigError(f"--top-k {top_k}: must be >= 0 (0: all tokens)")
    generator = torch.Generator().manual_seed(seed)
    ids = [BOS, *tokenizer.encode(prompt)]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(length):
            # the model keeps no state between calls: it reads the text's last max_len ids
            # each step, the longest it was trained on, so each step costs the same
            window = ids[-card.max_len:]
            x = torch.tensor([window], dtype=torch.long)
            logits = model(x, torch.tensor([len(window)]))[0, -1].double()  # [vocab]
            logits[[PAD, BOS]] = -math.inf  # never a start or padding inside a text
            token = _sample(logits, temperature=temperature, top_k=top_k, generator=generator)
            if token == EOS:
                break
            ids.append(token)
            new.append(token)
    return decode(new)


def _sample(logits: torch.Tensor, *, temperature: float, top_k: int,
            generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    if 0 < top_k < len(logits):
        cut = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < cut, -math.inf, logits)
    probs = torch.softmax(logits / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def record_ids(corpus: Corpus, path: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """Id column names and each record's ids, as the file identifies its records."""
    names: list[str] = []
    parts: list[list[str]] = []
    if corpus.clients is not None:
        names.append("client")
        parts.append([str(c) for c in corpus.clients])
    if corpus.kind == "series":
        names.append("sequence_id")
        ids = [str(i) for i in corpus.ids]
        if corpus.clients is not None:  # the reader prefixes ids with their client
            ids = [i[len(str(c)) + 1:] for i, c in zip(ids, corpus.clients, strict=True)]
        parts.append(ids)
    elif corpus.ids is not None:
        names.append("id")
        parts.append([str(i) for i in corpus.ids])
    else:
        names.append("line")
        parts.append([str(n) for n in _record_lines(path, len(corpus))])
    return names, list(zip(*parts, strict=True))


def _record_lines(path: Path, count: int) -> list[int]:
    """The line each text record starts on: JSONL skips blank lines; a CSV's first record
    is on line 2 (after its header), one record per line."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as fh:
            lines = [n for n, line in enumerate(fh, start=1) if line.strip()]
        if len(lines) == count:
            return lines
    return list(range(2, count + 2))


def _batches(encoded: EncodedRecords) -> Iterator[tuple[int, Batch]]:
    tensors = encoded.tensors
    for lo in range(0, len(tensors), BATCH):
        part = tensors.subset(np.arange(lo, min(lo + BATCH, len(tensors))))
        yield lo, (part.inputs, part.lengths, part.labels)


def _json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
