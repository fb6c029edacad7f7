"""Which sites take part in a round: a seeded draw over partition ids, the same every run.

Flower's strategies sample with ``random.sample`` over node ids, and the Simulation
Engine draws node ids from ``os.urandom``: the same seed picked different sites each run.
Here the draw is over *partition ids* with a generator seeded by (seed, round, phase), and
only then mapped to node ids; the strategy is handed a view of the grid that shows just
the drawn nodes, so its own sampling takes all of them.

The Simulation Engine registers node ``i`` for partition ``i`` in order
(``flwr.server.superlink.fleet.vce.vce_api._register_nodes``) and its in-memory LinkState
lists nodes in registration order, which is how the server learns the mapping without a
message to each of 15,000 nodes. On a deployment there are no partition ids: nodes are
ordered by id, so the draw is seeded but which site holds which id is up to the SuperLink.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from shared.config import RunConfig
from shared.data.partition import is_holdout_client
from shared.errors import FedrnnError

log = logging.getLogger("fedrnn")

PHASES = {"train": 0, "evaluate": 1}


def wait_for_nodes(grid: Grid, count: int, *, timeout: float = 600.0) -> None:
    """Block until ``count`` nodes are connected (the Simulation Engine registers its nodes
    while the ServerApp is already running)."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FedrnnError(f"only {len(list(grid.get_node_ids()))} of {count} clients "
                              f"connected within {timeout:.0f} s")
        time.sleep(0.05)


def nodes_in_partition_order(grid: Grid) -> list[int]:
    """Node ids, the node of partition ``i`` at index ``i`` in a simulation."""
    state = getattr(grid, "state", None)
    if state is not None and hasattr(state, "get_node_info"):  # Flower's InMemoryGrid
        from flwr.supercore.constant import NodeStatus

        return [n.node_id for n in state.get_node_info(statuses=[NodeStatus.ONLINE])]
    return sorted(grid.get_node_ids())


class ClientSampler:
    """Seeded per-round samples of partition ids, and the node ids they map to."""

    def __init__(self, nodes: Sequence[int], config: RunConfig) -> None:
        self.nodes = list(nodes)
        self.partition_of = {node: i for i, node in enumerate(self.nodes)}
        self.seed = config.seed
        ids = np.arange(len(self.nodes))
        if config.partitioner == "record":
            # One record per client: a client either trains or evaluates (its record is
            # held out); sampling a client for a phase it has no records for wastes a slot.
            holdout = np.array([is_holdout_client(int(i), seed=config.seed,
                                                  eval_fraction=config.eval_fraction)
                                for i in ids], dtype=bool)
            self.candidates = {"train": ids[~holdout], "evaluate": ids[holdout]}
        else:
            self.candidates = {"train": ids, "evaluate": ids}
        self.sizes = {"train": config.clients_per_round, "evaluate": config.eval_per_round}
        for phase, k in self.sizes.items():
            if k > len(self.candidates[phase]):
                raise FedrnnError(f"{phase}: {k} clients per round requested but only "
                                  f"{len(self.candidates[phase])} can {phase}")

    def sample(self, server_round: int, phase: str) -> list[int]:
        """Sorted partition ids taking part in ``phase`` of ``server_round``."""
        pool = self.candidates[phase]
        k = self.sizes[phase] or len(pool)
        if k >= len(pool):
            return pool.tolist()
        rng = np.random.default_rng([self.seed, server_round, PHASES[phase]])
        return np.sort(rng.choice(pool, size=k, replace=False)).tolist()

    def view(self, grid: Grid, partition_ids: Iterable[int]) -> Grid:
        """``grid`` showing only the nodes of ``partition_ids``."""
        return GridView(grid, [self.nodes[i] for i in partition_ids])


class GridView(Grid):
    """A Grid that lists only ``node_ids``; everything else goes to the wrapped grid."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    @property
    def run(self):  # noqa: ANN201 - Flower's Run
        return self._grid.run

    def set_run(self, run) -> None:  # noqa: ANN001
        self._grid.set_run(run)

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
