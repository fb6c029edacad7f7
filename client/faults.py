"""Injected faults for simulations: sites that fail mid-round and sites that reply late.

A Flower client mod around the ClientApp's handlers, inactive unless the run sets
``dropout-rate`` or ``straggler-rate``. A dropout runs the whole round (budget check,
write-ahead charge, DP-SGD) and then fails instead of replying: the realistic failure,
a device lost after it spent budget, so its ledger holds a charge for an update the
server never sees. A straggler replies ``straggler-delay`` seconds late; with a
``round-timeout`` shorter than that, the server has moved on without it.

Who fails is a pure function of (seed, round, partition id), so a seeded run injects the
same faults every time.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedrnn.client.slots import partition_id
from fedrnn.shared import protocol as P

DROP = "drop"
STRAGGLE = "straggle"


def fault_of(*, seed: int, server_round: int, partition_id: int, dropout_rate: float,
             straggler_rate: float) -> str | None:
    """The fault injected into this site's training round, if any."""
    draw = np.random.default_rng([seed, server_round, partition_id, 2]).random()
    if draw < dropout_rate:
        return DROP
    if draw < dropout_rate + straggler_rate:
        return STRAGGLE
    return None


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Inject the run's faults into training rounds of simulated sites."""
    config = msg.content.config_records.get(P.CONFIG) if msg.has_content() else None
    if (msg.metadata.message_type != MessageType.TRAIN or config is None
            or "partition-id" not in context.node_config
            or not (config.get("dropout-rate") or config.get("straggler-rate"))):
        return call_next(msg, context)
    partition = partition_id(msg, context)
    fault = fault_of(seed=int(config.get("seed", 0)), server_round=int(config.get(P.ROUND, 0)),
                     partition_id=partition,
                     dropout_rate=float(config.get("dropout-rate", 0.0)),
                     straggler_rate=float(config.get("straggler-rate", 0.0)))
    reply = call_next(msg, context)
    if fault == DROP and not reply.has_error():
        return Message(Error(P.DROPPED_OUT, f"partition {partition} dropped out after "
                                            "training (injected fault)"), reply_to=msg)
    if fault == STRAGGLE:
        time.sleep(float(config.get("straggler-delay", 0.0)))
    return reply
