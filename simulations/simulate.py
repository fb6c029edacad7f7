"""``fedrnn simulate``: the whole federation on one machine, on Flower's Simulation Engine.

Every simulated site is a Flower SuperNode of the Simulation Runtime (Ray backend)
running the same ClientApp a deployed site runs; the ServerApp runs in this process.
All data is checked before Ray starts, so a bad file fails in a second, not mid-run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shared.config import RunConfig
from shared.data import client_data, partition_corpus, resolve
from shared.errors import ConfigError, FedrnnError

log = logging.getLogger("fedrnn")


def prepare(config: RunConfig) -> RunConfig:
    """Resolve the schema, fix the number of clients, and check the data once.

    The corpus is read and partitioned here, which checks every client's share (its size,
    its labels against the schema); one client is encoded to catch encoding problems.
    The other clients are encoded lazily, in the worker that serves them: at 15,000
    clients, encoding all of them up front would cost minutes and hold every tensor.
    """
    from server.federation import default_out_dir
    from server.sampling import ClientSampler

    config = resolve(config)
    names, _ = partition_corpus(config)
    if len(names) != config.clients:
        log.info("data has %d natural clients (the 'client' column); --clients ignored",
                 len(names))
        config = config.replace(clients=len(names))
    for k in (config.clients_per_round, config.eval_clients_per_round):
        if k > config.clients:
            raise ConfigError(f"clients-per-round {k} exceeds the {config.clients} clients")
    try:
        ClientSampler(range(config.clients), config)  # enough sites for each phase?
    except FedrnnError as exc:
        raise ConfigError(str(exc)) from None
    client_data(config, 0)  # fail here, not later inside a Ray worker
    out = Path(config.out or default_out_dir())
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; choose another --out or remove it")
    return config.replace(out=str(out))


class _HideDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage()


def simulate(config: RunConfig, *, verbose: bool = False) -> Path:
    """Run the simulation ``config`` describes; returns the run directory."""
    config = prepare(config)
    log.info("%d clients (%s), %d rounds, %s on %s, %s", config.clients,
             "all per round" if not config.clients_per_round
             else f"{config.clients_per_round} per round", config.rounds, config.model,
             config.data or config.dataset,
             f"DP epsilon {config.epsilon:g} delta {config.delta:g}" if config.dp else "no DP")

    flwr_logger = logging.getLogger("flwr")
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    # ``run_simulation`` is Flower's in-process entry to its Simulation Runtime; Flower
    # marks it deprecated in favour of ``flwr run``, which fedrnn also supports (README).
    flwr_logger.addFilter(_HideDeprecation())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a CPU-only tip
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_app

    run_simulation(
        server_app=make_app(config),
        client_app=client_app,
        num_supernodes=config.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                          "logging_level": "ERROR" if not verbose else "INFO"},
        },
        verbose_logging=verbose,
    )
    out = Path(config.out)
    if not (out / "summary.json").exists():
        raise ConfigError(f"the simulation ended without finishing the run in {out}; "
                          "rerun with --verbose to see Flower's and Ray's logs")
    return out
