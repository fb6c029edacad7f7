"""Readers for users' own files. Every problem becomes a DataError naming file and place.

Formats (docs/data.md):

- text, JSONL: one object per line, ``{"client": str, "text": str, "label": optional}``;
  the same columns as CSV (``client`` optional in both).
- numeric sequences, long-format CSV: ``client,sequence_id,time,<features...>[,label]``, one
  row per observation; ``client`` and ``label`` optional; empty cells are missing values;
  ``time`` numeric or a date; the label is constant within a sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedrnn.shared.data.corpus import Corpus
from fedrnn.shared.errors import DataError

SERIES_KEYS = ("client", "sequence_id", "time", "label")


def read_file(path: str | Path) -> Corpus:
    """Read a text (.jsonl/.csv with ``text``) or numeric (.csv with ``sequence_id``) file."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_text_jsonl(path)
    if suffix == ".csv":
        frame = _read_csv(path)
        if "text" in frame.columns:
            return text_corpus_from_frame(frame, str(path))
        if "sequence_id" in frame.columns:
            return series_corpus_from_frame(frame, str(path))
        raise DataError(path, "needs a 'text' column (messages) or 'sequence_id' and 'time' "
                              f"columns (numeric sequences); found {', '.join(frame.columns)}")
    raise DataError(path, f"unsupported file type {suffix or '(none)'}: use .jsonl or .csv")


# --- text --------------------------------------------------------------------------------------

