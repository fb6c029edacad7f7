"""The federation itself: rounds of sampled training and evaluation, recorded as they end.

Flower's ``Strategy.start`` runs the same loop but reports only when all rounds are done;
fedrnn drives the strategy's own ``configure_*``/``aggregate_*`` steps so that each round
is written to ``metrics.jsonl`` and shown on the console as soon as it ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedrnn.server import checkpoint
from fedrnn.server.records import RunRecord
from fedrnn.server.sampling import (
    ClientSampler,
    is_simulation,
    nodes_in_partition_order,
    simulation_slots,
    wait_for_nodes,
)
from fedrnn.server.strategy import EPSILON_MAX, build_strategy, user_level_release
from fedrnn.server.validation import Shape, check_evaluate_reply, check_train_reply, uniform_weight
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import resolve
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.models import build_model
from fedrnn.shared.plots import import_in_background
from fedrnn.shared.privacy import History, epsilon
from fedrnn.shared.tasks import METRICS

log = logging.getLogger("fedrnn")

# The clock a round's deadline (--round-timeout) is measured on. A test replaces it to pass
# a deadline at the moment it chooses, instead of racing a real wait on a slow machine.
deadline_clock: Callable[[], float] = time.monotonic


def default_out_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """Run ``config.rounds`` rounds over the sites ``grid`` reaches; returns the run dir."""
    config = resolve(config)
    if not config.out:
        config = config.replace(out=default_out_dir())
    if not config.run_id:
        config = config.replace(run_id=f"{Path(config.out).name}-{uuid.uuid4().hex[:8]}")
    if is_simulation(grid):  # reproducible: the researcher holds every record
        random.seed(config.seed)  # Flower's strategies shuffle the drawn nodes with it
        np.random.seed(config.seed)
    else:
        # Which sites a round samples must be unpredictable to them (the accountant's
        # amplification by sampling assumes it), and the run's seed is sent to every site:
        # Flower's strategies sample with the ``random`` module of ``strategy_utils``,
        # which becomes the operating system's generator here.
        from flwr.serverapp.strategy import strategy_utils

        strategy_utils.random = random.SystemRandom()
    torch.manual_seed(config.seed)  # the initial model, which every site receives anyway
    model = build_model(config)
    arrays = ArrayRecord(model.state_dict())
    strategy = build_strategy(config, available=config.clients,
                              server_draws=is_simulation(grid))
    user_history: History = []
    exhausted: set[int] = set()  # partition ids of sites that declined for lack of budget
    first_round = 1
    saved = checkpoint.load(config.out)
    if saved is not None:
        # A restarted server goes on from the last round it completed.
        arrays = ArrayRecord(saved.weights)
        checkpoint.restore_strategy(strategy, saved.strategy)
        checkpoint.restore_rng(saved.rng)
        user_history = list(saved.user_history)
        first_round = saved.server_round + 1
        log.info("resuming %s after round %d", config.out, saved.server_round)
    record = RunRecord(config.out, config, resume_after=first_round - 1)
    flat = config.to_flat()
    log.info("run directory %s", record.dir)
    sampler = None  # a deployment: Flower's strategy samples the connected sites itself
    if is_simulation(grid):  # the server draws the clients; the nodes are worker slots
        wait_for_nodes(grid, simulation_slots(config))
        grid.pull_interval = 0.01  # its 0.1 s default idles up to 0.2 s of every round
        sampler = ClientSampler(nodes_in_partition_order(grid), config, slots=True)
    timeout = config.round_timeout or None
    # In a simulation a round's evaluation and the next round's training go out together:
    # both start from the weights the round's training produced and their slots differ
    # (sampling.py). The training slots come first, so Flower's engine queues the training
    # first; this loop takes a round's training replies as soon as they are in, and sends
    # the next pair while the workers still evaluate the previous weights. The round's row
    # and checkpoint follow. Workers so never wait on the server's aggregation nor on the
    # engine's pick-up of new messages (every 100 ms): measured on 2 cores, both workers
    # stood idle 0.78 s of an 8 s run between rounds. A deployment keeps the phases apart:
    # there a site may be asked to do both.
    pipelined = sampler is not None

    started = time.monotonic()
    def push_training(server_round: int, arrays: ArrayRecord) -> _Phase:
        if server_round == config.rounds:
            # The figure is drawn once the last round ends: matplotlib is imported while
            # the sites train it (0.33 s of the 0.5 s from the last reply to the run's end).
            import_in_background()
        return _push(grid, strategy, sampler, flat, server_round, "train", arrays,
                     timeout=timeout)

    training = push_training(first_round, arrays)
    # every update must have the global model's names, shapes and dtypes
    shape = Shape.of({k: a.numpy() for k, a in arrays.items()})
    previous: _Trained | None = None  # trained, its evaluation still out
    for server_round in range(first_round, config.rounds + 1):
        try:
            updates, declined, lost = _receive(
                grid, training, functools.partial(check_train_reply, shape=shape))
        except FedrnnError:
            if previous is not None:  # every site failed this round: keep the last one
                with contextlib.suppress(FedrnnError):
                    _finish_round(grid, strategy, record, config, previous, started)
            raise
        trainers = training.partitions
        # replies arrive in any order; summed in partition order, a seeded run repeats bit
        # for bit
        updates.sort(key=lambda m: trainers[m.metadata.src_node_id])
        exhausted |= {trainers[m.metadata.src_node_id] for m in declined}
        if config.user_level:
            updates = [uniform_weight(m) for m in updates]
        new_arrays, train_metrics = strategy.aggregate_train(server_round, updates)
        if new_arrays is not None:
            arrays = new_arrays
            if config.user_level:
                user_history.append(user_level_release(
                    config, received=len(updates), sampled=len(training.messages),
                    available=training.available))
        evaluating = _push(grid, strategy, sampler, flat, server_round, "evaluate", arrays,
                           timeout=timeout)
        go_on = server_round < config.rounds and len(exhausted) < config.clients
        # the state a restart from this round's checkpoint resumes with: the generators
        # before the next round's training draws from them, the rest as this round left it
        # (encoded now, written with the round's row)
        rng = checkpoint.rng_state()
        training = None
        if go_on and pipelined:
            training = push_training(server_round + 1, arrays)
        current = _Trained(
            server_round=server_round, evaluating=evaluating,
            train_metrics=train_metrics or {}, clients=len(updates), declined=len(declined),
            dropped_ids=sorted(trainers[n] for n in lost["failed"] + lost["timed_out"]),
            timed_out=sorted(trainers[n] for n in lost["timed_out"]),
            rejected_ids=sorted(trainers[n] for n in lost["rejected"]),
            user_history=list(user_history),
            checkpoint=checkpoint.encode(checkpoint.Checkpoint(
                server_round=server_round, weights=arrays.to_torch_state_dict(),
                strategy=checkpoint.strategy_state(strategy), user_history=list(user_history),
                rng=rng)))
        if previous is not None:
            started = _finish_round(grid, strategy, record, config, previous, started)
        # this round's row now, unless its evaluation runs beside the next round's training
        previous = current if pipelined and go_on else None
        if previous is None:
            started = _finish_round(grid, strategy, record, config, current, started)
        if len(exhausted) >= config.clients:
            log.warning("every site's privacy budget is spent: stopping after round %d "
                        "(fedrnn audit %s shows each site's spend)", server_round, record.dir)
            break
        if go_on and training is None:
            training = push_training(server_round + 1, arrays)

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
        # (None when deployed: each site keeps its ledger on its own disk)
        "ledger_dir": (str(config.ledger_root.resolve())
                       if config.record_level and config.ledger_root.is_dir() else None),
        "user_level": _user_level_summary(config, user_history),
    })
    (record.dir / checkpoint.CHECKPOINT).unlink(missing_ok=True)  # summary.json marks the end
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


@dataclass
class _Trained:
    """A round whose training is aggregated: what its row and checkpoint need once its
    evaluation is in."""

    server_round: int
    evaluating: _Phase
    train_metrics: dict
    clients: int
    declined: int
    dropped_ids: list[int]  # partition ids whose update never arrived (failed or silent)
    timed_out: list[int]
    rejected_ids: list[int]  # partition ids whose reply failed the server's checks
    user_history: History
    checkpoint: bytes


def _finish_round(grid: Grid, strategy, record: RunRecord, config: RunConfig,  # noqa: ANN001
                  done: _Trained, started: float) -> float:
    """Take ``done``'s evaluation, write its row and checkpoint, show its progress line;
    returns the time the row was written."""
    evaluations, _, lost = _receive(grid, done.evaluating,
                                    lambda m: check_evaluate_reply(m, config.task))
    evaluations.sort(key=lambda m: done.evaluating.partitions[m.metadata.src_node_id])
    eval_metrics = strategy.aggregate_evaluate(done.server_round, evaluations) or {}
    row = {"round": done.server_round}
    row.update({name: eval_metrics[name] for name in METRICS[config.task]
                if name in eval_metrics})
    if "perplexity" in row and not math.isnan(row["loss"]):
        # exp of the token-weighted mean loss: the federation's perplexity (a mean of
        # the clients' perplexities would overstate it, exp being convex)
        row["perplexity"] = math.exp(min(row["loss"], 50.0))
    row["train_loss"] = done.train_metrics.get(P.TRAIN_LOSS, math.nan)
    row["epsilon_max"] = (done.train_metrics.get(EPSILON_MAX, math.nan)
                          if config.record_level else math.inf)
    if config.user_level:
        row["user_epsilon"] = epsilon(done.user_history, delta=config.delta,
                                      accountant=config.accountant)
    row["clients"] = done.clients
    row["declined"] = done.declined
    # sampled sites whose update never arrived: how many, and which (partition ids),
    # failed or silent past the round timeout
    row["dropped"] = len(done.dropped_ids)
    row["dropped_ids"] = done.dropped_ids
    row["timed_out"] = done.timed_out
    # replies that failed the server's checks (server.validation), training and evaluation
    row["rejected_ids"] = sorted({*done.rejected_ids, *(
        done.evaluating.partitions.get(n, n) for n in lost["rejected"])})
    row["rejected"] = len(row["rejected_ids"])
    # wall time since the previous round's row: rounds overlap (the next round's
    # training runs beside this one's evaluation), so these add up to the run's time
    now = time.monotonic()
    row["seconds"] = round(now - started, 3)
    record.add_round(row)
    checkpoint.write(record.dir, done.checkpoint)
    log.info("%s", _progress_line(row, config))
    return now


def _participants(sampler: ClientSampler | None, grid: Grid, flat: dict, server_round: int,
                  phase: str) -> tuple[ConfigRecord, Grid, dict[int, int] | None]:
    """A phase's config, the grid its strategy samples from, and node -> partition id.

    In a simulation the server's seeded draw: a view of just the drawn nodes, whose config
    lists the partition each slot serves. On a deployment (no sampler) the whole grid:
    Flower's strategy waits for and samples the connected sites, each serving itself
    (the mapping is then node -> node id, known once the messages exist).
    """
    if sampler is None:
        return ConfigRecord(flat), grid, None
    assignment = sampler.assign(sampler.sample(server_round, phase), phase)
    return (ConfigRecord({**flat, **sampler.round_config(assignment)}),
            sampler.view(grid, assignment), assignment)


@dataclass
class _Phase:
    """One phase's messages, sent and awaiting replies."""

    name: str
    messages: list[Message]
    ids: set[str]
    partitions: dict[int, int]  # node id -> the partition id it serves
    timeout: float | None
    deadline: float | None
    available: int  # sites it was sampled from: the user-level sampling rate's denominator


