"""The rows of ``metrics.jsonl`` and the ``summary.json`` of a run directory, typed.

The server writes them (``fedrnn.server.records``); the CLI, the audit, sweeps and the
benchmarks read them. Each type converts itself to and from the JSON object on disk
(``to_json``/``from_json``), so that the file format is defined here only.

JSON has no NaN nor Infinity. In memory an undefined number (no evaluation reply, no
site trained) is ``math.nan`` and an unbounded one (no record-level DP) ``math.inf``; on
disk they are ``null`` and ``"inf"`` (``json_value``), and read back as NaN and inf. A
``None`` in a privacy field means "does not apply to this run" and is ``null`` on disk.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrnn.shared.errors import FedrnnError

if TYPE_CHECKING:  # a type only: readers of a run directory need no numpy
    from fedrnn.shared.privacy import History

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def json_value(value: Any) -> Any:
    """A number as JSON can hold it: NaN becomes None (null), an infinity "inf"/"-inf"."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _number(value: Any) -> float:
    """``json_value`` undone for a number that is always defined in memory: null is NaN."""
    return math.nan if value is None else float(value)  # float("inf") is inf


def _optional(value: Any) -> Any:
    """``json_value`` undone for a field where null means "does not apply" (None)."""
    return float(value) if value in ("inf", "-inf") else value


# The keys a row holds besides the task's evaluation metrics, in their order on disk.
_ROW_KEYS = ("round", "train_loss", "epsilon_max", "user_epsilon", "clients", "declined",
             "dropped", "dropped_ids", "timed_out", "rejected_ids", "rejected", "seconds")