def read_text_jsonl(path: Path) -> Corpus:
    texts, clients, labels, ids = [], [], [], []
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        try:
            lines = fh.readlines()
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not UTF-8 text ({exc.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"broken JSON ({exc.msg})", line=number) from None
        if not isinstance(row, dict):
            raise DataError(path, "expected a JSON object like {\"text\": ...}", line=number)
        text = row.get("text")
        if not isinstance(text, str):
            problem = "missing 'text'" if text is None else "'text' must be a string"
            raise DataError(path, problem, line=number)
        texts.append(text)
        clients.append(row.get("client"))
        labels.append(row.get("label"))
        ids.append(row.get("id"))
    if not texts:
        raise DataError(path, "file is empty: no records")
    return Corpus(kind="text", source=str(path), texts=texts,
                  clients=_optional_column(path, "client", clients),
                  labels=_optional_column(path, "label", labels),
                  ids=_unique_ids(path, _optional_column(path, "id", ids)))


def _unique_ids(source: object, ids: np.ndarray | None) -> np.ndarray | None:
    """A record's id is its identity for privacy accounting: two records may not share one."""
    if ids is None:
        return None
    _, first, counts = np.unique(ids.astype(str), return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[first[np.flatnonzero(counts > 1)[0]]]
        raise DataError(source, f"id {dup!r} is given to more than one record; ids must be "
                                "unique (they key each record's privacy budget)", column="id")
    return ids


def _optional_column(path: Path, name: str, values: list) -> np.ndarray | None:
    """None when no record has the key; an error when only some records have it."""
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        raise DataError(path, f"'{name}' is given on some lines but missing here",
                        line=present.index(False) + 1)
    bad = next((i for i, v in enumerate(values) if isinstance(v, (dict, list))), None)
    if bad is not None:
        raise DataError(path, f"'{name}' must be a string or number", line=bad + 1)
    return np.array([str(v) for v in values], dtype=object)


def text_corpus_from_frame(frame: pd.DataFrame, source: str) -> Corpus:
    for name in ("client", "label", "id"):
        if name in frame.columns and frame[name].isna().any():
            row = int(np.flatnonzero(frame[name].isna().to_numpy())[0])
            raise DataError(source, f"empty '{name}'", line=row + 2)
    texts = frame["text"].fillna("").astype(str).tolist()
    if not texts:
        raise DataError(source, "no records (only a header)")
    return Corpus(
        kind="text", source=source, texts=texts,
        clients=frame["client"].astype(str).to_numpy(dtype=object)
        if "client" in frame.columns else None,
        labels=frame["label"].astype(str).to_numpy(dtype=object)
        if "label" in frame.columns else None,
        ids=_unique_ids(source, frame["id"].astype(str).to_numpy(dtype=object))
        if "id" in frame.columns else None,
    )


# --- numeric sequences -------------------------------------------------------------------------

def _read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(path, f"broken CSV ({str(exc).strip()})") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise DataError(path, "no records (only a header)")
    return frame


def series_corpus_from_frame(
    frame: pd.DataFrame,
    source: str,
    *,
    scaling: dict[str, tuple[float, float]] | None = None,
) -> Corpus:
    """Group a long-format frame (one row per observation) into one record per sequence.

    Frames read from CSV hold strings; built-in datasets pass numeric frames.
    """
    for required in ("sequence_id", "time"):
        if required not in frame.columns:
            raise DataError(source, f"missing column '{required}' (expected "
                                    "client,sequence_id,time,<features...>[,label])")
    features = [c for c in frame.columns if c not in SERIES_KEYS]
    if not features:
        raise DataError(source, "no numeric feature columns besides client, sequence_id, "
                                "time and label")
    if frame["sequence_id"].isna().any():
        row = int(np.flatnonzero(frame["sequence_id"].isna().to_numpy())[0])
        raise DataError(source, "empty sequence_id", line=row + 2)

    values = np.empty((len(frame), len(features)), dtype=np.float64)
    for j, name in enumerate(features):
        values[:, j] = _numeric_column(frame[name], source, name)
    times = _time_column(frame["time"], source)

    keys = ["client", "sequence_id"] if "client" in frame.columns else ["sequence_id"]
    if "client" in frame.columns and frame["client"].isna().any():
        row = int(np.flatnonzero(frame["client"].isna().to_numpy())[0])
        raise DataError(source, "empty client", line=row + 2)
    group = frame.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
    order = np.lexsort((times, group))  # by sequence, then by time (stable)
    group_sorted = group[order]
    starts = np.flatnonzero(np.r_[True, group_sorted[1:] != group_sorted[:-1]])
    bounds = list(zip(starts, [*starts[1:], len(order)], strict=True))

    labels = None
    if "label" in frame.columns:
        label_col = frame["label"].to_numpy(dtype=object)
        labels = []
        for lo, hi in bounds:
            seq_labels = label_col[order[lo:hi]]
            distinct = {str(v) for v in seq_labels if not _missing(v)}
            if len(distinct) != 1 or any(_missing(v) for v in seq_labels):
                seq = frame["sequence_id"].iloc[order[lo]]
                problem = ("has no label" if not distinct else
                           f"has {len(distinct)} different labels ({', '.join(sorted(distinct))})"
                           if len(distinct) > 1 else "has rows with an empty label")
                raise DataError(source, f"sequence {seq!r} {problem}; the label must be one "
                                        "value, constant within a sequence", column="label")
            labels.append(distinct.pop())
        labels = np.array(labels, dtype=object)

    clients = None
    seq_col = frame["sequence_id"].astype(str).to_numpy(dtype=object)
    ids = np.array([seq_col[order[lo]] for lo, _ in bounds], dtype=object)
    if "client" in frame.columns:
        client_col = frame["client"].astype(str).to_numpy(dtype=object)
        clients = np.array([client_col[order[lo]] for lo, _ in bounds], dtype=object)
        # sequence ids need only be unique within a client
        ids = np.array([f"{c}/{i}" for c, i in zip(clients, ids, strict=True)], dtype=object)

    return Corpus(
        kind="series", source=source,
        values=[values[order[lo:hi]] for lo, hi in bounds],
        times=[times[order[lo:hi]] for lo, hi in bounds],
        feature_names=tuple(features), scaling=scaling, clients=clients, labels=labels,
        ids=ids,
    )


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _numeric_column(column: pd.Series, source: str, name: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column):
        numbers = column.to_numpy(dtype=np.float64)
    else:
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(np.isnan(numbers) & column.notna().to_numpy())
        if len(bad):
            raise DataError(source, f"non-numeric value {column.iloc[bad[0]]!r} in a feature "
                                    "column (leave the cell empty for a missing value)",
                            line=int(bad[0]) + 2, column=name)
    infinite = np.flatnonzero(np.isinf(numbers))
    if len(infinite):
        raise DataError(source, "infinite value in a feature column", line=int(infinite[0]) + 2,
                        column=name)
    return numbers


def _time_column(column: pd.Series, source: str) -> np.ndarray:
    if column.isna().any():
        row = int(np.flatnonzero(column.isna().to_numpy())[0])
        raise DataError(source, "empty time", line=row + 2, column="time")
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64)
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(dtype=np.float64)
    dates = pd.to_datetime(column, errors="coerce", format="mixed")
    if dates.notna().all():
        # Days since the epoch: only the gaps between observations are used.
        return (dates - pd.Timestamp(0, tz=dates.dt.tz)).dt.total_seconds().to_numpy() / 86400.0
    row = int(np.flatnonzero(numbers.isna().to_numpy() & dates.isna().to_numpy())[0])
    raise DataError(source, f"time {column.iloc[row]!r} is neither a number nor a date",
                    line=row + 2, column="time")
