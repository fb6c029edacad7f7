"""The server trusts no reply: each malformed update of a hostile site is rejected before
aggregation, counted, and never stops the run; user-level DP survives a zero update and
draws noise no site can regenerate."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedrnn.server.messaging import Phase, receive
from fedrnn.server.strategy import build_strategy
from fedrnn.server.validation import Shape, check_evaluate_reply, check_train_reply
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import FedrnnError

_IDS = itertools.count(1)
GLOBAL = {"w": np.ones((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
SHAPE = Shape.of(GLOBAL)


def reply(arrays=None, node: int = 1, kind: str = "train", **metrics) -> Message:
    """A site's reply as the server's grid hands it over."""
    content = {P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, P.UNIT_WEIGHT: 1, **metrics})}
    if arrays is not None:
        content[P.ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    metadata = Metadata(run_id=1, message_id=f"r{next(_IDS)}", src_node_id=node,
                        dst_node_id=0, reply_to_message_id=f"m{node}", group_id="",
                        created_at=time.time(), ttl=60.0, message_type=kind)
    return Message(content=RecordDict(content), metadata=metadata)


HOSTILE = {
    "broadcast": ({"w": np.full(1, 5e5, dtype=np.float32), "b": GLOBAL["b"]}, {}),
    "nan": ({"w": np.full((4, 3), np.nan, dtype=np.float32), "b": GLOBAL["b"]}, {}),
    "inf": ({"w": GLOBAL["w"], "b": np.full(3, np.inf, dtype=np.float32)}, {}),
    "missing array": ({"w": GLOBAL["w"]}, {}),
    "extra array": ({**GLOBAL, "x": np.zeros(1, dtype=np.float32)}, {}),
    "dtype": ({"w": GLOBAL["w"].astype(np.float64), "b": GLOBAL["b"]}, {}),
    "zero examples": (GLOBAL, {P.NUM_EXAMPLES: 0}),
    "negative examples": (GLOBAL, {P.NUM_EXAMPLES: -10}),
    "nan examples": (GLOBAL, {P.NUM_EXAMPLES: math.nan}),
    "unknown metric": (GLOBAL, {"surprise": 1.0}),
    "negative epsilon": (GLOBAL, {P.EPSILON: -1.0}),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_each_malformed_update_is_rejected_with_a_reason(attack):
    arrays, metrics = HOSTILE[attack]
    reason = check_train_reply(reply(arrays, **metrics), SHAPE)
    assert isinstance(reason, str) and reason
    assert check_train_reply(reply(GLOBAL), SHAPE) is None  # the honest one passes


def test_evaluation_replies_are_checked_too():
    assert check_evaluate_reply(reply(loss=0.5, accuracy=0.9, auroc=math.nan,
                                      kind="evaluate"), "classify") is None
    for bad in ({"accuracy": 1.5, "loss": 0.1}, {"loss": math.inf}, {"loss": -1.0},
                {"loss": 0.1, "perplexity": 2.0}):  # perplexity: not a classify metric
        assert check_evaluate_reply(reply(kind="evaluate", **bad), "classify")


class _Grid:
    """The replies a round's sites sent, as Flower's grid would hand them over."""

    def __init__(self, replies):
        self.replies = replies
        self.pull_interval = 0.0

    def pull_messages(self, ids):
        out, self.replies = self.replies, []
        return out


def _phase(nodes):
    messages = [Message(content=RecordDict(), metadata=Metadata(
        run_id=1, message_id=f"m{n}", src_node_id=0, dst_node_id=n, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=60.0, message_type="train")) for n in nodes]
    return Phase("train", messages, {f"m{n}" for n in nodes}, {n: n - 1 for n in nodes},
                 None, None, len(nodes))


def test_a_round_aggregates_the_valid_replies_and_counts_the_rest():
    hostile = [reply(HOSTILE["nan"][0], node=2), reply(HOSTILE["broadcast"][0], node=3)]
    ok, declined, lost = receive(_Grid([reply(GLOBAL, node=1), *hostile]), _phase([1, 2, 3]),
                                 lambda m: check_train_reply(m, SHAPE))
    assert [m.metadata.src_node_id for m in ok] == [1] and declined == []
    assert sorted(lost["rejected"]) == [2, 3]


def test_an_error_the_superlink_writes_counts_against_the_site_it_was_sent_to():
    # A site killed after it was sampled stops heartbeating; Flower's SuperLink answers
    # its message itself, from the SuperLink's own node id (1), which is no site's. Taking
    # that id for a site ended a deployed run with a KeyError in the next phase.
    from flwr.app import Error

    from fedrnn.server.phases import Received

    unavailable = Message(error=Error(code=5, reason="Error: Node Unavailable"),
                          metadata=Metadata(run_id=1, message_id="e1", src_node_id=1,
                                            dst_node_id=1, reply_to_message_id="m7",
                                            group_id="", created_at=time.time(), ttl=60.0,
                                            message_type="train"))
    phase = _phase([5, 6, 7])
    ok, declined, lost = receive(_Grid([reply(GLOBAL, node=5), reply(GLOBAL, node=6),
                                        unavailable]), phase,
                                 lambda m: check_train_reply(m, SHAPE))
    assert [m.metadata.src_node_id for m in ok] == [5, 6]
    assert lost == {"failed": [7], "timed_out": [], "rejected": []}
    received = Received(phase=phase, updates=ok, declined=declined, lost=lost, clients=None)
    assert received.partitions(lost["failed"]) == [6]
    # a reply to a message sent to another site is not taken as that site's
    forged = reply(GLOBAL, node=5)
    forged.metadata.__dict__["_reply_to_message_id"] = "m6"
    ok, _, lost = receive(_Grid([reply(GLOBAL, node=5), forged]), _phase([5, 6]),
                          lambda m: check_train_reply(m, SHAPE))
    assert [m.metadata.src_node_id for m in ok] == [5] and lost["rejected"] == [6]


def test_a_round_with_no_valid_reply_ends_with_one_line():
    with pytest.raises(FedrnnError, match="no site sent a valid train reply"):
        receive(_Grid([reply(HOSTILE["nan"][0], node=1)]), _phase([1]),
                lambda m: check_train_reply(m, SHAPE))


def _user_level(deployed: bool):
    config = RunConfig(dp_level="user", user_noise_multiplier=1.0, user_clip_norm=1.0,
                       clients=2, clients_per_round=2)
    strategy = build_strategy(config, available=2, server_draws=not deployed)
    strategy.current_arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in GLOBAL.items()})
    return strategy


def test_user_level_dp_takes_a_zero_update_and_its_noise_ignores_numpys_seed():
    results = []
    for _ in range(2):
        strategy = _user_level(deployed=True)
        np.random.seed(0)  # what the run's seed, which every site knows, used to set
        arrays, _ = strategy.aggregate_train(1, [reply(GLOBAL, node=1),  # a zero update
                                                 reply(GLOBAL, node=2)])
        results.append(arrays["w"].numpy())
    assert not np.array_equal(results[0], results[1])  # noise from the operating system
    # a simulation repeats: the same seed, the same noise
    again = [_user_level(deployed=False).aggregate_train(1, [reply(GLOBAL, node=1)])[0]["w"]
             .numpy() for _ in range(2)]
    assert np.array_equal(again[0], again[1])


def test_user_level_dp_clips_a_scaled_update():
    strategy = _user_level(deployed=False)
    huge = {"w": GLOBAL["w"] + 1e6, "b": GLOBAL["b"]}
    arrays, _ = strategy.aggregate_train(1, [reply(huge, node=1)])
    # clipped to norm 1 around the global model, plus noise of std 1 * 1 / 2
    assert np.abs(arrays["w"].numpy() - GLOBAL["w"]).max() < 5


def test_the_user_level_sampling_rate_counts_the_sites_the_draw_saw(monkeypatch):
    # 10 sites expected, 5 per round, only 5 connected: Flower starts the round with those
    # 5 and samples all of them, so the rate is 5/5, not 5/10 (which under-counts epsilon)
    from flwr.supercore.task_identity import TaskIdentity

    from fedrnn.server.messaging import push
    from fedrnn.server.strategy import user_level_release

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0, raising=False)

    class Connected:
        def get_node_ids(self):
            return [11, 12, 13, 14, 15]

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

    config = RunConfig(dp_level="user", clients=10, clients_per_round=5)
    strategy = build_strategy(config, available=10, server_draws=False)
    phase = push(Connected(), strategy, None, config.to_flat(), 1, "train",
                 ArrayRecord({k: Array(np.asarray(v)) for k, v in GLOBAL.items()}),
                 timeout=None)
    assert len(phase.messages) == 5 and phase.available == 5
    assert user_level_release(config, received=5, sampled=5,
                              available=phase.available)[1] == 1.0