@dataclass
class RoundRow:
    """One line of ``metrics.jsonl``: a completed round."""

    round: int
    # the task's evaluation metrics (``shared.tasks.METRICS``) the round's evaluation
    # replies gave, aggregated over the sites; NaN if undefined
    metrics: dict[str, float]
    train_loss: float  # the sites' mean training loss; NaN when none reported one
    epsilon_max: float  # the largest per-record epsilon of any site; inf without record DP
    clients: int  # sites whose update was aggregated
    declined: int  # sites that declined for lack of privacy budget
    dropped_ids: list[int]  # partition ids whose update never arrived (failed or silent)
    timed_out: list[int]  # of those, the ones silent past the round timeout
    rejected_ids: list[int]  # replies that failed the server's checks (server.validation)
    seconds: float  # wall time since the previous round's row
    user_epsilon: float | None = None  # user-level DP's epsilon so far; None without it

    @property
    def dropped(self) -> int:
        return len(self.dropped_ids)

    @property
    def rejected(self) -> int:
        return len(self.rejected_ids)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this row, keys in their order on disk."""
        row: dict[str, Any] = {"round": self.round}
        row.update({name: json_value(v) for name, v in self.metrics.items()})
        row["train_loss"] = json_value(self.train_loss)
        row["epsilon_max"] = json_value(self.epsilon_max)
        if self.user_epsilon is not None:
            row["user_epsilon"] = json_value(self.user_epsilon)
        row.update({"clients": self.clients, "declined": self.declined,
                    "dropped": self.dropped, "dropped_ids": list(self.dropped_ids),
                    "timed_out": list(self.timed_out), "rejected_ids": list(self.rejected_ids),
                    "rejected": self.rejected, "seconds": self.seconds})
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RoundRow:
        """The row a ``to_json`` object describes; every key but the fixed ones is a metric."""
        return cls(
            round=int(row["round"]),
            metrics={k: _number(v) for k, v in row.items() if k not in _ROW_KEYS},
            train_loss=_number(row["train_loss"]), epsilon_max=_number(row["epsilon_max"]),
            user_epsilon=_number(row["user_epsilon"]) if "user_epsilon" in row else None,
            clients=int(row["clients"]), declined=int(row["declined"]),
            dropped_ids=[int(i) for i in row["dropped_ids"]],
            timed_out=[int(i) for i in row["timed_out"]],
            rejected_ids=[int(i) for i in row["rejected_ids"]],
            seconds=float(row["seconds"]))

    def to_line(self) -> str:
        """The row as one line of ``metrics.jsonl``, newline included."""
        return json.dumps(self.to_json()) + "\n"


@dataclass
class UserLevelSummary:
    """User-level (whole-site) DP's accounting, kept by the server."""

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    clip_norm: float
    history: History = field(default_factory=list)  # (noise multiplier, sample rate, steps)

    def to_json(self) -> dict[str, Any]:
        return {"epsilon": json_value(self.epsilon), "delta": self.delta,
                "accountant": self.accountant, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm,
                "history": [{"noise_multiplier": s, "sample_rate": q, "steps": n}
                            for s, q, n in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UserLevelSummary:
        return cls(epsilon=_number(data["epsilon"]), delta=data["delta"],
                   accountant=data["accountant"], noise_multiplier=data["noise_multiplier"],
                   clip_norm=data["clip_norm"],
                   history=[(h["noise_multiplier"], h["sample_rate"], h["steps"])
                            for h in data["history"]])


@dataclass
class PrivacySummary:
    """What the run spent and under which settings. ``None``: does not apply to the run."""

    level: str  # "record", "user", "both" or "none"
    # the largest per-record epsilon of any site after the run; None when no site trained
    # in it (the ledgers, ``fedrnn audit``, hold the spend); inf without record-level DP
    epsilon_max: float | None
    delta: float | None
    accountant: str | None
    epsilon_target: float | None
    noise_multiplier: float | None
    clip_norm: float | None
    budget_epsilon: float | None
    budget_delta: float | None
    sites_out_of_budget: int
    # absolute path of the simulated sites' ledgers; None when deployed (each site keeps
    # its ledger on its own disk)
    ledger_dir: str | None
    user_level: UserLevelSummary | None

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level, "epsilon_max": json_value(self.epsilon_max),
            "delta": json_value(self.delta), "accountant": self.accountant,
            "epsilon_target": json_value(self.epsilon_target),
            "noise_multiplier": json_value(self.noise_multiplier),
            "clip_norm": json_value(self.clip_norm),
            "budget_epsilon": json_value(self.budget_epsilon),
            "budget_delta": json_value(self.budget_delta),
            "sites_out_of_budget": self.sites_out_of_budget, "ledger_dir": self.ledger_dir,
            "user_level": None if self.user_level is None else self.user_level.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacySummary:
        user = data.get("user_level")
        return cls(
            level=data["level"], epsilon_max=_optional(data["epsilon_max"]),
            delta=_optional(data["delta"]), accountant=data["accountant"],
            epsilon_target=_optional(data["epsilon_target"]),
            noise_multiplier=_optional(data["noise_multiplier"]),
            clip_norm=_optional(data["clip_norm"]),
            budget_epsilon=_optional(data["budget_epsilon"]),
            budget_delta=_optional(data["budget_delta"]),
            sites_out_of_budget=int(data.get("sites_out_of_budget", 0)),
            ledger_dir=data.get("ledger_dir"),
            user_level=None if user is None else UserLevelSummary.from_json(user))


@dataclass
class RunSummary:
    """``summary.json``: written once the run is complete (its presence marks the end)."""

    final: dict[str, float]  # the last round's evaluation metrics; NaN if undefined
    rounds: int  # rounds recorded in metrics.jsonl
    clients_total: int
    privacy: PrivacySummary
    # the round whose evaluation was best by the early-stopping metric (its weights are
    # model_best.pt when early stopping is on); None when no round's metric was defined
    best_round: int | None = None
    stopped_early: bool = False  # the run ended before its announced rounds (patience)

    def to_json(self) -> dict[str, Any]:
        return {"final": {k: json_value(v) for k, v in self.final.items()},
                "rounds": self.rounds, "clients_total": self.clients_total,
                "privacy": self.privacy.to_json(), "best_round": self.best_round,
                "stopped_early": self.stopped_early}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        best = data.get("best_round")  # absent from the summaries of older versions
        return cls(final={k: _number(v) for k, v in data["final"].items()},
                   rounds=int(data["rounds"]), clients_total=int(data["clients_total"]),
                   privacy=PrivacySummary.from_json(data["privacy"]),
                   best_round=None if best is None else int(best),
                   stopped_early=bool(data.get("stopped_early", False)))


def read_rows(run_dir: str | Path) -> list[RoundRow]:
    """The rows of ``run_dir``'s ``metrics.jsonl``, in the order written."""
    path = Path(run_dir) / METRICS_FILE
    with _readable(path), path.open() as fh:
        return [RoundRow.from_json(json.loads(line)) for line in fh if line.strip()]


def read_summary(run_dir: str | Path) -> RunSummary:
    """``run_dir``'s ``summary.json``."""
    path = Path(run_dir) / SUMMARY_FILE
    with _readable(path):
        return RunSummary.from_json(json.loads(path.read_text()))


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A file that is not what fedrnn writes ends in one line naming it."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError too
        raise FedrnnError(f"{path}: not a fedrnn run record ({type(exc).__name__}: {exc})"
                          ) from None
