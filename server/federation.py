"""The federation itself: rounds of sampled training and evaluation, recorded as they end.

Flower's ``Strategy.start`` runs the same loop but reports only when all rounds are done;
fedrnn drives the strategy's own ``configure_*``/``aggregate_*`` steps so that each round
is written to ``metrics.jsonl`` and shown on the console as soon as it ends. The phases
of a round are ``server.phases``; this module only orders them.
"""

from __future__ import annotations

import logging
import random
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import Grid

from fedrnn.server import checkpoint
from fedrnn.server.phases import Federation, Trained
from fedrnn.server.sampling import is_simulation
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import resolve

log = logging.getLogger("fedrnn")


def default_out_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """Run ``config.rounds`` rounds over the sites ``grid`` reaches; returns the run dir.

    In a simulation (``Federation.pipelined``) a round's evaluation and the next round's
    training are in flight together, so the round is recorded one iteration later, once
    the next round's training replies are in; a deployment records each round before the
    next one's training is sent. With early stopping each round is recorded before the
    round after next is sent, so a run that stops sends no round it does not finish.
    """
    config = resolve(config)
    if not config.out:
        config = config.replace(out=default_out_dir())
    if not config.run_id:
        config = config.replace(run_id=f"{Path(config.out).name}-{uuid.uuid4().hex[:8]}")
    _seed(grid, config)
    run = Federation(grid, config)
    if run.stopping.stopped:  # resumed after the round that stopped it: nothing left to send
        return run.finish()
    training = run.push_training(run.first_round)
    waiting: Trained | None = None  # a round trained and aggregated, its evaluation out
    for server_round in range(run.first_round, config.rounds + 1):
        received = run.receive_training(training, waiting)
        train_metrics = run.aggregate(server_round, received)
        evaluating = run.push_evaluation(server_round)
        if waiting is not None and run.stopping.active:
            # whether to stop is decided on the round before, before the next round's
            # training is sent: sites charge their ledgers for a round when it reaches them
            run.record_round(waiting)
            waiting = None
        go_on = (server_round < config.rounds and not run.out_of_budget
                 and not run.stopping.stopped)
        # a restart from this round's checkpoint resumes with the generators as they are
        # before the next round's training draws from them
        rng = checkpoint.rng_state()
        training = run.push_training(server_round + 1) if go_on and run.pipelined else None
        trained = run.trained(server_round, received, train_metrics, evaluating, rng)
        if waiting is not None:
            run.record_round(waiting)
        waiting = trained if run.pipelined and go_on else None
        if waiting is None:  # this round's row now: no next round runs beside it
            run.record_round(trained)
        if run.out_of_budget:
            log.warning("every site's privacy budget is spent: stopping after round %d "
                        "(fedrnn audit %s shows each site's spend)", server_round,
                        run.record.dir)
            break
        if run.stopping.stopped:
            log.warning("early stopping: %s has not improved for %d round(s); stopping after "
                        "round %d of %d (best: round %s, model_best.pt)", run.stopping.metric,
                        run.stopping.patience, server_round, config.rounds,
                        run.stopping.best_round)
            break
        if go_on and training is None:
            training = run.push_training(server_round + 1)
    return run.finish()


def _seed(grid: Grid, config: RunConfig) -> None:
    """Seed the server's generators: from the run's seed in a simulation, from the
    operating system for the site sampling of a deployment."""
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
