"""A site's privacy ledger: every DP release it ever made, and which records each one used.

One SQLite file per deployed site (a simulation keeps one for all its simulated sites, so
a record that an edit of the data moves to another simulated site keeps its history).

- ``releases``: one row per DP release (a round of DP-SGD, or one DP evaluation): its
  mechanism's parameters (noise multiplier, sampling rate, steps), the delta it was
  accounted at, and what it was for. Written and committed *before* the release is made.
- ``records``: one row per record ever used, keyed by its identity
  (``shared.data.identity``), pointing at its *cohort*.
- ``cohorts``: records that took part in exactly the same releases share one cohort, a
  node in a tree whose path to the root lists those releases. A release moves each
  participating cohort to a child; the tree stays as small as the number of distinct
  participation histories (records that joined at different times), not the records.
- ``budgets``: the site's (epsilon, delta, accountant), one row per change; the last one
  holds. A run may lower it; only ``fedrnn ledger set-budget`` (a local act) raises it.
- ``meta``: the ledger's format version and the site's split key, a 256-bit secret from
  the operating system that never leaves this file.

A record's privacy loss is the composition of its cohort's releases (``fedrnn.client.spending``
checks and charges). Durability: WAL journal with ``synchronous=FULL``; a commit returns
only once on disk. The file is created owner-only (0600) before SQLite opens it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.files import create_private
from fedrnn.shared.privacy import History

FORMAT = "2"  # per-record accounting
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    purpose TEXT NOT NULL CHECK (purpose IN ('train', 'evaluate')),
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 1),
    clip_norm REAL NOT NULL CHECK (clip_norm > 0),
    delta REAL NOT NULL,
    records INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cohorts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER REFERENCES cohorts (id),
    release INTEGER NOT NULL REFERENCES releases (id)
);
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    cohort INTEGER REFERENCES cohorts (id),
    site TEXT NOT NULL,
    first_seen TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_cohort ON records (cohort);
CREATE TABLE IF NOT EXISTS budgets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""

MECHANISM_DPSGD = "dp-sgd"  # Poisson-subsampled Gaussian, per-sample clipping
MECHANISM_GAUSSIAN_SUM = "gaussian-sum"  # noised sums of clipped per-record values (evaluation)


@dataclass(frozen=True)
class Release:
    site: str
    run_id: str
    round: int
    purpose: str  # "train" or "evaluate"
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    records: int = 0
    created_at: str = ""
    id: int = 0

    @property
    def entry(self) -> tuple[float, float, int]:
        """The release as an accountant's history entry."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float
    accountant: str
    source: str = "site"  # "site" (its policy, lowered), "set-budget" (raised by hand)
    created_at: str = ""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Ledger:
    """Open (creating if needed, owner-only) the ledger at ``path``.

    ``own``: the ledger a site spends from must be its own: a regular file (not a link),
    owned by this user and private to it. Another local user who planted a file at that
    path would otherwise choose the site's budget and split key.
    """

    def __init__(self, path: str | Path, *, own: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_private(self.path)
        if own:
            info = os.lstat(self.path)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() \
                    or info.st_mode & 0o077:
                raise FedrnnError(f"{self.path}: a site's ledger must be a regular file of "
                                  "its own user, readable by no one else (mode 0600)")
        try:
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            # Simulated sites on several workers open one ledger at once: switching the
            # journal mode and creating the tables can meet a lock SQLite's busy timeout
            # does not wait for, so opening retries for as long as that timeout would.
            deadline = time.monotonic() + 60
            while True:
                try:
                    self._set_up()
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except sqlite3.DatabaseError as exc:
            raise FedrnnError(f"{self.path}: not a fedrnn ledger ({exc})") from None

    def _set_up(self) -> None:
        if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            self._db.execute("PRAGMA journal_mode=WAL")
        tables = {r[0] for r in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "charges" in tables:
            raise FedrnnError(f"{self.path}: a ledger of fedrnn 0.1, which accounted per "
                              "file, not per record; keep it for the record and start a "
                              "new ledger")
        if not {"meta", "releases", "cohorts", "records", "budgets"} <= tables:
            self._db.executescript(SCHEMA)  # idempotent; commits by itself
        if self._db.execute("SELECT count(*) FROM meta").fetchone()[0] < 2:
            with self.transaction():
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('split-key', ?)",
                                 (secrets.token_bytes(32),))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` transaction: no other process writes between its reads
        and its writes (a budget check and its charge), and it commits whole or not at all.
        Nested uses join the outer transaction."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- the site's secret and budget -----------------------------------------------------
    @property
    def split_key(self) -> bytes:
        return bytes(self._db.execute("SELECT value FROM meta WHERE key = 'split-key'")
                     .fetchone()[0])

    def budget(self) -> Budget | None:
        row = self._db.execute("SELECT epsilon, delta, accountant, source, created_at "
                               "FROM budgets ORDER BY id DESC LIMIT 1").fetchone()
        return Budget(*row) if row else None

    def budget_changes(self) -> list[Budget]:
        return [Budget(*row) for row in self._db.execute(
            "SELECT epsilon, delta, accountant, source, created_at FROM budgets ORDER BY id")]

    def set_budget(self, budget: Budget) -> None:
        with self.transaction():
            self._db.execute("INSERT INTO budgets (epsilon, delta, accountant, source, "
                             "created_at) VALUES (?, ?, ?, ?, ?)",
                             (float(budget.epsilon), float(budget.delta), budget.accountant,
                              budget.source, _now()))

    # --- records and their histories ------------------------------------------------------
    def cohorts_of(self, keys: Iterable[str]) -> dict[int | None, list[str]]:
        """The given records grouped by cohort (None: never used in a release)."""
        self._load_keys(keys)
        groups: dict[int | None, list[str]] = {}
        for key, cohort in self._db.execute(
                "SELECT k.key, r.cohort FROM temp.wanted k LEFT JOIN records r USING (key)"):
            groups.setdefault(cohort, []).append(key)
        return groups

    def cohorts_of_site(self, site: str | None = None) -> dict[int | None, int]:
        """Cohort -> number of records, of one site's records (all sites: None)."""
        query = "SELECT cohort, count(*) FROM records"
        args: tuple = ()
        if site is not None:
            query += " WHERE site = ?"
            args = (site,)
        return dict(self._db.execute(query + " GROUP BY cohort", args).fetchall())

    def sites(self) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT site FROM records UNION SELECT site FROM releases ORDER BY 1")]

    def releases_of(self, cohort: int | None) -> list[Release]:
        """The releases a cohort's records took part in, oldest first."""
        if cohort is None:
            return []
        rows = self._db.execute(
            "WITH RECURSIVE chain (id, parent, release) AS ("
            "  SELECT id, parent, release FROM cohorts WHERE id = ?"
            "  UNION ALL SELECT c.id, c.parent, c.release FROM cohorts c"
            "  JOIN chain ON c.id = chain.parent) "
            f"SELECT {_RELEASE_COLUMNS} FROM chain JOIN releases r ON r.id = chain.release "
            "ORDER BY r.id", (cohort,))
        return [Release(*row) for row in rows]

    def history(self, cohort: int | None) -> History:
        return [r.entry for r in self.releases_of(cohort)]

    def releases(self, site: str | None = None) -> list[Release]:
        query = f"SELECT {_RELEASE_COLUMNS} FROM releases r"
        args: tuple = ()
        if site is not None:
            query += " WHERE r.site = ?"
            args = (site,)
        return [Release(*row) for row in self._db.execute(query + " ORDER BY r.id", args)]

    def record_release(self, release: Release, groups: dict[int | None, list[str]]) -> int:
        """Write ``release`` as used by the records in ``groups`` (cohort -> keys, as
        ``cohorts_of`` gave them); every one of them moves to its cohort's child. Call inside
        ``transaction()``, after the budget check, so that both see the same ledger."""
        if not self._db.in_transaction:
            raise RuntimeError("record_release outside a transaction")
        now = _now()
        cursor = self._db.execute(
            "INSERT INTO releases (site, run_id, round, purpose, mechanism, noise_multiplier, "
            "sample_rate, steps, clip_norm, delta, records, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (release.site, release.run_id, release.round, release.purpose, release.mechanism,
             float(release.noise_multiplier), float(release.sample_rate), int(release.steps),
             float(release.clip_norm), float(release.delta),
             sum(len(keys) for keys in groups.values()), now))
        release_id = int(cursor.lastrowid)
        for cohort, keys in groups.items():
            child = int(self._db.execute("INSERT INTO cohorts (parent, release) VALUES (?, ?)",
                                         (cohort, release_id)).lastrowid)
            self._db.executemany(
                "INSERT INTO records (key, cohort, site, first_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET cohort = excluded.cohort, site = excluded.site",
                [(k, child, release.site, now) for k in keys])
        return release_id

    def _load_keys(self, keys: Iterable[str]) -> None:
        self._db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (key TEXT PRIMARY KEY) "
                         "WITHOUT ROWID")
        self._db.execute("DELETE FROM temp.wanted")
        self._db.executemany("INSERT OR IGNORE INTO temp.wanted VALUES (?)",
                             ((k,) for k in keys))

    def check_integrity(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


_RELEASE_COLUMNS = ("r.site, r.run_id, r.round, r.purpose, r.mechanism, r.noise_multiplier, "
                    "r.sample_rate, r.steps, r.clip_norm, r.delta, r.records, r.created_at, r.id")
