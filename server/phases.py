"""The phases of a federated round, and the run's state between them.

``server.federation`` runs them in a loop; each is a method of ``Federation``: push a
round's training, receive its replies, aggregate them, push its evaluation, take the
round's snapshot (its checkpoint), and record the round once its evaluation is in (its
row in ``metrics.jsonl``, its checkpoint on disk, its progress line).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedrnn.server import checkpoint
from fedrnn.server.initial import initial_weights
from fedrnn.server.messaging import Phase, push, receive
from fedrnn.server.records import RunRecord
from fedrnn.server.sampling import (
    ClientSampler,
    is_simulation,
    nodes_in_partition_order,
    simulation_slots,
    wait_for_nodes,
)
from fedrnn.server.stopping import EarlyStopping
from fedrnn.server.strategy import (
    EPSILON_MAX,
    aggregate_metrics,
    build_strategy,
    user_level_release,
)
from fedrnn.server.validation import Shape, check_evaluate_reply, check_train_reply, uniform_weight
from fedrnn.shared import canary_clients, canary_releases
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import partition_corpus, partition_sizes
from fedrnn.shared.data.canaries import draw_path
from fedrnn.shared.errors import ConfigError, FedrnnError
from fedrnn.shared.models import build_model
from fedrnn.shared.plots import import_in_background
from fedrnn.shared.privacy import History, epsilon
from fedrnn.shared.run_records import PrivacySummary, RoundRow, UserLevelSummary
from fedrnn.shared.tasks import METRICS

log = logging.getLogger("fedrnn")


@dataclass
class Received:
    """A round's training replies: valid updates (in partition order), declines, losses."""

    phase: Phase
    updates: list[Message]
    declined: list[Message]
    lost: dict[str, list[int]]  # node ids: "failed", "timed_out", "rejected" (messaging)
    # partition ids from this one on are canary clients (shared.canary_clients); None when
    # the run has none, as every deployment (whose partition ids are Flower's node ids)
    clients: int | None

    @property
    def site_updates(self) -> list[Message]:
        """The updates of sites, without the canary clients' (which hold no records and
        count in no metric)."""
        if self.clients is None:
            return self.updates
        return [m for m in self.updates if not canary_clients.is_canary(
            self.phase.partitions[m.metadata.src_node_id], clients=self.clients)]

    def partitions(self, nodes: list[int]) -> list[int]:
        """The sorted partition ids of ``nodes``."""
        return sorted(self.phase.partitions[n] for n in nodes)


@dataclass
class Trained:
    """A round whose training is aggregated: what its row and checkpoint need once its
    evaluation is in."""

    server_round: int
    evaluating: Phase
    train_metrics: dict[str, Any]
    clients: int
    declined: int
    dropped_ids: list[int]  # partition ids whose update never arrived (failed or silent)
    timed_out: list[int]
    rejected_ids: list[int]  # partition ids whose reply failed the server's checks
    user_history: History
    checkpoint: checkpoint.Checkpoint  # the state after this round's aggregation, a copy


