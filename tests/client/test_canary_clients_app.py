"""A canary client's reply: its fixed update, never a site's training or ledger, and
checked, clipped and noised by the server exactly as a site's reply is."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedrnn.client.canaries import canary_mod
from fedrnn.server.strategy import build_strategy
from fedrnn.server.validation import Shape, check_train_reply, uniform_weight
from fedrnn.shared import canary_clients as cc
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig

_IDS = itertools.count()
GLOBAL = {"w": np.ones((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
# 2 sites (partitions 0, 1) and 2 canary clients (partitions 2, 3); a vanishing noise
CONFIG = RunConfig(dp_level="user", clients=2, canary_clients=2, user_clip_norm=0.5,
                   user_noise_multiplier=1e-9, seed=4)


def _message(slot_partitions: list[int], kind: str = "train") -> Message:
    config = {**CONFIG.to_flat(), P.ROUND: 1, P.PARTITIONS: slot_partitions}
    content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                          P.CONFIG: ConfigRecord(config)})
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id=f"m{next(_IDS)}", src_node_id=1, dst_node_id=7,
        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
        message_type=kind))


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def _site_must_not_run(msg, context):
    raise AssertionError("a canary client reached the site's training (and its ledger)")


def test_a_canary_reply_is_checked_clipped_and_noised_like_a_sites():
    # slot 0 serves partition 3: canary index 1
    reply = canary_mod(_message([3, 0]), _context(**{"partition-id": 0}), _site_must_not_run)
    assert check_train_reply(reply, Shape.of(GLOBAL)) is None  # the server's own checks
    sent = cc.flatten({k: a.numpy() for k, a in reply.content[P.ARRAYS].items()}) \
        - cc.flatten(GLOBAL)
    assert np.linalg.norm(sent) == pytest.approx(2 * 0.5, rel=1e-5)  # above the clip
    strategy = build_strategy(CONFIG, available=2, canaries=2)
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    arrays, _ = strategy.aggregate_train(1, [uniform_weight(reply)])
    change = cc.flatten({k: a.numpy() for k, a in arrays.items()}) - cc.flatten(GLOBAL)
    # clipped to exactly the clip, along the canary's direction
    assert np.linalg.norm(change) == pytest.approx(0.5, rel=1e-5)
    direction = cc.direction(seed=4, index=1, dim=15)
    assert np.allclose(change, 0.5 * direction, atol=1e-6)


def test_sites_evaluations_and_deployed_nodes_pass_through():
    passed = []

    def site(msg, context):
        passed.append(msg.metadata.message_type)
        return msg

    canary_mod(_message([1]), _context(**{"partition-id": 0}), site)  # a site's partition
    canary_mod(_message([3], kind="evaluate"), _context(**{"partition-id": 0}), site)
    canary_mod(_message([3]), _context(data="records.csv", ledger="x.sqlite"), site)
    assert passed == ["train", "evaluate", "train"]
