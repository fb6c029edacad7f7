"""Simulated hostile sites, for research on what the server withstands.

A Flower client mod around the ClientApp's training handler, inactive unless a simulation
sets ``attack``. A share ``attack-rate`` of the sampled simulated sites (a pure function of
seed, round and partition id, like ``client.faults``) trains as usual, then replaces its
update with a crafted one:

- ``nan``: every weight NaN (the server must reject it);
- ``shape``: every weight a 1-element array of 5e5, which Flower's averaging would
  broadcast into any shape (the server must reject it);
- ``scale``: its update (trained minus global weights) times ``attack-scale``: a valid
  reply that a mean follows and a robust aggregate (median, trimmed mean, Krum) bounds;
- ``sign-flip``: its update times ``-attack-scale``.

Deployed sites never run this: it acts only on a simulation's nodes (``partition-id``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedrnn.client.slots import partition_id
from fedrnn.shared import protocol as P


def is_attacker(*, seed: int, server_round: int, partition_id: int, rate: float) -> bool:
    """Whether this site sends a crafted update in this round."""
    return bool(np.random.default_rng([seed, server_round, partition_id, 5]).random() < rate)


def craft(kind: str, global_arrays: dict[str, np.ndarray], trained: dict[str, np.ndarray],
          scale: float) -> dict[str, np.ndarray]:
    """The crafted weights of an attack (see module docstring)."""
    if kind == "nan":
        return {k: np.full_like(v, np.nan) for k, v in trained.items()}
    if kind == "shape":
        return {k: np.full(1, 5e5, dtype=v.dtype) for k, v in trained.items()}
    sign = 1.0 if kind == "scale" else -1.0
    return {k: (global_arrays[k] + sign * scale * (v - global_arrays[k])).astype(v.dtype)
            for k, v in trained.items()}


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the updates of the run's attackers with crafted ones (simulations only)."""
    config = msg.content.config_records.get(P.CONFIG) if msg.has_content() else None
    if (msg.metadata.message_type != MessageType.TRAIN or config is None
            or "partition-id" not in context.node_config
            or str(config.get("attack", "none")) == "none"):
        return call_next(msg, context)
    global_arrays = {k: a.numpy().copy() for k, a in msg.content[P.ARRAYS].items()}
    reply = call_next(msg, context)
    if reply.has_error() or not is_attacker(
            seed=int(config.get("seed", 0)), server_round=int(config.get(P.ROUND, 0)),
            partition_id=partition_id(msg, context),
            rate=float(config.get("attack-rate", 0.0))):
        return reply
    trained = {k: a.numpy() for k, a in reply.content[P.ARRAYS].items()}
    crafted = craft(str(config["attack"]), global_arrays, trained,
                    float(config.get("attack-scale", 10.0)))
    reply.content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in crafted.items()})
    return reply
