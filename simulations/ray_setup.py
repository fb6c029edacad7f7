"""The Ray instance under ``fedrnn simulate``: started early, its workers warm, stopped fast.

Four of Ray's defaults cost the simulation seconds that the same client work in a plain
process never pays (``fedrnn bench simulation`` measures the difference):

- a Ray worker imports torch, Opacus and Flower only when Flower's first
  message reaches it, so round 1 waited for it. Here every worker imports them as it
  starts (Ray's ``preload_python_modules``), while the driver reads the data;
- Flower's backend starts Ray with a ``runtime_env``, which stops Ray from pre-starting
  its workers; ``start_ray`` starts it without one (same PYTHONPATH, by environment);
- a head node starts the autoscaler's monitor and a log monitor, two Python processes
  whose imports compete with the driver's and hold back the raylet, which starts after
  them. The monitor has nothing to scale on one machine; the log
  monitor only streams the workers' output to a driver that asked for it (``--verbose``);
- Ray's processes retry their connections one second apart (``FAST_CONNECT``).

Nothing here imports torch: Ray should start before the driver's own imports.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import ray

# CPUs Ray reserves for each ClientApp actor, hence the actors per machine (Flower sizes
# its pool as CPUs // this) and the torch threads each of them runs (worker_preload.py).
CPUS_PER_CLIENT = 1

# Imported by every worker process of a local Ray instance before it takes work.
WORKER_PRELOAD = "fedrnn.simulations.worker_preload"

# Ray's processes connect to the raylet and its object store with retries, one second
# apart by default (10 attempts). At start-up the raylet's first attempt on its own store
# often came before the store's socket existed, and it waited a full second for nothing
# (a gap in raylet.out). Retrying every 50 ms keeps the same 10 s of patience.
FAST_CONNECT = {"RAY_raylet_client_connect_timeout_milliseconds": "50",
                "RAY_raylet_client_num_connect_attempts": "200"}


def start_ray(*, verbose: bool) -> None:
    """Start Ray for Flower's backend (or join ``RAY_ADDRESS``), without a ``runtime_env``.

    Flower's backend would start Ray with ``runtime_env={"env_vars": {"PYTHONPATH": ...}}``;
    any runtime_env stops Ray from pre-starting its worker processes, so each Ray worker
    (one per core) then starts only when the first round needs it. Ray's processes inherit
    this process's environment, so the same PYTHONPATH goes there instead.
    """
    if ray.is_initialized():
        return
    quiet = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if os.environ.get("RAY_ADDRESS"):
        # A running (multi-node) Ray cluster: its nodes bring their own CPUs and Python
        # environment (and their own worker settings); Flower sizes its worker pool to the
        # cluster's CPUs.
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
        return
    paths = [p for p in sys.path if p]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    # Ray reads its settings from RAY_<name> in the environment of the processes it starts;
    # scoped to this call (Ray's processes start within it) so that nothing else this
    # process starts later inherits them, nor this process's sys.path as PYTHONPATH.
    with _environ(RAY_preload_python_modules=WORKER_PRELOAD,
                  PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), **FAST_CONNECT), \
            _head_processes(monitor=False, log_monitor=verbose):
        # address "local": a fresh instance, even if `ray start` left a cluster here
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 **quiet)


def stop_ray(*, for_exit: bool = False) -> None:
    """Ray's orderly shutdown (the raylet stops its workers and agents), or a fast one.

    ``for_exit``: the process ends right after this (``os._exit``) while Flower's engine
    may still be running on its threads, as when a run is interrupted. Ray is then stopped
    from below: the raylet is asked to stop (it stops its workers and agents) and waited
    for (tens of ms); Ray's other processes die with this one (Linux ends them with their
    parent) or are killed. The driver is not disconnected: Ray ends a process with status
    1 as soon as one of its threads calls Ray after ``ray.shutdown``.
    """
    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)
    raylets = getattr(node, "all_processes", {}).get("raylet") if node is not None else None
    if not for_exit or not raylets:  # joined to a cluster: nothing of it is ours to stop
        ray.shutdown()
        return
    raylet = raylets[0].process
    raylet.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        raylet.wait(timeout=10)
    if not getattr(node, "kernel_fate_share", False):
        node.kill_all_processes(check_alive=False, allow_graceful=False)


@contextlib.contextmanager
def _head_processes(*, monitor: bool, log_monitor: bool) -> Iterator[None]:
    """Have the head node ``ray.init`` starts leave out the autoscaler's monitor and/or the
    log monitor. ``ray start --head`` has flags for both (``--no-monitor``,
    ``--include-log-monitor``); ``ray.init`` passes neither to the ``RayParams`` it builds,
    so their defaults are set here for the duration of the call."""
    params = ray._private.parameter.RayParams
    original = params.__init__

    def init(self, *args, **kwargs) -> None:
        kwargs.setdefault("no_monitor", not monitor)
        kwargs.setdefault("include_log_monitor", log_monitor)
        original(self, *args, **kwargs)

    params.__init__ = init
    try:
        yield
    finally:
        params.__init__ = original


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
