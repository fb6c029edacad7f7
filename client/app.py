"""The fedrnn ClientApp: one site's train and evaluate handlers (Flower Message API).

A site receives the global weights and the run's config; it checks its privacy budget,
charges the round to its ledger (durably, before training), trains with DP-SGD on its
own records and replies with the trained weights and the metrics in ``shared.protocol``.
The epsilon it reports is its total spend according to its ledger, across runs.

Where a site's data and ledger are is the site's business, given by its node config:
a simulated site has a ``partition-id`` into the simulation's data; a deployed site
(``fedrnn client``) has ``data`` (its records file), ``ledger``, ``name`` and optionally
its own ``budget-epsilon``/``budget-delta``, which override whatever the server proposes.

The training code (``client.training``, with Opacus) is imported by the handlers, not
here: a simulation's driver imports this module only to hand ``app`` to Flower's engine,
and Opacus would cost it 1.4 s of CPU beside workers that are busy importing it too.
Processes that serve sites import it up front (``simulations.worker_preload``).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.faults import fault_mod
from client.ledger import Ledger
from client.slots import partition_id
from client.spending import BudgetExhausted, charge_round
from shared import protocol as P
from shared.config import RunConfig
from shared.data import ClientData, client_data, site_data
from shared.models import SequenceModel, build_model
from shared.privacy import calibrate_noise, sample_rate, steps_per_round

if TYPE_CHECKING:
    from client.randomness import SiteRandomness

app = ClientApp(mods=[fault_mod])  # fault_mod: injected faults of simulations only


@app.train()
def train(msg: Message, context: Context) -> Message:
    # here, not at module level (module docstring), and before the ledger is charged
    from client.training import train as train_local

    config, server_round = _run_config(msg, context)
    data = _site_data(config, msg, context)
    if "data" in context.node_config and not config.record_level:
        # A deployed site never releases an update without its own DP, whatever the
        # server asks: with dp off or dp-level user, its raw update would leave the site.
        return Message(Error(P.DECLINED_POLICY, f"site {data.name} declined: it trains only "
                             "with record-level DP (the server asked for "
                             f"{'no DP' if not config.dp else 'dp-level ' + config.dp_level})"),
                       reply_to=msg)
    model = _global_model(config, msg)
    sigma = noise_multiplier(config, n_records=len(data.train))
    spent = math.inf
    if sigma is not None:
        planned = (sigma, sample_rate(len(data.train), config.batch_size),
                   steps_per_round(len(data.train), config.batch_size, config.local_epochs))
        with Ledger(ledger_path(config, context, data.name)) as ledger:
            try:
                spent = charge_round(ledger, fingerprint=data.fingerprint, site=data.name,
                                     run_id=config.run_id, server_round=server_round,
                                     planned=planned, config=config)
            except BudgetExhausted as exc:
                return Message(Error(P.DECLINED_BUDGET, str(exc)), reply_to=msg)
    # Only now, with the release committed to the ledger, does training on the records start.
    result = train_local(model, data.train, config, noise_multiplier=sigma,
                         randomness=_randomness(config, msg, context, server_round))
    if sigma is not None and result.history != [planned]:
        # Never release an update whose mechanism differs from what was charged.
        raise RuntimeError(f"DP-SGD ran {result.history}, but {planned} was charged")
    metrics = {
        P.NUM_EXAMPLES: len(data.train),
        P.UNIT_WEIGHT: 1,
        P.TRAIN_LOSS: result.loss,
        P.STEPS: result.steps,
        P.NOISE_MULTIPLIER: sigma or 0.0,
        P.EPSILON: spent,
    }
    content = RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()),
                          P.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client.training import evaluate as evaluate_local

    config, _ = _run_config(msg, context)
    data = _site_data(config, msg, context)
    metrics = evaluate_local(_global_model(config, msg), data.eval, config)
    metrics[P.UNIT_WEIGHT] = 1
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)


def noise_multiplier(config: RunConfig, *, n_records: int) -> float | None:
    """The site's noise multiplier; None without DP.

    Calibrated so that taking part in *every* planned round stays within the epsilon
    target: the site does not control how often it is sampled, so it plans for the worst.
    """
    if not config.dp:
        return None
    if not config.calibrate_noise:
        return config.noise_multiplier
    steps = config.rounds * steps_per_round(n_records, config.batch_size, config.local_epochs)
    return calibrate_noise(target_epsilon=config.epsilon, delta=config.delta,
                           sample_rate=sample_rate(n_records, config.batch_size), steps=steps,
                           accountant=config.accountant)


def _run_config(msg: Message, context: Context) -> tuple[RunConfig, int]:
    values = dict(msg.content[P.CONFIG])
    server_round = int(values.pop(P.ROUND, 0))
    values.pop(P.PARTITIONS, None)  # simulation slots: read by ``partition_id``
    for key in ("budget-epsilon", "budget-delta"):  # the site's own limits win
        if key in context.node_config:
            values[key] = float(context.node_config[key])
    return _parsed(json.dumps(values, sort_keys=True)), server_round


@functools.lru_cache(maxsize=16)
def _parsed(values: str) -> RunConfig:
    """A run's config is the same in every message but the round: parsed and checked once
    per process (0.7 ms a message, 400 messages in the default simulation)."""
    return RunConfig.from_flat(json.loads(values))


def _site_data(config: RunConfig, msg: Message, context: Context) -> ClientData:
    if "data" in context.node_config:
        return site_data(config, str(context.node_config["data"]),
                         name=str(context.node_config.get("name", "")))
    return client_data(config, partition_id(msg, context))


def _global_model(config: RunConfig, msg: Message) -> SequenceModel:
    model = build_model(config)
    model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    return model


def ledger_path(config: RunConfig, context: Context, site: str) -> Path:
    """A deployed site names its ledger (node config ``ledger``); a simulated one keeps
    it in ``ledger-dir`` (default ``<out>/ledgers``), one file per site."""
    if "ledger" in context.node_config:
        return Path(str(context.node_config["ledger"])).expanduser()
    return config.ledger_root / f"{site}.sqlite"


def _randomness(config: RunConfig, msg: Message, context: Context,
                server_round: int) -> SiteRandomness:
    """A deployed site keys its DP noise and batches from the OS: the run's seed is the
    server's, and noise the server can regenerate protects nothing. Simulations are
    reproducible from the run's seed."""
    from client.randomness import SiteRandomness  # in the handler, as client.training

    if "data" in context.node_config:
        return SiteRandomness.from_os()
    return SiteRandomness.from_seed(config.seed, partition_id(msg, context), server_round)
