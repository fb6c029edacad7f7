"""Early stopping: the best round so far, and whether the run should end.

The server watches one metric of the federated evaluation (``early-stopping-metric``,
by default the task's main one) and ends the run once it has not improved by more than
``early-stopping-min-delta`` for ``early-stopping-patience`` rounds. A round whose metric
is undefined (NaN: no evaluation reply, AUROC over one class) neither improves nor counts
against the patience. The state travels in the server's checkpoint, so a resumed run
stops where the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.tasks import get_task
from fedrnn.shared.tasks.base import HIGHER_IS_BETTER


def watched_metric(config: RunConfig) -> str:
    """The metric early stopping watches; ``ConfigError`` if the task reports no such one."""
    task = get_task(config.task)
    metric = config.early_stopping_metric or task.main_metric
    if metric not in task.metrics:
        raise ConfigError(f"early-stopping-metric {metric!r} is not a metric of task "
                          f"{config.task} (one of: {', '.join(task.metrics)})")
    return metric


@dataclass
class EarlyStopping:
    """The best value of ``metric`` so far, the round it came from, and rounds since."""

    metric: str
    higher_is_better: bool
    patience: int  # 0: never stop (the best round is still tracked)
    min_delta: float
    best: float | None = None
    best_round: int | None = None
    stale: int = 0  # rounds with a defined metric since the best one
    stopped: bool = False  # sticky: the run was told to end

    @classmethod
    def of(cls, config: RunConfig) -> EarlyStopping:
        metric = watched_metric(config)
        return cls(metric=metric, higher_is_better=metric in HIGHER_IS_BETTER,
                   patience=config.early_stopping_patience,
                   min_delta=config.early_stopping_min_delta)

    @property
    def active(self) -> bool:
        return self.patience > 0

    def update(self, server_round: int, metrics: dict[str, float]) -> bool:
        """Take ``server_round``'s evaluation metrics; returns whether it is the new best."""
        value = metrics.get(self.metric, math.nan)
        if not math.isfinite(value):
            return False
        gain = (value - self.best if self.higher_is_better else self.best - value
                ) if self.best is not None else math.inf
        if gain > self.min_delta:
            self.best, self.best_round, self.stale = value, server_round, 0
            return True
        self.stale += 1
        if self.active and self.stale >= self.patience:
            self.stopped = True
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state; the settings stay this run's."""
        self.best, self.best_round = state["best"], state["best_round"]
        self.stale, self.stopped = state["stale"], state["stopped"]
