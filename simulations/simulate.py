"""``fedrnn simulate``: the whole federation on one machine, on Flower's Simulation Engine.

Every simulated site is a Flower SuperNode of the Simulation Runtime (Ray backend)
running the same ClientApp a deployed site runs; the ServerApp runs in this process.
The data is read and checked while Ray starts, so a bad file stops the run before any
site trains, with one line naming the problem.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import ray

# Nothing here imports torch at module level: Ray should start before the imports and the
# data reading, which run beside it in a thread.
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError, FedrnnError
from fedrnn.shared.run_records import METRICS_FILE, SUMMARY_FILE
from fedrnn.simulations.ray_setup import CPUS_PER_CLIENT, start_ray

if TYPE_CHECKING:
    from fedrnn.server.sampling import ClientSampler

log = logging.getLogger("fedrnn")


def prepare(config: RunConfig) -> RunConfig:
    """Resolve the schema, fix the number of clients, and check the data once.

    The corpus is read and partitioned here, which checks every client's share (its size,
    its labels against the schema); one client is encoded to catch encoding problems.
    The other clients are encoded lazily, in the worker that serves them: at 15,000
    clients, encoding all of them up front would cost minutes and hold every tensor.
    """
    from fedrnn.server.federation import default_out_dir
    from fedrnn.server.initial import initial_weights
    from fedrnn.server.sampling import ClientSampler, simulation_slots
    from fedrnn.server.stopping import watched_metric
    from fedrnn.shared.data import (
        client_data,
        partition_corpus,
        partition_notes,
        partition_sizes,
        resolve,
    )

    # config.toml says where the run read its records and its first weights: absolute, so
    # that the run directory means the same from anywhere (fedrnn audit --empirical reads
    # the canary site's records again)
    config = config.replace(**{key: str(Path(value).expanduser().resolve())
                               for key in ("data", "init_from")
                               if (value := getattr(config, key))})
    config = resolve(config)
    watched_metric(config)  # a metric the task does not report: stop before Ray works
    initial_weights(config)  # weights that do not fit: one line, before Ray works
    names, _ = partition_corpus(config)
    warning, info = partition_notes(config)
    if warning:
        log.warning("%s", warning)
    if info:
        log.info("%s", info)
    if len(names) != config.clients:
        log.info("data has %d clients (%s); --clients ignored", len(names),
                 "one per record" if config.partitioner == "record" else "the 'client' column")
        config = config.replace(clients=len(names))
    # canary clients (--canary-clients) train, so they count for training, not evaluation
    for k, pool in ((config.clients_per_round, config.clients + config.canary_clients),
                    (config.eval_clients_per_round, config.clients)):
        if k > pool:
            raise ConfigError(f"clients-per-round {k} exceeds the {pool} clients")
    try:
        # enough sites (and canary clients) for each phase?
        ClientSampler(range(simulation_slots(config)), config, slots=True,
                      sizes=partition_sizes(config))
    except FedrnnError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(config.out or default_out_dir())
    if (out / METRICS_FILE).exists():
        raise ConfigError(f"{out} already holds a run; choose another --out or remove it")
    config = config.replace(out=str(out))
    if config.canaries or config.canary_secrets:
        config = plant_canaries(config, names, ClientSampler(range(config.clients), config))
    client_data(config, 0)  # fail here, not later inside a Ray worker
    return config


def plant_canaries(config: RunConfig, names: list[str], sampler: ClientSampler) -> RunConfig:
    """Choose the canary site (``canary-site``, else the first site that trains), draw
    which canaries it trains on, and keep the draw in ``<out>/audit/canaries.json``."""
    from fedrnn.shared.data.canaries import new_draw, read_draw_file, write_draw

    site = config.canary_site or names[sampler.sample(1, "train")[0]]
    draw = None
    if config.canary_draw:  # another run's canaries, exactly
        try:
            draw = read_draw_file(config.canary_draw)
        except OSError as exc:
            raise ConfigError(f"canary-draw {config.canary_draw}: {exc.strerror}") from None
        if (len(draw.included), draw.secrets, draw.repeats) != (
                config.canaries, config.canary_secrets, config.canary_repeats):
            raise ConfigError(f"canary-draw {config.canary_draw} holds {len(draw.included)} "
                              f"canaries and {draw.secrets} secret(s) x {draw.repeats}; this "
                              f"run asks for --canaries {config.canaries}, --canary-secrets "
                              f"{config.canary_secrets} x {config.canary_repeats}")
        site = draw.site
    if site not in names:
        raise ConfigError(f"canary-site {site!r} is not one of the run's sites "
                          f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    path = write_draw(config.out, draw or new_draw(config, site))
    log.info("%d canaries and %d secret(s) planted at site %s (draw: %s)", config.canaries,
             config.canary_secrets, site, path)
    return config.replace(canary_site=site)


class _HideDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage()


def simulate(config: RunConfig, *, verbose: bool = False,
             wait_for_teardown: bool = True) -> Path:
    """Run the simulation ``config`` describes; returns the run directory.

    With ``wait_for_teardown=False`` it returns as soon as the run directory is complete
    (summary, model, metrics; the sites' ledgers were committed before they trained), while
    Flower's engine still winds down in a daemon thread (its worker threads notice the end
    within a second). That is for a process about to exit, which then calls
    ``ray_setup.stop_ray()``: nothing of the run is left to write.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a CPU-only tip
    # Ray starts (mostly waiting on its processes, whose workers then import the ClientApp)
    # while this process reads and checks the data in a thread; ray.init itself must run on
    # the main thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        prepared = pool.submit(_prepare_and_import, config)
        start_ray(verbose=verbose)
        try:
            config = prepared.result()
        except BaseException:
            ray.shutdown()
            raise
    log.info("%d clients (%s), %d rounds, %s on %s, %s", config.clients,
             "all per round" if not config.clients_per_round
             else f"{config.clients_per_round} per round", config.rounds, config.model,
             config.data or config.dataset,
             _privacy_line(config))

    flwr_logger = logging.getLogger("flwr")
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    # ``run_simulation`` is Flower's in-process entry to its Simulation Runtime; Flower
    # marks it deprecated in favour of ``flwr run``, which fedrnn also supports
    # (docs/simulation.md).
    flwr_logger.addFilter(_HideDeprecation())
    from flwr.simulation import run_simulation

    from fedrnn.client.app import app as client_app
    from fedrnn.server.app import make_app
    from fedrnn.server.sampling import simulation_slots

    finished = threading.Event()
    failure: list[BaseException] = []

    def engine() -> None:
        try:
            run_simulation(
                server_app=make_app(config, on_finish=lambda _: finished.set()),
                client_app=client_app,
                num_supernodes=simulation_slots(config),  # worker slots (sampling.py)
                # Ray is already running (``start_ray``): Flower's backend uses it as it is.
                backend_config={"client_resources": {"num_cpus": CPUS_PER_CLIENT,
                                                     "num_gpus": 0.0}},
                verbose_logging=verbose,
            )
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)
        finally:
            finished.set()

    # Flower's engine runs on its own thread so that the caller can go on once the run is
    # written, without waiting for the engine's teardown (``wait_for_teardown``).
    thread = threading.Thread(target=engine, name="flower-simulation", daemon=True)
    thread.start()
    finished.wait()
    if wait_for_teardown or failure or not thread.is_alive():
        thread.join()
        if failure:
            raise failure[0]
    out = Path(config.out)
    if not (out / SUMMARY_FILE).exists():
        raise ConfigError(f"the simulation ended without finishing the run in {out}; "
                          "rerun with --verbose to see Flower's and Ray's logs")
    return out


def _prepare_and_import(config: RunConfig) -> RunConfig:
    config = prepare(config)
    import flwr.simulation  # noqa: F401

    import fedrnn.client.app  # noqa: F401  (the ClientApp, without Opacus: see its module docstring)

    return config


def _privacy_line(config: RunConfig) -> str:
    """What the run promises, as its first log line says it: the record-level target of
    the sites, the user-level noise of the server, or both."""
    mech = config.mechanism
    parts = []
    if mech.sites_run_dpsgd:
        parts.append(f"record-level DP epsilon {config.epsilon:g} delta {config.delta:g}")
    if mech.server_clips_and_noises:
        parts.append(f"user-level DP noise {config.user_noise_multiplier:g} x clip "
                     f"{config.user_clip_norm:g}")
    return " and ".join(parts) or "no DP"
