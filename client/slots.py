"""Which data partition a node serves in this message.

A deployed site, and a simulation node without a slot list, serves its own partition
(node config ``partition-id``). In a simulation the SuperNodes are worker slots: the
round's config lists the partition each slot serves (``server.sampling``).
"""

from __future__ import annotations

from flwr.app import Context, Message

from fedrnn.shared import protocol as P


def partition_id(msg: Message, context: Context) -> int:
    slot = int(context.node_config["partition-id"])
    partitions = msg.content.config_records[P.CONFIG].get(P.PARTITIONS)
    if partitions is None:
        return slot
    partition = int(partitions[slot])
    if partition < 0:
        raise ValueError(f"slot {slot} was sent a message but serves no partition this phase")
    return partition
