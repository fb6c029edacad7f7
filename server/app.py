"""The fedrnn ServerApp (Flower Message API).

``app`` reads its settings from the run config (``flwr run .`` with
``[tool.flwr.app.config]`` and ``--run-config``); ``make_app(config)`` builds the same app
around an already resolved config, which is how ``fedrnn simulate`` starts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrnn.server.federation import run_federation
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.logs import console_logging


def make_app(config: RunConfig | None = None, *,
             on_finish: Callable[[Path], None] | None = None) -> ServerApp:
    """The ServerApp; ``on_finish(run_dir)`` is called once the run directory is complete,
    before the app returns to Flower (whose engine then winds down)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        console_logging()
        try:
            run_dir = run_federation(grid, config or RunConfig.from_flat(
                dict(context.run_config)))
        except FedrnnError as exc:
            if config is not None:  # `fedrnn simulate`: its command prints the error
                raise
            # Under Flower's ServerApp process (`fedrnn server`, `flwr run`), whose log
            # reaches the operator's console: one line, no traceback. The run directory
            # keeps its last checkpoint; `fedrnn server` says how to resume.
            logging.getLogger("fedrnn").error("fedrnn: error: %s", exc)
            return
        if on_finish is not None:
            on_finish(run_dir)

    return server_app


app = make_app()
