"""The in-memory form every data source is read into, before it is split into clients.

A corpus is a list of records, one record being one sequence: one message, or one
patient's time series. A record is the unit that record-level DP protects, so a record
is never split into several training examples (long records are truncated instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass
class Corpus:
    """Records of one source, with optional natural client and label per record."""

    kind: Literal["text", "series"]
    source: str  # file path or built-in dataset name, for messages
    texts: list[str] | None = None  # kind "text": one string per record
    # kind "series": per record, observations sorted by time: values [T, F] (NaN = missing)
    # and times [T] (any unit; only gaps between observations are used).
    values: list[np.ndarray] | None = None
    times: list[np.ndarray] | None = None
    feature_names: tuple[str, ...] = ()
    # Public, fixed-in-advance (mean, std) per feature; None = each client standardises
    # with statistics of its own training split, which never leave it.
    scaling: dict[str, tuple[float, float]] | None = None
    clients: np.ndarray | None = None  # [N] str, the natural partition, or None
    labels: np.ndarray | None = None  # [N] str, or None
    # [N] str: each record's own id (sequence_id; a text file's 'id'), or None. Records
    # without ids are recognised by content (shared.data.identity).
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.kind == "text" else len(self.values)

    @property
    def label_set(self) -> list[str]:
        """Sorted distinct labels; numeric-looking labels sort numerically."""
        if self.labels is None:
            return []
        distinct = set(self.labels.tolist())
        try:
            return sorted(distinct, key=float)
        except ValueError:
            return sorted(distinct)
