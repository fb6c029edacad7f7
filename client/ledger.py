"""A site's privacy ledger: every DP release it ever made, durable on its own disk.

One SQLite file per site. A row is one *charge*: the parameters of one round of DP-SGD
(noise multiplier, sampling rate, steps, clip norm, delta), written and committed
*before* training starts. A crash after the charge wastes budget but never spends it
uncounted; a retried round is a new release and is charged again.

Charges are keyed by the fingerprint of the site's data, so a budget follows the data
across runs and restarts, whatever run or directory the site is used in.
Durability: WAL journal with ``synchronous=FULL``; a commit returns only once on disk.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.errors import FedrnnError
from shared.privacy import History

SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    site TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    clip_norm REAL NOT NULL,
    delta REAL NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_data ON charges (fingerprint, id);
CREATE TABLE IF NOT EXISTS budgets (
    fingerprint TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""

MECHANISM_DPSGD = "dp-sgd"  # Poisson-subsampled Gaussian, per-sample clipping


@dataclass(frozen=True)
class Charge:
    fingerprint: str
    site: str
    run_id: str
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    created_at: str = ""


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float
    accountant: str


class Ledger:
    """Open (creating if needed) the ledger at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FedrnnError(f"{self.path}: not a fedrnn ledger ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ---------------------------------------------------------------------------
    def charge(self, charge: Charge) -> int:
        """Record a release; returns once it is committed to disk."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO charges (fingerprint, site, run_id, round, mechanism, "
                "noise_multiplier, sample_rate, steps, clip_norm, delta, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (charge.fingerprint, charge.site, charge.run_id, charge.round,
                 charge.mechanism, float(charge.noise_multiplier), float(charge.sample_rate),
                 int(charge.steps), float(charge.clip_norm), float(charge.delta), now))
        return int(cursor.lastrowid)

    def set_budget(self, fingerprint: str, budget: Budget) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._transaction():
            self._db.execute(
                "INSERT INTO budgets (fingerprint, epsilon, delta, accountant, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET "
                "epsilon = excluded.epsilon, delta = excluded.delta, "
                "accountant = excluded.accountant, updated_at = excluded.updated_at",
                (fingerprint, budget.epsilon, budget.delta, budget.accountant, now))

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self_inner):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, *_):
                db.execute("COMMIT" if exc_type is None else "ROLLBACK")

        return _Tx()

    # --- reading ---------------------------------------------------------------------------
    def charges(self, fingerprint: str | None = None) -> list[Charge]:
        query = ("SELECT fingerprint, site, run_id, round, mechanism, noise_multiplier, "
                 "sample_rate, steps, clip_norm, delta, created_at FROM charges")
        args: tuple = ()
        if fingerprint is not None:
            query += " WHERE fingerprint = ?"
            args = (fingerprint,)
        return [Charge(*row) for row in self._db.execute(query + " ORDER BY id", args)]

    def history(self, fingerprint: str) -> History:
        return [(c.noise_multiplier, c.sample_rate, c.steps) for c in self.charges(fingerprint)]

    def fingerprints(self) -> list[str]:
        rows = self._db.execute("SELECT fingerprint FROM charges UNION "
                                "SELECT fingerprint FROM budgets ORDER BY 1")
        return [r[0] for r in rows]

    def budget(self, fingerprint: str) -> Budget | None:
        row = self._db.execute("SELECT epsilon, delta, accountant FROM budgets "
                               "WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return Budget(*row) if row else None

    def check_integrity(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
