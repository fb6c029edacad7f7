"""The fedrnn ClientApp: Flower's train and evaluate handlers around ``client.site``.

A message brings the global weights and the server's run config; the handler finds out
which site it runs at (from the node config, which only the site's own operator sets),
hands the round to ``client.site`` and wraps its answer, or its refusal, in a reply.

- A deployed site (``fedrnn client``: node config ``data``, ``ledger``, ``name`` and its
  policy ``budget-epsilon``, ``budget-delta``, ``accountant``, ``eval-fraction``,
  ``evaluate``) checks the proposal against its policy and replies to a refusal or a
  failure with a reason code and nothing else (``shared.protocol.REASONS``); the full
  text goes to its own log.
- A simulated site (node config ``partition-id``) serves the partition its slot is given
  and keeps its ledger in the run's ``ledger-dir``.

The training code (``fedrnn.client.training``, with Opacus) is imported by the handlers, not
here: a simulation's driver imports this module only to hand ``app`` to Flower's engine,
and importing Opacus would cost it CPU beside workers that are busy importing it too.
Processes that serve sites import it up front (``fedrnn.simulations.worker_preload``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrnn.client.attacks import attack_mod
from fedrnn.client.canaries import canary_mod
from fedrnn.client.faults import fault_mod
from fedrnn.client.ledger import Ledger
from fedrnn.client.policy import Declined, SitePolicy, check_proposal
from fedrnn.client.site import Site, evaluate_round, simulated_site, train_round
from fedrnn.client.slots import partition_id
from fedrnn.client.spending import BudgetExhausted
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import site_data
from fedrnn.shared.errors import ConfigError, DataError
from fedrnn.shared.models import SequenceModel, build_model
from fedrnn.shared.randomness import SiteRandomness

log = logging.getLogger("fedrnn")

# canary clients, injected faults and attacks of simulations only; a deployed site runs none
app = ClientApp(mods=[canary_mod, fault_mod, attack_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    def work(site: Site, config: RunConfig, server_round: int) -> RecordDict:
        model = _global_model(config, msg)
        metrics = train_round(site, config, server_round, model)
        return RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()),
                           P.METRICS: MetricRecord(metrics)})

    return _handle(msg, context, work)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    def work(site: Site, config: RunConfig, server_round: int) -> RecordDict:
        metrics = evaluate_round(site, config, server_round, _global_model(config, msg))
        metrics[P.UNIT_WEIGHT] = 1
        return RecordDict({P.METRICS: MetricRecord(metrics)})

    return _handle(msg, context, work)


def _handle(msg: Message, context: Context,
            work: Callable[[Site, RunConfig, int], RecordDict]) -> Message:
    """Run ``work`` at this node's site; any refusal or failure becomes an error reply:
    a code word only from a deployed site, the text too from a simulated one."""
    deployed = "data" in context.node_config
    try:
        if deployed:
            site, config, server_round = _deployed_site(msg, context)
        else:
            site, config, server_round = _simulated_site(msg, context)
        return Message(content=work(site, config, server_round), reply_to=msg)
    except Declined as exc:
        code, text = exc.code, str(exc)
    except BudgetExhausted as exc:
        code, text = P.DECLINED_BUDGET, str(exc)
    except DataError as exc:
        code, text = P.FAILED_DATA, str(exc)
    except Exception as exc:  # the site's own failure: the server learns only that it failed
        code, text = P.FAILED_INTERNAL, f"{type(exc).__name__}: {exc}"
        log.debug("%s failed", msg.metadata.message_type, exc_info=True)
    level = logging.INFO if code in (P.DECLINED_BUDGET, P.DECLINED_POLICY) else logging.ERROR
    if deployed:
        log.log(level, "%s %s (%s): %s", msg.metadata.message_type,
                "declined" if level == logging.INFO else "failed", P.REASONS[code], text)
    return Message(Error(code, P.REASONS[code] if deployed else text), reply_to=msg)


def _deployed_site(msg: Message, context: Context) -> tuple[Site, RunConfig, int]:
    try:
        policy = SitePolicy.from_node_config(context.node_config)
        proposal, server_round = _run_config(msg)
    except (ValueError, ConfigError) as exc:
        raise Declined(P.DECLINED_POLICY, f"declined the run: {exc}") from None
    config = check_proposal(proposal, policy)
    ledger = Path(str(context.node_config["ledger"])).expanduser()
    with Ledger(ledger, own=True) as book:
        secret = book.split_key
    name = str(context.node_config.get("name", "")) or Path(
        str(context.node_config["data"])).stem
    data = site_data(config, str(context.node_config["data"]), name=name, secret=secret,
                     eval_fraction=policy.eval_fraction)
    # noise and batches from the operating system's entropy, never from the server's seed
    return (Site(name=data.name, data=data, ledger=ledger, policy=policy,
                 randomness=SiteRandomness.from_os()), config, server_round)


def _simulated_site(msg: Message, context: Context) -> tuple[Site, RunConfig, int]:
    # Simulated sites run side by side, one per Ray actor: that is the parallelism. Within
    # one, a small recurrent model's ops are too small for torch's intra-op threads, which
    # on a busy machine wait on each other: under `flwr run` (Flower's default of 2 CPUs,
    # so 2 threads, per actor) round 2 of the default run took 54.7 s, 3.0 s with one
    # thread (2 shared cores). `fedrnn simulate`'s workers start with one
    # (simulations/worker_preload.py).
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    config, server_round = _run_config(msg)
    return simulated_site(config, partition_id(msg, context), server_round), config, server_round


def _run_config(msg: Message) -> tuple[RunConfig, int]:
    values = dict(msg.content[P.CONFIG])
    server_round = int(values.pop(P.ROUND, 0))
    values.pop(P.PARTITIONS, None)  # simulation slots: read by ``partition_id``
    return _parsed(json.dumps(values, sort_keys=True)), server_round


@functools.lru_cache(maxsize=16)
def _parsed(values: str) -> RunConfig:
    """A run's config is the same in every message but the round: parsed and checked once
    per process rather than once per message."""
    return RunConfig.from_flat(json.loads(values))


# Incoming weights beyond this are refused: a trained recurrent model's are of order 1, and
# weights a server crafts to overflow a record's loss to NaN (an exact test of what the
# records hold) need far larger ones.
MAX_WEIGHT = 1e4


def _global_model(config: RunConfig, msg: Message) -> SequenceModel:
    """The server's weights, refused (``policy``, before anything is charged) unless every
    one is finite and at most ``MAX_WEIGHT`` in size."""
    state = msg.content[P.ARRAYS].to_torch_state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point() and not (
                torch.isfinite(tensor).all() and tensor.abs().max() <= MAX_WEIGHT):
            raise Declined(P.DECLINED_POLICY, f"the server's weight {name!r} holds values "
                           f"that are not finite or beyond {MAX_WEIGHT:g}")
    model = build_model(config)
    model.load_state_dict(state)
    return model
