"""Which clients take part in a round, and which node serves each: seeded, the same every run.

Flower's strategies sample with ``random.sample`` over node ids, and the Simulation
Engine draws node ids from ``os.urandom``: the same seed picked different sites each run.
Here the draw is over *partition ids* (the clients) with a generator seeded by (seed,
round, phase), and only then mapped to nodes; the strategy is handed a view of the grid
that shows just those nodes, so its own sampling takes all of them.

In a simulation the SuperNodes are worker *slots*: ``simulation_slots(config)`` of them,
as many as one round's two phases take part, not one per client. The first slots serve
training, the others evaluation, so that a round's evaluation and the next round's
training (which start from the same weights) can be in flight together (federation.py).
The ``i``-th slot of a phase serves the client at position ``i`` of the phase's
``partitions`` list, which travels in the phase's config. Flower's Simulation Engine
polls every node for messages ten times a second, a scan over all nodes times all
messages in flight: with one SuperNode per client, at thousands of clients that scan
keeps the server's process busy and starves the rounds. The Simulation Engine registers
node ``i`` for partition ``i`` in order
(``flwr.server.superlink.fleet.vce.vce_api._register_nodes``) and its in-memory LinkState
lists nodes in that order, which is how the server learns which node is slot ``i``.

On a deployment every node is one site and serves its own data: nodes are ordered by
id, so the draw is seeded but which site holds which id is up to the SuperLink.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.partition import phase_roles
from fedrnn.shared.errors import FedrnnError

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


def phase_slots(config: RunConfig) -> dict[str, int]:
    """Simulation slots of each phase: as many as clients take part in it (canary clients
    train, never evaluate)."""
    trainers = config.clients + config.canary_clients
    return {"train": min(trainers, config.clients_per_round or trainers),
            "evaluate": min(config.clients, config.eval_per_round or config.clients)}


def simulation_slots(config: RunConfig) -> int:
    """SuperNodes a simulation needs: one per client taking part in a round (both phases).

    Flower's Simulation Engine hands a node one message per poll (every 100 ms), so a node
    must not serve a round's evaluation and the next round's training at once.
    """
    return sum(phase_slots(config).values())


def is_simulation(grid: Grid) -> bool:
    """Whether ``grid`` is the Simulation Engine's in-memory grid (nodes are slots)."""
    state = getattr(grid, "state", None)
    return state is not None and hasattr(state, "get_node_info")


def nodes_in_partition_order(grid: Grid) -> list[int]:
    """Node ids, the node registered ``i``-th (partition-id ``i``) at index ``i`` in a
    simulation; sorted ids otherwise."""
    if is_simulation(grid):
        from flwr.supercore.constant import NodeStatus

        return [n.node_id for n in grid.state.get_node_info(statuses=[NodeStatus.ONLINE])]
    return sorted(grid.get_node_ids())


class ClientSampler:
    """Seeded per-round samples of clients (partition ids), and the nodes that serve them.

    ``slots=True`` (simulation): any node serves any client, the ``i``-th client drawn
    for a phase going to the ``i``-th of the phase's nodes (training: the first nodes,
    evaluation: the ones after them; ``phase_slots``). Otherwise node ``i`` is client ``i``.
    """

    def __init__(self, nodes: Sequence[int], config: RunConfig, *, slots: bool = False,
                 sizes: Sequence[int] | None = None) -> None:
        """``sizes``: each client's record count where the server knows it (a simulation);
        a client of one record either trains or evaluates (its record is held out), and
        sampling it for a phase it has no record for would waste a slot."""
        self.nodes = list(nodes)
        self.slots = slots
        self.seed = config.seed
        ids = np.arange(config.clients if slots else len(self.nodes))
        if sizes is None and config.partitioner == "record":
            sizes = [1] * len(ids)
        if sizes is not None:
            trains, evaluates = phase_roles(np.asarray(sizes)[ids], seed=config.seed,
                                            eval_fraction=config.eval_fraction)
            self.candidates = {"train": ids[trains], "evaluate": ids[evaluates]}
        else:
            self.candidates = {"train": ids, "evaluate": ids}
        if slots and config.canary_clients:
            # canary clients (shared.canary_clients) are drawn for training like any site
            canaries = np.arange(config.clients, config.clients + config.canary_clients)
            self.candidates["train"] = np.concatenate([self.candidates["train"], canaries])
        self.sizes = {"train": config.clients_per_round, "evaluate": config.eval_per_round}
        n_train = phase_slots(config)["train"]
        self.phase_nodes = {"train": self.nodes[:n_train], "evaluate": self.nodes[n_train:]}
        for phase, k in self.sizes.items():
            if k > len(self.candidates[phase]):
                raise FedrnnError(f"{phase}: {k} clients per round requested but only "
                                  f"{len(self.candidates[phase])} can {phase}")
            if slots and (k or len(self.candidates[phase])) > len(self.phase_nodes[phase]):
                raise FedrnnError(f"{phase}: {k} clients per round but "
                                  f"{len(self.phase_nodes[phase])} simulation slots")

    def sample(self, server_round: int, phase: str) -> list[int]:
        """Sorted partition ids taking part in ``phase`` of ``server_round``."""
        pool = self.candidates[phase]
        k = self.sizes[phase] or len(pool)
        if k >= len(pool):
            return pool.tolist()
        rng = np.random.default_rng([self.seed, server_round, PHASES[phase]])
        return np.sort(rng.choice(pool, size=k, replace=False)).tolist()

    def assign(self, partition_ids: Sequence[int], phase: str = "train") -> dict[int, int]:
        """node id -> the partition id it serves in ``phase``."""
        if self.slots:
            return dict(zip(self.phase_nodes[phase], partition_ids, strict=False))
        return {self.nodes[p]: p for p in partition_ids}

    def round_config(self, assignment: dict[int, int]) -> dict[str, list[int]]:
        """What the nodes need to know of ``assignment``: with slots, the partition each
        slot serves (-1: idle this phase); nothing otherwise."""
        if not self.slots:
            return {}
        position = {node: i for i, node in enumerate(self.nodes)}
        partitions = [-1] * len(self.nodes)
        for node, partition in assignment.items():
            partitions[position[node]] = partition
        return {P.PARTITIONS: partitions}

    def view(self, grid: Grid, assignment: dict[int, int]) -> Grid:
        """``grid`` showing only the nodes of ``assignment``."""
        return GridView(grid, list(assignment))


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
