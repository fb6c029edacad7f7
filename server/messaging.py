"""A phase of a round on the wire: send its messages, collect and check its replies.

The strategy (Flower's, ``server.strategy``) configures a phase's messages; ``push`` sends
them to the nodes drawn for it and ``receive`` waits for the replies until the round
timeout, keeping those the server's checks (``server.validation``) accept and sorting the
rest into budget declines, failures, silences and rejections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedrnn.server.sampling import ClientSampler
from fedrnn.shared import protocol as P
from fedrnn.shared.errors import FedrnnError

log = logging.getLogger("fedrnn")

# The clock a round's deadline (--round-timeout) is measured on. A test replaces it to pass
# a deadline at the moment it chooses, instead of racing a real wait on a slow machine.
deadline_clock: Callable[[], float] = time.monotonic


def _participants(sampler: ClientSampler | None, grid: Grid, flat: dict, server_round: int,
                  phase: str) -> tuple[ConfigRecord, Grid, dict[int, int] | None]:
    """A phase's config, the grid its strategy samples from, and node -> partition id.

    In a simulation the server's seeded draw: a view of just the drawn nodes, whose config
    lists the partition each slot serves. On a deployment (no sampler) the whole grid:
    Flower's strategy waits for and samples the connected sites, each serving itself
    (the mapping is then node -> node id, known once the messages exist).
    """
    if sampler is None:
        return ConfigRecord(flat), grid, None
    assignment = sampler.assign(sampler.sample(server_round, phase), phase)
    return (ConfigRecord({**flat, **sampler.round_config(assignment)}),
            sampler.view(grid, assignment), assignment)


@dataclass
class Phase:
    """One phase's messages, sent and awaiting replies."""

    name: str
    messages: list[Message]
    ids: set[str]
    partitions: dict[int, int]  # node id -> the partition id it serves
    timeout: float | None
    deadline: float | None
    available: int  # sites it was sampled from: the user-level sampling rate's denominator


def push(grid: Grid, strategy, sampler: ClientSampler | None, flat: dict,  # noqa: ANN001
          server_round: int, phase: str, arrays: ArrayRecord, *,
          timeout: float | None) -> Phase:
    """Let the strategy configure ``phase`` of ``server_round`` and send its messages."""
    phase_config, phase_grid, partitions = _participants(sampler, grid, flat, server_round,
                                                         phase)
    if sampler is None:
        phase_grid = _CountingGrid(phase_grid)
    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    messages = list(configure(server_round, arrays, phase_config, phase_grid))
    partitions = partitions or {m.metadata.dst_node_id: m.metadata.dst_node_id
                                for m in messages}
    ids = set(grid.push_messages(messages)) if messages else set()
    # The user-level sampling rate's denominator: the sites the draw was made from. A
    # deployment's round starts once enough sites are connected, which may be fewer than
    # --min-clients: exactly the nodes Flower's draw saw. A simulation: the candidates.
    available = (len(phase_grid.nodes) if isinstance(phase_grid, _CountingGrid)
                 else len(sampler.candidates[phase]))
    return Phase(phase, messages, ids, partitions, timeout,
                  None if timeout is None else deadline_clock() + timeout, available)


class _CountingGrid:
    """The grid as Flower's strategy sees it, remembering the nodes its last
    ``get_node_ids`` returned: Flower's ``sample_nodes`` draws from exactly that list."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.nodes: list[int] = []

    def get_node_ids(self) -> list[int]:
        self.nodes = list(self._grid.get_node_ids())
        return self.nodes

    def __getattr__(self, name: str):  # noqa: ANN204  everything else is the grid's
        return getattr(self._grid, name)


def receive(grid: Grid, phase: Phase, check: Callable[[Message], str | None],
             ) -> tuple[list[Message], list[Message], dict[str, list[int]]]:
    """Wait for ``phase``'s replies; returns (valid replies with content, budget declines,
    lost), ``lost`` being the node ids that failed (``failed``), sent no reply within the
    round timeout (``timed_out``), or sent a reply ``check`` rejected (``rejected``: one
    log line each, with the reason).

    A decline is a site's refusal, not a failure: it is logged with the site's reason.
    Failures are logged, and fatal only if no site sent a valid reply (injected dropouts
    aside).
    """
    messages = phase.messages
    if not messages:
        return [], [], {"failed": [], "timed_out": [], "rejected": []}
    pending, replies = set(phase.ids), []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if not pending or (phase.deadline is not None and deadline_clock() >= phase.deadline):
            break
        time.sleep(getattr(grid, "pull_interval", 0.1))
    name = phase.name
    # The node a reply answers for is the one its message was sent to: an error Flower's
    # SuperLink writes itself (a node that stopped heartbeating, a reply that expired)
    # comes from the SuperLink's own node id, which is no site's.
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

    def node_of(m: Message) -> int:
        return sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)

    def site(node: int) -> object:
        return phase.partitions.get(node, node)

    ok, rejected = [], []
    for m in replies:
        if m.has_error():
            continue
        if not m.has_content():
            reason = "it carries neither content nor an error"
        elif m.metadata.src_node_id != node_of(m):
            reason = "it answers a message sent to another site"
        else:
            try:
                reason = check(m)
            except Exception as exc:  # noqa: BLE001  whatever a reply holds, it is only rejected
                reason = f"it cannot be read ({type(exc).__name__})"
        if reason is None:
            ok.append(m)
        else:
            rejected.append(m)
            log.warning("%s reply of site %s rejected: %s", name, site(node_of(m)), reason)
    declined = [m for m in replies if m.has_error() and m.error.code == P.DECLINED_BUDGET]
    failed = [m for m in replies if m.has_error() and m.error.code != P.DECLINED_BUDGET]
    for m in declined:
        log.info("%s", m.error.reason)
    for m in failed:
        level = logging.DEBUG if m.error.code == P.DROPPED_OUT else logging.WARNING
        log.log(level, "%s failed at site %s: %s", name, site(node_of(m)), m.error.reason)
    replied = {node_of(m) for m in replies}
    late = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in replied]
    if late:
        log.warning("%d site(s) sent no %s reply within the round timeout (%gs): the round "
                    "goes on without them", len(late), name, phase.timeout)
    injected = any(m.error.code == P.DROPPED_OUT for m in failed)
    if not ok and not declined and (failed or late or rejected) and not injected:
        first = (failed[0].error.reason if failed else "its reply was rejected" if rejected
                 else "no site replied in time")
        raise FedrnnError(f"no site sent a valid {name} reply; the first: {first}")
    return ok, declined, {"failed": [node_of(m) for m in failed], "timed_out": late,
                          "rejected": [node_of(m) for m in rejected]}
