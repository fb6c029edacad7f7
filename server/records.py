"""The run directory: what a finished (or running) federation leaves on disk.

- ``config.toml``: the resolved config, enough to rebuild the model (``load_trained``);
- ``metrics.jsonl``: one JSON object per round, appended as each round ends;
- ``summary.json``: ``final`` metrics and the ``privacy`` spent;
- ``model.pt``: the final global ``state_dict``;
- ``model.json``: its card (``shared.model_card``): all that uses the model away from the run;
- ``model_best.pt``: with early stopping, the ``state_dict`` of the best round (the same
  card describes it);
- ``metrics.png``: the task's metrics and epsilon over rounds;
- ``checkpoint.pt``: the state after the last completed round (``server.checkpoint``).
Files are written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

from fedrnn.shared.config import RunConfig, dump_toml
from fedrnn.shared.files import write_atomic
from fedrnn.shared.model_card import ModelCard, write_model
from fedrnn.shared.plots import png_bytes, pyplot
from fedrnn.shared.run_records import (
    METRICS_FILE,
    SUMMARY_FILE,
    PrivacySummary,
    RoundRow,
    RunSummary,
    read_rows,
)
from fedrnn.shared.tasks import METRICS

BEST_WEIGHTS_FILE = "model_best.pt"


class RunRecord:
    """Writes one run directory. Create it before round 1; call ``add_round`` after each."""

    def __init__(self, out_dir: str | Path, config: RunConfig, *, resume_after: int = 0) -> None:
        """A new record, or with ``resume_after`` N the existing one cut back to its first
        N rounds (a round logged after the last checkpoint is run again)."""
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rows: list[RoundRow] = []
        if resume_after:
            self.rows = [r for r in read_rows(self.dir) if r.round <= resume_after]
        else:
            write_atomic(self.dir / "config.toml", dump_toml(config).encode())
        write_atomic(self.dir / METRICS_FILE, "".join(r.to_line() for r in self.rows).encode())

    def add_round(self, row: RoundRow) -> None:
        self.rows.append(row)
        with (self.dir / METRICS_FILE).open("a") as fh:
            fh.write(row.to_line())

    def finish(self, state_dict: dict[str, torch.Tensor], privacy: PrivacySummary, *,
               best_round: int | None = None, stopped_early: bool = False,
               best_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if best_state_dict is not None:
            buffer = io.BytesIO()
            torch.save(best_state_dict, buffer)
            write_atomic(self.dir / BEST_WEIGHTS_FILE, buffer.getvalue())
        write_model(self.dir, self.card(privacy), state_dict)
        final = {k: v for k, v in (self.rows[-1].metrics if self.rows else {}).items()
                 if k in METRICS[self.config.task]}
        summary = RunSummary(final=final, rounds=len(self.rows),
                             clients_total=self.config.clients, privacy=privacy,
                             best_round=best_round, stopped_early=stopped_early)
        write_atomic(self.dir / SUMMARY_FILE, json.dumps(summary.to_json(), indent=2).encode())
        self.plot()

    def card(self, privacy: PrivacySummary) -> ModelCard:
        """The card of a model this run trained (``model.json``; give any other weights the
        run saves, such as a best round's, the same card beside them)."""
        return ModelCard.describe(self.config, privacy,
                                  reference_scaling=self.reference_scaling(privacy))

    def reference_scaling(self, privacy: PrivacySummary) -> dict[str, tuple[float, float]] | None:
        """The public (mean, std) per feature the sites standardised with, or None when each
        site used its own statistics.

        Simulated clients use the values a built-in dataset fixes; a deployed site always
        standardises its own file itself, whatever dataset gave the run its schema. A
        deployed run is one with record-level DP whose ledgers the server does not hold
        (``PrivacySummary.ledger_dir``); without record-level DP deployed sites decline, so
        the sites that trained were simulated.
        """
        from fedrnn.shared.data import reference_scaling

        if self.config.record_level and privacy.ledger_dir is None:
            return None
        return reference_scaling(self.config)

    def plot(self) -> Path:
        plt = pyplot()

        def value(row: RoundRow, name: str) -> float:
            y = row.epsilon_max if name == "epsilon_max" else row.metrics.get(name, math.nan)
            return y if math.isfinite(y) else math.nan  # undefined or unbounded: no point

        names = [m for m in METRICS[self.config.task]
                 if any(not math.isnan(r.metrics.get(m, math.nan)) for r in self.rows)]
        panels = [*names, "epsilon_max"]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
        rounds = [r.round for r in self.rows]
        for ax, name in zip(axes[0], panels, strict=True):
            ys = [value(r, name) for r in self.rows]
            ax.plot(rounds, ys, marker="o", markersize=3)
            ax.set_title(name if name != "epsilon_max" else "epsilon (max over sites)")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{self.config.dataset if not self.config.data else self.config.data}: "
                     f"{self.config.task}, {self.config.model}"
                     + (f", eps target {self.config.epsilon:g}" if self.config.dp else ", no DP"))
        fig.tight_layout()
        image = png_bytes(fig)
        path = self.dir / "metrics.png"
        write_atomic(path, image)
        return path
