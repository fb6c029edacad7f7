"""The run directory: what a finished (or running) federation leaves on disk.

- ``config.toml``: the resolved config, enough to rebuild the model (``load_trained``);
- ``metrics.jsonl``: one JSON object per round, appended as each round ends;
- ``summary.json``: ``final`` metrics and the ``privacy`` spent;
- ``model.pt``: the final global ``state_dict``;
- ``metrics.png``: the task's metrics and epsilon over rounds;
- ``checkpoint.pt``: the state after the last completed round (``server.checkpoint``).
Files are written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from fedrnn.shared.config import RunConfig, dump_toml
from fedrnn.shared.files import write_atomic
from fedrnn.shared.plots import png_bytes, pyplot
from fedrnn.shared.tasks import METRICS


def _json_value(value: Any) -> Any:
    """JSON has no NaN/Infinity: undefined metrics become null, an infinite epsilon "inf"."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


class RunRecord:
    """Writes one run directory. Create it before round 1; call ``add_round`` after each."""

    def __init__(self, out_dir: str | Path, config: RunConfig, *, resume_after: int = 0) -> None:
        """A new record, or with ``resume_after`` N the existing one cut back to its first
        N rounds (a round logged after the last checkpoint is run again)."""
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rows: list[dict[str, Any]] = []
        if resume_after:
            with (self.dir / "metrics.jsonl").open() as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            self.rows = [r for r in rows if r["round"] <= resume_after]
        else:
            write_atomic(self.dir / "config.toml", dump_toml(config).encode())
        write_atomic(self.dir / "metrics.jsonl",
                     "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def add_round(self, row: dict[str, Any]) -> None:
        row = {k: _json_value(v) for k, v in row.items()}
        self.rows.append(row)
        with (self.dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def finish(self, state_dict: dict[str, torch.Tensor], privacy: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        write_atomic(self.dir / "model.pt", buffer.getvalue())
        final = {k: v for k, v in (self.rows[-1] if self.rows else {}).items()
                 if k in METRICS[self.config.task]}
        summary = {"final": final, "rounds": len(self.rows),
                   "clients_total": self.config.clients,
                   "privacy": {k: _json_value(v) for k, v in privacy.items()}}
        write_atomic(self.dir / "summary.json", json.dumps(summary, indent=2).encode())
        self.plot()

    def plot(self) -> Path:
        plt = pyplot()

        names = [m for m in METRICS[self.config.task] if any(r.get(m) is not None
                                                             for r in self.rows)]
        panels = [*names, "epsilon_max"]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
        rounds = [r["round"] for r in self.rows]
        for ax, name in zip(axes[0], panels, strict=True):
            ys = [r.get(name) for r in self.rows]
            ys = [math.nan if not isinstance(y, (int, float)) else y for y in ys]
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
