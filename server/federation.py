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
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server.records import RunRecord
from server.sampling import (
    ClientSampler,
    is_simulation,
    nodes_in_partition_order,
    simulation_slots,
    wait_for_nodes,
)
from server.strategy import EPSILON_MAX, build_strategy, user_level_release
from shared import protocol as P
from shared.config import RunConfig
from shared.data import resolve
from shared.errors import FedrnnError
from shared.models import build_model
from shared.privacy import History, epsilon
from shared.tasks import METRICS

log = logging.getLogger("fedrnn")


def default_out_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """Run ``config.rounds`` rounds over the sites ``grid`` reaches; returns the run dir."""
    config = resolve(config)
    if not config.out:
        config = config.replace(out=default_out_dir())
    if not config.run_id:
        config = config.replace(run_id=f"{Path(config.out).name}-{uuid.uuid4().hex[:8]}")
    random.seed(config.seed)  # Flower's strategies shuffle the drawn nodes with ``random``
    np.random.seed(config.seed)  # Flower's user-level DP noise draws from numpy's generator
    torch.manual_seed(config.seed)
    model = build_model(config)
    arrays = ArrayRecord(model.state_dict())
    strategy = build_strategy(config, available=config.clients)
    record = RunRecord(config.out, config)
    flat = config.to_flat()
    user_history: History = []
    exhausted: set[int] = set()  # partition ids of sites that declined for lack of budget
    log.info("run directory %s", record.dir)
    slots = is_simulation(grid)  # simulated nodes are worker slots (server.sampling)
    wait_for_nodes(grid, simulation_slots(config) if slots else config.clients)
    if hasattr(grid, "pull_interval"):  # the Simulation Engine's grid polls for replies;
        grid.pull_interval = 0.01  # its 0.1 s default idles up to 0.2 s of every round
    sampler = ClientSampler(nodes_in_partition_order(grid), config, slots=slots)
    timeout = config.round_timeout or None

    for server_round in range(1, config.rounds + 1):
        started = time.monotonic()
        trainers = sampler.assign(sampler.sample(server_round, "train"))
        messages = list(strategy.configure_train(
            server_round, arrays, ConfigRecord({**flat, **sampler.round_config(trainers)}),
            sampler.view(grid, trainers)))
        updates, declined, lost = _exchange(grid, messages, "train", timeout=timeout)
        # replies arrive in any order; summed in partition order, a seeded run repeats bit
        # for bit
        updates.sort(key=lambda m: trainers[m.metadata.src_node_id])
        exhausted |= {trainers[m.metadata.src_node_id] for m in declined}
        new_arrays, train_metrics = strategy.aggregate_train(server_round, updates)
        if new_arrays is not None:
            arrays = new_arrays
            if config.user_level:
                user_history.append(user_level_release(
                    config, received=len(updates), sampled=len(messages),
                    available=config.clients))
        evaluators = sampler.assign(sampler.sample(server_round, "evaluate"))
        messages = strategy.configure_evaluate(
            server_round, arrays, ConfigRecord({**flat, **sampler.round_config(evaluators)}),
            sampler.view(grid, evaluators))
        evaluations, _, _ = _exchange(grid, messages, "evaluate", timeout=timeout)
        evaluations.sort(key=lambda m: evaluators[m.metadata.src_node_id])
        eval_metrics = strategy.aggregate_evaluate(server_round, evaluations) or {}
        train_metrics = train_metrics or {}
        row = {"round": server_round}
        row.update({name: eval_metrics[name] for name in METRICS[config.task]
                    if name in eval_metrics})
        if "perplexity" in row and not math.isnan(row["loss"]):
            # exp of the token-weighted mean loss: the federation's perplexity (a mean of
            # the clients' perplexities would overstate it, exp being convex)
            row["perplexity"] = math.exp(min(row["loss"], 50.0))
        row["train_loss"] = train_metrics.get(P.TRAIN_LOSS, math.nan)
        row["epsilon_max"] = (train_metrics.get(EPSILON_MAX, math.nan)
                              if config.record_level else math.inf)
        if config.user_level:
            row["user_epsilon"] = epsilon(user_history, delta=config.delta,
                                          accountant=config.accountant)
        row["clients"] = len(updates)
        row["declined"] = len(declined)
        # partition ids of sampled sites whose update never arrived (failed, or too late)
        row["dropped"] = sorted(trainers[n] for n in lost["failed"])
        row["timed_out"] = sorted(trainers[n] for n in lost["timed_out"])
        row["seconds"] = round(time.monotonic() - started, 3)
        record.add_round(row)
        log.info("%s", _progress_line(row, config))
        if len(exhausted) >= config.clients:
            log.warning("every site's privacy budget is spent: stopping after round %d "
                        "(fedrnn audit %s shows each site's spend)", server_round, record.dir)
            break

    final_model = build_model(config)
    final_model.load_state_dict(arrays.to_torch_state_dict())
    spent = [r["epsilon_max"] for r in record.rows
             if isinstance(r.get("epsilon_max"), float) and not math.isnan(r["epsilon_max"])]
    record.finish(final_model.state_dict(), privacy={
        "level": config.dp_level if config.dp else "none",
        # None when no site trained in this run: the ledgers (fedrnn audit) hold the spend
        "epsilon_max": (max(spent) if spent else None) if config.record_level else math.inf,
        "delta": config.delta if config.dp else None,
        "accountant": config.accountant if config.dp else None,
        "epsilon_target": config.epsilon if config.calibrate_noise else None,
        "noise_multiplier": config.noise_multiplier or None,
        "clip_norm": config.clip_norm if config.record_level else None,
        "budget_epsilon": config.site_budget[0] if config.record_level else None,
        "budget_delta": config.site_budget[1] if config.record_level else None,
        "sites_out_of_budget": len(exhausted),
        # absolute, so that an audit run from another directory finds the ledgers
        "ledger_dir": str(config.ledger_root.resolve()) if config.record_level else None,
        "user_level": _user_level_summary(config, user_history),
    })
    if exhausted:
        log.warning("%d of %d sites ran out of privacy budget and declined to train",
                    len(exhausted), config.clients)
    log.info("done: %s", record.dir)
    return record.dir


