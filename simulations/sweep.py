"""``fedrnn simulate --sweep KEY=V1,V2,...``: one simulation per value, and the table.

Several ``--sweep`` flags make a grid (every combination). Each variant is an ordinary
run directory under the sweep's ``--out``, named for its values, with its own ledgers
(so one variant's spend never counts against another's budget). The sweep writes
``sweep.csv`` and ``sweep.json`` (one row per variant: its values, final metrics, the
epsilon spent) and ``sweep.png`` (each metric against the first swept key).

``epsilon=inf`` is DP-SGD with clipping and no noise: the point of a privacy-utility
curve where privacy costs nothing but clipping (use ``--no-dp`` for no clipping either).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.files import write_atomic
from fedrnn.shared.plots import png_bytes, pyplot
from fedrnn.shared.run_records import json_value, read_summary
from fedrnn.shared.tasks import METRICS

log = logging.getLogger("fedrnn")


def parse_sweeps(specs: list[str], base: RunConfig) -> list[tuple[str, list[str]]]:
    """``["epsilon=1,3,inf"]`` -> ``[("epsilon", ["1", "3", "inf"])]``, every value checked."""
    sweeps: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise ConfigError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. epsilon=1,3,8,inf)")
        if key in ("out", "ledger-dir", "run-id"):
            raise ConfigError(f"--sweep {key}: each variant already gets its own")
        if key in (k for k, _ in sweeps):
            raise ConfigError(f"--sweep {key} given twice; list all its values in one flag")
        for value in items:  # an unknown key or a bad value fails before anything runs
            RunConfig.from_flat({key: value}, base=base)
        sweeps.append((key, items))
    return sweeps


def variants(base: RunConfig, sweeps: list[tuple[str, list[str]]],
             out: Path) -> list[tuple[dict[str, str], RunConfig]]:
    """Every combination of the swept values, as (values, config of that run)."""
    result = []
    for combo in itertools.product(*(values for _, values in sweeps)):
        values = {key: value for (key, _), value in zip(sweeps, combo, strict=True)}
        name = ",".join(f"{k}={v}" for k, v in values.items())
        config = RunConfig.from_flat(values, base=base).replace(out=str(out / name))
        if base.ledger_dir:
            config = config.replace(ledger_dir=str(Path(base.ledger_dir) / name))
        result.append((values, config))
    return result


def run_sweep(base: RunConfig, specs: list[str], *, verbose: bool = False) -> Path:
    """Run every variant; returns the sweep directory with its table and plot."""
    from fedrnn.simulations.simulate import simulate

    sweeps = parse_sweeps(specs, base)
    out = Path(base.out or Path("runs") / f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    if (out / "sweep.json").exists():
        raise ConfigError(f"{out} already holds a sweep; choose another --out or remove it")
    todo = variants(base, sweeps, out)
    rows = []
    for i, (values, config) in enumerate(todo, 1):
        log.info("sweep %d/%d: %s", i, len(todo), ", ".join(f"{k} {v}" for k, v in values.items()))
        run_dir = simulate(config, verbose=verbose)
        summary = read_summary(run_dir)
        spent = summary.privacy.epsilon_max
        if spent is None and config.mechanism.sites_run_dpsgd and math.isinf(config.epsilon):
            spent = math.inf  # clipping without noise
        # the table holds the values as summary.json does: undefined null, unbounded "inf"
        rows.append({**values, **{k: json_value(v) for k, v in summary.final.items()},
                     "epsilon_spent": json_value(spent), "rounds": summary.rounds,
                     "run": run_dir.name})
    write_table(out, rows, [k for k, _ in sweeps], task=base.task)
    return out


def write_table(out: Path, rows: list[dict[str, Any]], keys: list[str], *, task: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "sweep.csv", buffer.getvalue().encode())
    write_atomic(out / "sweep.json", json.dumps({"keys": keys, "rows": rows}, indent=2).encode())
    write_atomic(out / "sweep.png", plot(rows, keys, METRICS[task]))


def plot(rows: list[dict[str, Any]], keys: list[str], metrics: tuple[str, ...]) -> bytes:
    """Each metric against the first swept key, one line per combination of the others."""
    plt = pyplot()

    x_key, others = keys[0], keys[1:]
    x_values = list(dict.fromkeys(row[x_key] for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(", ".join(f"{k}={row[k]}" for k in others), []).append(row)
        for label, group in groups.items():
            ys = {row[x_key]: row.get(metric) for row in group}
            # the swept values as given (inf included) at even spacing, in the given order
            ax.plot(range(len(x_values)),
                    [_number(ys.get(x)) for x in x_values], marker="o", label=label or None)
        ax.set_xticks(range(len(x_values)), x_values)
        ax.set_xlabel(x_key)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row if c != "run"))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def main_sweep(base: RunConfig, specs: list[str], *, verbose: bool = False) -> int:
    out = run_sweep(base, specs, verbose=verbose)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    print(format_table(rows))
    print(f"sweep directory: {out} (sweep.csv, sweep.json, sweep.png, one run per variant)")
    return 0
