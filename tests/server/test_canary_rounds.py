"""Canary clients in a round: drawn for training like sites, never for evaluation; their
updates enter the aggregate (and the user-level release) but no metric or count."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedrnn.client.canaries import canary_reply_metrics
from fedrnn.server.messaging import Phase
from fedrnn.server.phases import Federation, Received
from fedrnn.server.sampling import ClientSampler, phase_slots
from fedrnn.server.strategy import CLIENTS, build_strategy
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError

GLOBAL = {"w": np.ones((4, 3), dtype=np.float32)}
CONFIG = RunConfig(dp_level="user", clients=3, canary_clients=2, seed=1)


def _reply(node: int, delta: float, metrics: dict) -> Message:
    content = RecordDict({
        P.ARRAYS: ArrayRecord({"w": Array(GLOBAL["w"] + np.float32(delta))}),
        P.METRICS: MetricRecord(metrics)})
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id=f"m{node}", group_id="", created_at=time.time(), ttl=60.0,
        message_type="train"))


def _site_metrics(loss: float) -> dict:
    return {P.UNIT_WEIGHT: 1, P.STEPS: 4, P.NOISE_MULTIPLIER: 0.0, P.EPSILON: math.inf,
            P.NUM_EXAMPLES: 20, P.TRAIN_LOSS: loss}


def test_canaries_are_drawn_for_training_only():
    sampler = ClientSampler(range(8), CONFIG, slots=True)
    assert sampler.sample(1, "train") == [0, 1, 2, 3, 4]
    assert sampler.sample(1, "evaluate") == [0, 1, 2]
    assert phase_slots(CONFIG) == {"train": 5, "evaluate": 3}
    some = CONFIG.replace(clients_per_round=2, eval_clients_per_round=2)
    drawn = {p for r in range(1, 40) for p in ClientSampler(range(4), some, slots=True)
             .sample(r, "train")}
    assert drawn == {0, 1, 2, 3, 4}  # canaries sampled like any site


def test_canary_updates_are_aggregated_but_not_counted():
    strategy = build_strategy(CONFIG, available=3, canaries=2)
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    # nodes 11-13 serve sites 0-2, nodes 14-15 canaries 3-4
    partitions = {11: 0, 12: 1, 13: 2, 14: 3, 15: 4}
    updates = [_reply(11, 0.1, _site_metrics(0.4)), _reply(12, 0.1, _site_metrics(0.6)),
               _reply(14, 0.0, canary_reply_metrics()), _reply(15, 0.0, canary_reply_metrics())]
    phase = Phase("train", [None] * 5, set(), partitions, None, None, 5)
    received = Received(phase, updates, [], {"failed": [], "timed_out": [], "rejected": []},
                        clients=3)
    assert [m.metadata.src_node_id for m in received.site_updates] == [11, 12]
    # a run without canaries (every deployment: its partition ids are Flower's node ids,
    # far above --clients) counts every reply as a site's
    deployed = Phase("train", [None] * 3, set(), {11: 11, 12: 12, 14: 14}, None, None, 3)
    received_deployed = Received(deployed, updates[:3], [], {"failed": [], "timed_out": [],
                                                             "rejected": []}, clients=None)
    assert [m.metadata.src_node_id for m in received_deployed.site_updates] == [11, 12, 14]
    run = SimpleNamespace(config=CONFIG, strategy=strategy, user_history=[], arrays=None,
                          keep_canary_release=lambda *_: None)  # no canary records here
    metrics = Federation.aggregate(run, 1, received)
    assert metrics[CLIENTS] == 2 and metrics[P.TRAIN_LOSS] == pytest.approx(0.5)
    # the release counts all four updates: the noise covers the canaries too
    assert run.user_history == [(CONFIG.user_noise_multiplier * 4 / 5, 1.0, 1)]
    assert run.arrays is not None


def test_canary_records_without_a_draw_stop_the_server_before_any_round(tmp_path):
    # `flwr run --run-config canaries=...` has nobody to draw them: one error at the start,
    # not every site failing its first round
    with pytest.raises(ConfigError, match="planted by fedrnn simulate"):
        Federation(None, RunConfig(canaries=10, out=str(tmp_path)))