def _user_level_summary(config: RunConfig, history: History) -> dict | None:
    if not config.user_level:
        return None
    return {
        "epsilon": epsilon(history, delta=config.delta, accountant=config.accountant),
        "delta": config.delta, "accountant": config.accountant,
        "noise_multiplier": config.user_noise_multiplier, "clip_norm": config.user_clip_norm,
        "history": [{"noise_multiplier": s, "sample_rate": q, "steps": n}
                    for s, q, n in history],
    }


def _exchange(grid: Grid, messages, phase: str, *, timeout: float | None = None,
              ) -> tuple[list[Message], list[Message], dict[str, list[int]]]:
    """Send one phase's messages; returns (replies with content, budget declines, lost),
    ``lost`` being the node ids that failed (``failed``) or did not reply within
    ``timeout`` seconds (``timed_out``).

    A decline is a site's refusal, not a failure: it is logged with the site's reason.
    Failures are logged, and fatal only if every site failed.
    """
    messages = list(messages)
    if not messages:
        return [], [], {"failed": [], "timed_out": []}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    ok = [m for m in replies if not m.has_error()]
    declined = [m for m in replies if m.has_error() and m.error.code == P.DECLINED_BUDGET]
    failed = [m for m in replies if m.has_error() and m.error.code != P.DECLINED_BUDGET]
    for m in declined:
        log.info("%s", m.error.reason)
    for m in failed:
        level = logging.DEBUG if m.error.code == P.DROPPED_OUT else logging.WARNING
        log.log(level, "%s failed at node %s: %s", phase, m.metadata.src_node_id,
                m.error.reason)
    replied = {m.metadata.src_node_id for m in replies}
    late = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in replied]
    if late:
        log.info("%s: %d site(s) did not reply within %s s", phase, len(late), timeout)
    injected = any(m.error.code == P.DROPPED_OUT for m in failed)
    if failed and not ok and not declined and not injected:
        raise FedrnnError(f"every client failed to {phase}; first error: {failed[0].error.reason}")
    return ok, declined, {"failed": [m.metadata.src_node_id for m in failed], "timed_out": late}


def _progress_line(row: dict, config: RunConfig) -> str:
    parts = [f"round {row['round']:>3}/{config.rounds}", f"clients {row['clients']}"]
    if row.get("declined"):
        parts.append(f"declined {row['declined']} (budget)")
    if row.get("dropped") or row.get("timed_out"):
        parts.append(f"lost {len(row['dropped'])} dropped, {len(row['timed_out'])} late")
    for name in METRICS[config.task]:
        value = row.get(name)
        if isinstance(value, float) and not math.isnan(value):
            parts.append(f"{name} {value:.4f}")
    eps = row["epsilon_max"]
    if not math.isinf(eps):
        parts.append(f"epsilon {eps:.3f}")
    if "user_epsilon" in row:
        parts.append(f"user epsilon {row['user_epsilon']:.3f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)
