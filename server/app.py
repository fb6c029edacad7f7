"""The fedrnn ServerApp (Flower Message API).

``app`` reads its settings from the run config (``flwr run .`` with
``[tool.flwr.app.config]`` and ``--run-config``); ``make_app(config)`` builds the same app
around an already resolved config, which is how ``fedrnn simulate`` starts it.

The two differ in what the Simulation Engine's SuperNodes are. ``fedrnn simulate`` starts
worker *slots* (``server.sampling.simulation_slots``: one per client taking part in a
round's two phases) and tells each slot which client it serves. Under ``flwr run`` the
federation's ``num-supernodes`` are the clients themselves, one each, serving their own
``partition-id`` as a deployed site serves its own data: the server waits for them to
register, checks there is one per client, and drives them as it drives a deployment's
sites (sampled by Flower's strategy, phases one after the other).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrnn.server.federation import run_federation
from fedrnn.server.sampling import GridView, is_simulation, nodes_in_partition_order
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError, FedrnnError
from fedrnn.shared.logs import console_logging

# The Simulation Engine registers its SuperNodes in one loop right after the ServerApp
# starts, before Ray (seconds) starts: a count unchanged for this long is the federation's.
REGISTRATION_SETTLED = 1.0  # seconds
REGISTRATION_TIMEOUT = 120.0  # seconds until the first SuperNode, at most


def make_app(config: RunConfig | None = None, *,
             on_finish: Callable[[Path], None] | None = None) -> ServerApp:
    """The ServerApp; ``on_finish(run_dir)`` is called once the run directory is complete,
    before the app returns to Flower (whose engine then winds down)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        console_logging()
        try:
            if config is not None:  # `fedrnn simulate`: the nodes are its worker slots
                run_dir = run_federation(grid, config)
            else:
                run_config = RunConfig.from_flat(dict(context.run_config))
                run_dir = run_federation(site_nodes(grid, run_config), run_config)
        except FedrnnError as exc:
            if config is not None:  # `fedrnn simulate`: its command prints the error
                raise
            # Under Flower's ServerApp process (`fedrnn server`, `flwr run`), whose log
            # reaches the operator's console: one line, no traceback. The run directory
            # keeps its last checkpoint; `fedrnn server` says how to resume.
            logging.getLogger("fedrnn").error("error: %s", exc)  # shown as "fedrnn: error: ..."
            return
        if on_finish is not None:
            on_finish(run_dir)

    return server_app


def site_nodes(grid: Grid, config: RunConfig) -> Grid:
    """The grid of a run configured by its run config: a deployment's as it is; the
    Simulation Engine's (``flwr run``) once its SuperNodes, one per client, have registered,
    shown as a plain grid of sites (``run_federation`` takes the engine's own grid for
    ``fedrnn simulate``'s worker slots).

    Raises ``ConfigError`` unless the federation has exactly ``config.clients`` SuperNodes.
    """
    if not is_simulation(grid):
        return grid
    nodes = _registered_nodes(grid)
    if len(nodes) != config.clients:
        raise ConfigError(
            f"the federation has {len(nodes)} SuperNodes but the run config has "
            f"clients={config.clients}; one SuperNode serves one client: run with "
            f'--federation-config "num-supernodes={config.clients}" or '
            f'--run-config "clients={len(nodes)}"')
    return GridView(grid, nodes)


def _registered_nodes(grid: Grid) -> list[int]:
    """The Simulation Engine's node ids in partition order, once registration is over."""
    started = time.monotonic()
    nodes: list[int] = []
    changed = started
    while True:
        current = nodes_in_partition_order(grid)
        now = time.monotonic()
        if len(current) != len(nodes):
            nodes, changed = current, now
        elif nodes and now - changed >= REGISTRATION_SETTLED:
            return nodes
        if not nodes and now - started > REGISTRATION_TIMEOUT:
            raise FedrnnError(f"no SuperNode registered within {REGISTRATION_TIMEOUT:.0f} s")
        time.sleep(0.05)


app = make_app()