def _push(grid: Grid, strategy, sampler: ClientSampler | None, flat: dict,  # noqa: ANN001
          server_round: int, phase: str, arrays: ArrayRecord, *,
          timeout: float | None) -> _Phase:
    """Let the strategy configure ``phase`` of ``server_round`` and send its messages."""
    phase_config, phase_grid, partitions = _participants(sampler, grid, flat, server_round,
                                                         phase)
    if sampler is None:
        phase_grid = _CountingGrid(phase_grid)
    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    messages = list(configure(server_round, arrays, phase_config, phase_grid))
    partitions = partitions or {m.metadata.dst_node_id: m.metadata.dst_node_id
                                for m in messages}
    ids = set(grid.push_messages(messages)) if messages else set()
    # The user-level sampling rate's denominator: the sites the draw was made from. A
    # deployment's round starts once enough sites are connected, which may be fewer than
    # --min-clients: exactly the nodes Flower's draw saw. A simulation: the candidates.
    available = (len(phase_grid.nodes) if isinstance(phase_grid, _CountingGrid)
                 else len(sampler.candidates[phase]))
    return _Phase(phase, messages, ids, partitions, timeout,
                  None if timeout is None else deadline_clock() + timeout, available)


class _CountingGrid:
    """The grid as Flower's strategy sees it, remembering the nodes its last
    ``get_node_ids`` returned: Flower's ``sample_nodes`` draws from exactly that list."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.nodes: list[int] = []

    def get_node_ids(self) -> list[int]:
        self.nodes = list(self._grid.get_node_ids())
        return self.nodes

    def __getattr__(self, name: str):  # noqa: ANN204  everything else is the grid's
        return getattr(self._grid, name)


def _receive(grid: Grid, phase: _Phase, check: Callable[[Message], str | None],
             ) -> tuple[list[Message], list[Message], dict[str, list[int]]]:
    """Wait for ``phase``'s replies; returns (valid replies with content, budget declines,
    lost), ``lost`` being the node ids that failed (``failed``), sent no reply within the
    round timeout (``timed_out``), or sent a reply ``check`` rejected (``rejected``: one
    log line each, with the reason).

    A decline is a site's refusal, not a failure: it is logged with the site's reason.
    Failures are logged, and fatal only if no site sent a valid reply (injected dropouts
    aside).
    """
    messages = phase.messages
    if not messages:
        return [], [], {"failed": [], "timed_out": [], "rejected": []}
    pending, replies = set(phase.ids), []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if not pending or (phase.deadline is not None and deadline_clock() >= phase.deadline):
            break
        time.sleep(getattr(grid, "pull_interval", 0.1))
    name = phase.name
    ok, rejected = [], []
    for m in replies:
        if m.has_error():
            continue
        if not m.has_content():
            reason = "it carries neither content nor an error"
        else:
            try:
                reason = check(m)
            except Exception as exc:  # noqa: BLE001  whatever a reply holds, it is only rejected
                reason = f"it cannot be read ({type(exc).__name__})"
        if reason is None:
            ok.append(m)
        else:
            rejected.append(m)
            log.warning("%s reply of site %s rejected: %s", name,
                        phase.partitions.get(m.metadata.src_node_id, m.metadata.src_node_id),
                        reason)
    declined = [m for m in replies if m.has_error() and m.error.code == P.DECLINED_BUDGET]
    failed = [m for m in replies if m.has_error() and m.error.code != P.DECLINED_BUDGET]
    for m in declined:
        log.info("%s", m.error.reason)
    for m in failed:
        level = logging.DEBUG if m.error.code == P.DROPPED_OUT else logging.WARNING
        log.log(level, "%s failed at node %s: %s", name, m.metadata.src_node_id,
                m.error.reason)
    replied = {m.metadata.src_node_id for m in replies}
    late = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in replied]
    if late:
        log.warning("%d site(s) sent no %s reply within the round timeout (%gs): the round "
                    "goes on without them", len(late), name, phase.timeout)
    injected = any(m.error.code == P.DROPPED_OUT for m in failed)
    if not ok and not declined and (failed or late or rejected) and not injected:
        first = (failed[0].error.reason if failed else "its reply was rejected" if rejected
                 else "no site replied in time")
        raise FedrnnError(f"no site sent a valid {name} reply; the first: {first}")
    return ok, declined, {"failed": [m.metadata.src_node_id for m in failed],
                          "timed_out": late,
                          "rejected": [m.metadata.src_node_id for m in rejected]}


def _progress_line(row: dict, config: RunConfig) -> str:
    parts = [f"round {row['round']:>3}/{config.rounds}", f"clients {row['clients']}"]
    if row.get("declined"):
        parts.append(f"declined {row['declined']} (budget)")
    if row.get("dropped"):
        parts.append(f"dropped {row['dropped']}")
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
