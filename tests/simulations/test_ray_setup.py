"""The local Ray instance: workers start with the ClientApp loaded; stopping leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from fedrnn.simulations.ray_setup import FAST_CONNECT, start_ray, stop_ray


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until_dead(pids: set[int], *, within: float = 30.0) -> set[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.e2e
def test_workers_start_with_the_client_app_and_one_thread_each(capfd):
    def worker_state() -> tuple[bool, bool, bool, int]:
        import sys

        print("worker-output-reaches-the-driver")
        # nothing in this task imports them: they were loaded as the worker started
        loaded = ("fedrnn.client.app" in sys.modules, "opacus" in sys.modules,
                  "torch" in sys.modules)
        return (*loaded, sys.modules["torch"].get_num_threads() if loaded[2] else 0)

    # --verbose: the workers' output is streamed to the driver (Ray's log monitor runs)
    start_ray(verbose=True)
    try:
        assert "log_monitor" in ray._private.worker._global_node.all_processes
        task = ray.remote(num_cpus=1)(worker_state)
        states = ray.get([task.remote() for _ in range(2)])
        printed = ""
        deadline = time.monotonic() + 30  # the log monitor tails the workers' files
        while "worker-output-reaches-the-driver" not in printed and time.monotonic() < deadline:
            time.sleep(0.2)
            printed += capfd.readouterr().out
    finally:
        stop_ray()
    assert states == [(True, True, True, 1)] * 2
    assert "worker-output-reaches-the-driver" in printed


def test_workers_load_flowers_actor_without_flowers_simulation_server():
    # The actor's package __init__ (LinkState, SQLAlchemy, Alembic: ~1 s of CPU a worker)
    # waits until the package itself is asked for something, then behaves as imported.
    code = ("import sys, fedrnn.simulations.worker_preload\n"
            "assert 'flwr.simulation.ray_transport.ray_actor' in sys.modules\n"
            "assert 'flwr.simulation.app' not in sys.modules\n"
            "import threading, flwr.simulation as fs\n"
            "found = []\n"  # two threads at once: the second waits for the first's __init__
            "def look(): found.append(callable(fs.run_simulation))\n"
            "threads = [threading.Thread(target=look) for _ in range(2)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]\n"
            "assert found == [True, True] and 'flwr.simulation.app' in sys.modules\n"
            "assert not hasattr(fs, 'no_such_name')\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_driver_does_not_import_opacus():
    # The driver only hands the ClientApp to Flower and holds weights; Opacus (1.4 s of CPU)
    # would compete with the workers' start-up on a small machine.
    code = ("import sys, fedrnn.simulations.simulate, fedrnn.server.app, fedrnn.client.app, "
            "fedrnn.shared.models, fedrnn.shared.privacy; sys.exit('opacus' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.e2e
def test_no_monitors_and_stopping_leaves_no_ray_process_behind():
    # (stop_ray(for_exit=True), which the process must follow by exiting, is checked by
    # running the program: test_simulation.py)
    pythonpath = os.environ.get("PYTHONPATH")
    start_ray(verbose=False)
    # this process's sys.path reaches Ray's processes, and nothing this process starts later
    assert os.environ.get("PYTHONPATH") == pythonpath
    node = ray._private.worker._global_node
    # the autoscaler's monitor and the log monitor (nobody reads the workers' output
    # without --verbose) are never started
    assert {"monitor", "log_monitor"}.isdisjoint(node.all_processes)
    assert {"gcs_server", "raylet"} <= set(node.all_processes)
    raylet = node.all_processes["raylet"][0].process.pid
    # Ray's processes retry their connections every 50 ms, not every second; the setting
    # is theirs, not this process's
    environ = Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0")
    assert {f"{k}={v}".encode() for k, v in FAST_CONNECT.items()} <= set(environ)
    assert not set(FAST_CONNECT) & set(os.environ)
    assert any(entry.startswith(b"PYTHONPATH=") for entry in environ)
    pids = {info.process.pid for infos in node.all_processes.values() for info in infos}

    def pid() -> int:
        return os.getpid()

    pids |= set(ray.get([ray.remote(num_cpus=1)(pid).remote() for _ in range(2)]))
    pids |= _children(raylet)  # its workers and agents
    assert len(pids) > 6

    assert _alive(raylet)
    stop_ray()
    assert not ray.is_initialized()
    assert _wait_until_dead(pids) == set()
