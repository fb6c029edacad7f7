"""The federation itself: rounds of sampled training and evaluation, recorded as they end.

Flower's ``Strategy.start`` runs the same loop but reports only when all rounds are done;
fedrnn drives the strategy's own ``configure_*``/``aggregate_*`` steps so that each round
is written to ``metrics.jsonl`` and shown on the console as soon as it ends.
"""

from __future__ import annotations

import logging
import math
import random
import time
from datetime import datetime
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server.records import RunRecord
from server.strategy import CLIENTS, EPSILON_MAX, build_strategy
from shared import protocol as P
from shared.config import RunConfig
from shared.data import resolve
from shared.errors import FedrnnError
from shared.models import build_model
from shared.tasks import METRICS

log = logging.getLogger("fedrnn")


def default_out_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """Run ``config.rounds`` rounds over the sites ``grid`` reaches; returns the run dir."""
    config = resolve(config)
    if not config.out:
        config = config.replace(out=default_out_dir())
    random.seed(config.seed)  # Flower's node sampling draws from ``random``
    torch.manual_seed(config.seed)
    model = build_model(config)
    arrays = ArrayRecord(model.state_dict())
    strategy = build_strategy(config, available=config.clients)
    record = RunRecord(config.out, config)
    flat = config.to_flat()
    log.info("run directory %s", record.dir)

    for server_round in range(1, config.rounds + 1):
        started = time.monotonic()
        replies = _exchange(grid, strategy.configure_train(server_round, arrays,
                                                           ConfigRecord(flat), grid), "train")
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        replies = _exchange(grid, strategy.configure_evaluate(server_round, arrays,
                                                              ConfigRecord(flat), grid), "evaluate")
        eval_metrics = strategy.aggregate_evaluate(server_round, replies) or {}
        train_metrics = train_metrics or {}
        row = {"round": server_round}
        row.update({name: eval_metrics[name] for name in METRICS[config.task]
                    if name in eval_metrics})
        if "perplexity" in row and not math.isnan(row["loss"]):
            # exp of the token-weighted mean loss: the federation's perplexity (a mean of
            # the clients' perplexities would overstate it, exp being convex)
            row["perplexity"] = math.exp(min(row["loss"], 50.0))
        row["train_loss"] = train_metrics.get(P.TRAIN_LOSS, math.nan)
        row["epsilon_max"] = train_metrics.get(EPSILON_MAX, 0.0) if config.dp else math.inf
        row["clients"] = int(train_metrics.get(CLIENTS, 0))
        row["seconds"] = round(time.monotonic() - started, 3)
        record.add_round(row)
        log.info("%s", _progress_line(row, config))

    final_model = build_model(config)
    final_model.load_state_dict(arrays.to_torch_state_dict())
    last = record.rows[-1] if record.rows else {}
    record.finish(final_model.state_dict(), privacy={
        "epsilon_max": last.get("epsilon_max", 0.0) if config.dp else math.inf,
        "delta": config.delta if config.dp else None,
        "accountant": config.accountant if config.dp else None,
        "epsilon_target": config.epsilon if config.calibrate_noise else None,
        "noise_multiplier": config.noise_multiplier or None,
        "clip_norm": config.clip_norm if config.dp else None,
        "level": "record" if config.dp else "none",
    })
    log.info("done: %s", record.dir)
    return record.dir


def _exchange(grid: Grid, messages, phase: str) -> list[Message]:
    """Send one phase's messages; clients' failures are reported, and fatal only if all fail."""
    messages = list(messages)
    if not messages:
        return []
    replies = list(grid.send_and_receive(messages))
    failed = [m for m in replies if m.has_error()]
    for m in failed:
        log.warning("%s failed at node %s: %s", phase, m.metadata.src_node_id, m.error.reason)
    if failed and len(failed) == len(replies):
        raise FedrnnError(f"every client failed to {phase}; first error: {failed[0].error.reason}")
    return replies


def _progress_line(row: dict, config: RunConfig) -> str:
    parts = [f"round {row['round']:>3}/{config.rounds}", f"clients {row['clients']}"]
    for name in METRICS[config.task]:
        value = row.get(name)
        if isinstance(value, float) and not math.isnan(value):
            parts.append(f"{name} {value:.4f}")
    eps = row["epsilon_max"]
    parts.append("epsilon -" if math.isinf(eps) else f"epsilon {eps:.3f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)
