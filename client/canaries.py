"""Canary clients of the user-level audit (``canary-clients``, simulations only).

A Flower client mod around the ClientApp's training handler. A message for a canary
client (a partition id from ``clients`` on; ``shared.canary_clients``) never reaches the
site code: the canary holds no records, opens no ledger, trains nothing. It replies the
global weights plus its fixed update (its secret direction, scaled above the user clip),
with the metrics a simulated site sends, so that its reply passes the server's checks and
its clipping and noise exactly as a site's would. The server leaves canary replies out
of the round's metrics (``server.phases``).

Outermost of the mods: injected faults and attacks act on sites, never on canaries,
which Andrew et al.'s estimate assumes are inserted every round they are sampled.
"""

from __future__ import annotations

import math

from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedrnn.client.slots import partition_id
from fedrnn.shared import canary_clients
from fedrnn.shared import protocol as P


def canary_reply_metrics() -> dict[str, float]:
    """A canary's metrics: the keys of a simulated site's training reply (Flower's
    aggregation wants every reply to carry the same ones), describing no records."""
    return {P.UNIT_WEIGHT: 1, P.STEPS: 0, P.NOISE_MULTIPLIER: 0.0, P.EPSILON: 0.0,
            P.NUM_EXAMPLES: 1, P.TRAIN_LOSS: math.nan}


def canary_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer a canary client's training message with its canary update."""
    config = msg.content.config_records.get(P.CONFIG) if msg.has_content() else None
    if (msg.metadata.message_type != MessageType.TRAIN or config is None
            or "partition-id" not in context.node_config
            or not int(config.get("canary-clients", 0))):
        return call_next(msg, context)
    clients = int(config["clients"])
    partition = partition_id(msg, context)
    if not canary_clients.is_canary(partition, clients=clients):
        return call_next(msg, context)
    global_arrays = {k: a.numpy() for k, a in msg.content[P.ARRAYS].items()}
    weights = canary_clients.canary_weights(
        global_arrays, seed=int(config["seed"]), index=partition - clients,
        user_clip_norm=float(config["user-clip-norm"]))
    return Message(RecordDict({
        P.ARRAYS: ArrayRecord({k: Array(v) for k, v in weights.items()}),
        P.METRICS: MetricRecord(canary_reply_metrics())}), reply_to=msg)
