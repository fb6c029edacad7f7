"""Writing a dataset's clients out as one records file per site (``fedrnn split``).

A trial deployment needs sites with records of their own; this writes each simulated
client's records in the very formats ``fedrnn client --data`` reads (docs/data.md), so
what a site trains on in a deployment is what it trains on in a simulation.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import load_corpus, partition_corpus
from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.files import write_atomic


def write_site_files(config: RunConfig, out_dir: str | Path) -> list[Path]:
    """One file per client of ``config``'s partition: ``<name>.jsonl`` (text) or
    ``<name>.csv`` (numeric sequences, long format). Returns the paths, in client order."""
    out = Path(out_dir)
    corpus = load_corpus(config)
    names, parts = partition_corpus(config)
    suffix = ".jsonl" if corpus.kind == "text" else ".csv"
    paths = [out / f"{_file_name(name)}{suffix}" for name in names]
    clashes = [p for p in paths if p.exists()]
    if clashes:
        raise ConfigError(f"{clashes[0]} already exists; choose an empty --out directory")
    out.mkdir(parents=True, exist_ok=True)
    for path, indices in zip(paths, parts, strict=True):
        data = _text_jsonl(corpus, indices) if corpus.kind == "text" else _series_csv(corpus,
                                                                                     indices)
        write_atomic(path, data)
    return paths


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "site"


def _text_jsonl(corpus: Corpus, indices: np.ndarray) -> bytes:
    lines = []
    for i in indices:
        row = {"text": corpus.texts[i]}
        if corpus.ids is not None:  # a record keeps its identity, and so its budget
            row = {"id": str(corpus.ids[i]), **row}
        if corpus.labels is not None:
            row["label"] = str(corpus.labels[i])
        lines.append(json.dumps(row, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _series_csv(corpus: Corpus, indices: np.ndarray) -> bytes:
    frames = []
    for seq, i in enumerate(indices):
        frame = pd.DataFrame(corpus.values[i], columns=list(corpus.feature_names))
        frame.insert(0, "time", corpus.times[i])
        # a record keeps its identity, and so its budget
        frame.insert(0, "sequence_id", seq if corpus.ids is None else str(corpus.ids[i]))
        if corpus.labels is not None:
            frame["label"] = str(corpus.labels[i])
        frames.append(frame)
    buffer = io.StringIO()
    # Missing values stay empty cells; full precision so the records read back unchanged.
    pd.concat(frames).to_csv(buffer, index=False, float_format="%.17g")
    return buffer.getvalue().encode("utf-8")