class Federation:
    """One run: the global model, the strategy, the record, and the phases of its rounds.

    Created with the run's resolved config, it resumes from the run directory's checkpoint
    if there is one (``first_round`` is then the round after it).
    """

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid, self.config = grid, config
        if config.canary_clients and not is_simulation(grid):
            raise ConfigError("canary-clients is for simulations (fedrnn simulate): a "
                              "deployment's clients are its sites")
        if (config.canaries or config.canary_secrets) and not draw_path(config.out).is_file():
            # `fedrnn simulate` draws the canaries before any site starts; `flwr run` has
            # nobody to draw them, and every site would fail on its first round
            raise ConfigError("canaries and canary-secrets are planted by fedrnn simulate "
                              f"(no draw at {draw_path(config.out)}): run the audited "
                              "simulation with fedrnn simulate --canaries M")
        self.arrays = ArrayRecord(initial_weights(config))  # a resume replaces them below
        self.strategy = build_strategy(config, available=config.clients,
                                       server_draws=is_simulation(grid),
                                       canaries=config.canary_clients)
        self.user_history: History = []
        self.exhausted: set[int] = set()  # partition ids of sites that declined (budget)
        self.first_round = 1
        self.stopping = EarlyStopping.of(config)
        self.best_weights: dict[str, torch.Tensor] | None = None  # with early stopping
        saved = checkpoint.load(config.out)
        if saved is not None:
            # A restarted server goes on from the last round it completed.
            self.arrays = ArrayRecord(saved.weights)
            checkpoint.restore_strategy(self.strategy, saved.strategy)
            checkpoint.restore_rng(saved.rng)
            self.user_history = list(saved.user_history)
            if saved.stopping:
                self.stopping.load_state_dict(saved.stopping)
                self.best_weights = saved.best_weights
            self.first_round = saved.server_round + 1
            log.info("resuming %s after round %d", config.out, saved.server_round)
        self.record = RunRecord(config.out, config, resume_after=self.first_round - 1)
        if config.canary_clients and saved is None:
            canary_clients.write_record(
                self.record.dir, seed=config.seed, clients=config.clients,
                canaries=config.canary_clients, user_clip_norm=config.user_clip_norm,
                initial=self.arrays.to_torch_state_dict())
        self.flat = config.to_flat()
        log.info("run directory %s", self.record.dir)
        # every update must have the global model's names, shapes and dtypes
        self.shape = Shape.of({k: a.numpy() for k, a in self.arrays.items()})
        # a deployment: Flower's strategy samples the connected sites itself
        self.sampler: ClientSampler | None = None
        if is_simulation(grid):  # the server draws the clients; the nodes are worker slots
            wait_for_nodes(grid, simulation_slots(config))
            grid.pull_interval = 0.01  # its 0.1 s default idles up to 0.2 s of every round
            self.sampler = ClientSampler(nodes_in_partition_order(grid), config, slots=True,
                                         sizes=partition_sizes(config))
        self.timeout = config.round_timeout or None
        # In a simulation a round's evaluation and the next round's training go out
        # together: both start from the weights the round's training produced and their
        # slots differ (sampling.py). The training slots come first, so Flower's engine
        # queues the training first; the loop takes a round's training replies as soon as
        # they are in, and sends the next pair while the workers still evaluate the
        # previous weights. The round's row and checkpoint follow. Workers so never wait on
        # the server's aggregation nor on the engine's pick-up of new messages (every
        # 100 ms): measured on 2 cores, both workers stood idle 0.78 s of an 8 s run
        # between rounds. A deployment keeps the phases apart: there a site may be asked
        # to do both.
        self.pipelined = self.sampler is not None
        self.last_row_at = time.monotonic()
        # the canary site's partition id: its replies are kept for the white-box audit
        # (shared.canary_releases); a deployment plants no canaries and keeps nothing
        self.canary_partition: int | None = None
        if config.canaries and config.canary_site and self.sampler is not None:
            self.canary_partition = partition_corpus(config)[0].index(config.canary_site)

    @property
    def out_of_budget(self) -> bool:
        """Every site has declined for lack of privacy budget: no round can train."""
        return len(self.exhausted) >= self.config.clients

    def push_training(self, server_round: int) -> Phase:
        """Send ``server_round``'s training, from the current global weights."""
        if server_round == self.config.rounds:
            # The figure is drawn once the last round ends: matplotlib is imported while
            # the sites train it (0.33 s of the 0.5 s from the last reply to the run's end).
            import_in_background()
        return push(self.grid, self.strategy, self.sampler, self.flat, server_round, "train",
                    self.arrays, timeout=self.timeout)

    def receive_training(self, training: Phase, waiting: Trained | None) -> Received:
        """The training replies, checked. If none is valid the run ends (``FedrnnError``),
        after recording ``waiting``, the round before, if its evaluation is in."""
        try:
            updates, declined, lost = receive(
                self.grid, training, functools.partial(check_train_reply, shape=self.shape))
        except FedrnnError:
            if waiting is not None:  # every site failed this round: keep the last one
                with contextlib.suppress(FedrnnError):
                    self.record_round(waiting)
            raise
        trainers = training.partitions
        # replies arrive in any order; summed in partition order, a seeded run repeats bit
        # for bit
        updates.sort(key=lambda m: trainers[m.metadata.src_node_id])
        self.exhausted |= {trainers[m.metadata.src_node_id] for m in declined}
        return Received(training, updates, declined, lost,
                        clients=self.config.clients if self.config.canary_clients else None)

    def aggregate(self, server_round: int, received: Received) -> dict[str, Any]:
        """The strategy's aggregate of the updates becomes the global weights (and a
        user-level release is accounted); returns the aggregated training metrics."""
        updates = received.updates
        self.keep_canary_release(server_round, received)
        if self.config.user_level:
            updates = [uniform_weight(m) for m in updates]
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, updates)
        if self.config.canary_clients:
            # every update, canaries' too, went through the clipping and the noise; the
            # metrics are the sites' alone
            sites = received.site_updates
            train_metrics = aggregate_metrics([m.content for m in sites], P.UNIT_WEIGHT) \
                if sites else None
        if new_arrays is not None:
            self.arrays = new_arrays
            if self.config.user_level:
                self.user_history.append(user_level_release(
                    self.config, received=len(updates), sampled=len(received.phase.messages),
                    available=received.phase.available))
        return dict(train_metrics or {})

    def keep_canary_release(self, server_round: int, received: Received) -> None:
        """Keep the canary site's reply of this round beside the weights it was sent (the
        global weights, not yet replaced by this round's aggregate)."""
        if self.canary_partition is None:
            return
        for message in received.updates:
            if received.phase.partitions[message.metadata.src_node_id] == self.canary_partition:
                canary_releases.write_release(
                    self.record.dir, server_round=server_round,
                    received=self.arrays.to_torch_state_dict(),
                    released=message.content.array_records[P.ARRAYS].to_torch_state_dict())

    def push_evaluation(self, server_round: int) -> Phase:
        """Send ``server_round``'s evaluation of the current global weights."""
        return push(self.grid, self.strategy, self.sampler, self.flat, server_round,
                    "evaluate", self.arrays, timeout=self.timeout)

    def trained(self, server_round: int, received: Received, train_metrics: dict[str, Any],
                evaluating: Phase, rng: dict[str, Any]) -> Trained:
        """The round's snapshot: its counts and its checkpoint, the state a restart from it
        resumes with (``rng``: the generators before the next round's training drew)."""
        lost = received.lost
        return Trained(
            server_round=server_round, evaluating=evaluating, train_metrics=train_metrics,
            clients=len(received.site_updates), declined=len(received.declined),
            dropped_ids=received.partitions(lost["failed"] + lost["timed_out"]),
            timed_out=received.partitions(lost["timed_out"]),
            rejected_ids=received.partitions(lost["rejected"]),
            user_history=list(self.user_history),
            # fresh tensors, and the strategy's state copied: the next round's aggregation
            # must not reach this round's checkpoint
            checkpoint=checkpoint.Checkpoint(
                server_round=server_round, weights=self.arrays.to_torch_state_dict(),
                strategy=copy.deepcopy(checkpoint.strategy_state(self.strategy)),
                user_history=list(self.user_history), rng=rng))

    def record_round(self, done: Trained) -> None:
        """Take ``done``'s evaluation, write its row and checkpoint, show its progress line."""
        config = self.config
        evaluating = done.evaluating
        evaluations, _, lost = receive(self.grid, evaluating,
                                       lambda m: check_evaluate_reply(m, config.task))
        evaluations.sort(key=lambda m: evaluating.partitions[m.metadata.src_node_id])
        eval_metrics = self.strategy.aggregate_evaluate(done.server_round, evaluations) or {}
        metrics = {name: eval_metrics[name] for name in METRICS[config.task]
                   if name in eval_metrics}
        if "perplexity" in metrics and not math.isnan(metrics["loss"]):
            # exp of the token-weighted mean loss: the federation's perplexity (a mean of
            # the clients' perplexities would overstate it, exp being convex)
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        user_epsilon = (epsilon(done.user_history, delta=config.delta,
                                accountant=config.accountant) if config.user_level else None)
        # wall time since the previous round's row: rounds overlap (the next round's
        # training runs beside this one's evaluation), so these add up to the run's time
        now = time.monotonic()
        row = RoundRow(
            round=done.server_round, metrics=metrics,
            train_loss=done.train_metrics.get(P.TRAIN_LOSS, math.nan),
            epsilon_max=(done.train_metrics.get(EPSILON_MAX, math.nan)
                         if config.record_level else math.inf),
            user_epsilon=user_epsilon,
            clients=done.clients, declined=done.declined, dropped_ids=done.dropped_ids,
            timed_out=done.timed_out,
            # replies that failed the server's checks, in training and in evaluation
            rejected_ids=sorted({*done.rejected_ids, *(
                evaluating.partitions.get(n, n) for n in lost["rejected"])}),
            seconds=round(now - self.last_row_at, 3))
        self.record.add_round(row)
        if self.stopping.update(done.server_round, metrics) and self.stopping.active:
            self.best_weights = done.checkpoint.weights
        done.checkpoint.stopping = self.stopping.state_dict()
        done.checkpoint.best_weights = self.best_weights
        checkpoint.write(self.record.dir, checkpoint.encode(done.checkpoint))
        log.info("%s", progress_line(row, config))
        self.last_row_at = now

    def finish(self) -> Path:
        """Write the final model and the summary; the checkpoint goes (the run is over)."""
        config = self.config
        final_model = build_model(config)
        final_model.load_state_dict(self.arrays.to_torch_state_dict())
        stopping = self.stopping
        best = None
        if stopping.active and self.best_weights is not None:
            best = build_model(config)
            best.load_state_dict(self.best_weights)
        elif stopping.active:
            log.warning("early stopping saw no defined %s in any round; choose another "
                        "--early-stopping-metric", stopping.metric)
        self.record.finish(final_model.state_dict(), privacy=self.privacy_summary(),
                           best_round=stopping.best_round, stopped_early=stopping.stopped,
                           best_state_dict=None if best is None else best.state_dict())
        # summary.json marks the end
        (self.record.dir / checkpoint.CHECKPOINT).unlink(missing_ok=True)
        if self.exhausted:
            log.warning("%d of %d sites ran out of privacy budget and declined to train",
                        len(self.exhausted), config.clients)
        log.info("done: %s", self.record.dir)
        return self.record.dir

    def privacy_summary(self) -> PrivacySummary:
        config = self.config
        # an infinite spend is clipping without noise: no DP release was accounted
        spent = [r.epsilon_max for r in self.record.rows if math.isfinite(r.epsilon_max)]
        user_level = None
        if config.user_level:
            user_level = UserLevelSummary(
                epsilon=epsilon(self.user_history, delta=config.delta,
                                accountant=config.accountant),
                delta=config.delta, accountant=config.accountant,
                noise_multiplier=config.user_noise_multiplier,
                clip_norm=config.user_clip_norm, history=list(self.user_history))
        return PrivacySummary(
            level=config.dp_level if config.dp else "none",
            # None when no site trained in this run: the ledgers (fedrnn audit) hold the spend
            epsilon_max=(max(spent) if spent else None) if config.record_level else math.inf,
            delta=config.delta if config.dp else None,
            accountant=config.accountant if config.dp else None,
            epsilon_target=config.epsilon if config.calibrate_noise else None,
            noise_multiplier=config.noise_multiplier or None,
            clip_norm=config.clip_norm if config.record_level else None,
            budget_epsilon=config.site_budget[0] if config.record_level else None,
            budget_delta=config.site_budget[1] if config.record_level else None,
            sites_out_of_budget=len(self.exhausted),
            # absolute, so that an audit run from another directory finds the ledgers
            # (None when deployed: each site keeps its ledger on its own disk)
            ledger_dir=(str(config.ledger_root.resolve())
                        if config.record_level and config.ledger_root.is_dir() else None),
            user_level=user_level)


def progress_line(row: RoundRow, config: RunConfig) -> str:
    """The console's line for a recorded round."""
    parts = [f"round {row.round:>3}/{config.rounds}", f"clients {row.clients}"]
    if row.declined:
        parts.append(f"declined {row.declined} (budget)")
    if row.dropped:
        parts.append(f"dropped {row.dropped}")
    for name in METRICS[config.task]:
        value = row.metrics.get(name)
        if isinstance(value, float) and not math.isnan(value):
            parts.append(f"{name} {value:.4f}")
    if not math.isinf(row.epsilon_max):
        parts.append(f"epsilon {row.epsilon_max:.3f}")
    if row.user_epsilon is not None:
        parts.append(f"user epsilon {row.user_epsilon:.3f}")
    parts.append(f"{row.seconds:.1f}s")
    return " | ".join(parts)
