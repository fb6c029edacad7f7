"""``flwr run . local``: Flower's own CLI runs the repository as a Flower App.

The end-to-end test runs the command a user runs, on loopback, with its own ``FLWR_HOME``
and ports, and stops the local SuperLink that ``flwr run`` leaves running (with everything
it started) afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedrnn.server import app as server_app
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_uv_installs_none_of_the_apps_dependencies() -> None:
    """Flower's SuperLink `uv sync`s the app at run start: every dependency (uv resolves the
    extras too) must be excluded, or uv downloads it (torch: its CUDA build) into the run's
    environment."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"].get("optional-dependencies", {}).values()
    names = {re.split(r"[\s\[<>=!~;@]", dep, maxsplit=1)[0].lower()
             for dep in [*project["project"]["dependencies"], *(d for e in extras for d in e)]}
    assert set(project["tool"]["uv"]["exclude-dependencies"]) == names


class _SimulationGrid:
    """What ``site_nodes`` reads of the Simulation Engine's grid: its in-memory state."""

    def __init__(self, count: int) -> None:
        nodes = [SimpleNamespace(node_id=1000 + i) for i in range(count)]
        self.state = SimpleNamespace(get_node_info=lambda statuses: nodes)


@pytest.fixture
def settled_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_app, "REGISTRATION_SETTLED", 0.0)


def test_flwr_run_nodes_are_the_clients(settled_at_once: None) -> None:
    grid = server_app.site_nodes(_SimulationGrid(3), RunConfig(clients=3))
    assert list(grid.get_node_ids()) == [1000, 1001, 1002]
    # shown as sites, not as `fedrnn simulate`'s worker slots
    from fedrnn.server.sampling import is_simulation

    assert not is_simulation(grid)


@pytest.mark.parametrize("supernodes", [2, 4])
def test_flwr_run_needs_one_supernode_per_client(settled_at_once: None,
                                                 supernodes: int) -> None:
    with pytest.raises(ConfigError, match='num-supernodes=3" or --run-config "clients='):
        server_app.site_nodes(_SimulationGrid(supernodes), RunConfig(clients=3))


def test_a_deployments_grid_is_left_as_it_is() -> None:
    grid = SimpleNamespace(get_node_ids=lambda: [7, 8])
    assert server_app.site_nodes(grid, RunConfig(clients=5)) is grid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _local_superlinks(flwr_home: Path) -> list[int]:
    """The SuperLinks ``flwr run`` started for ``flwr_home`` (it logs under it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (any(arg.endswith(b"flower-superlink") for arg in cmdline[:2])
                    and any(str(flwr_home).encode() in arg for arg in cmdline)):
                pids.append(int(entry.name))
    return pids


def _stop_tree(roots: list[int]) -> None:
    """Stop ``roots`` and every process under them (SuperExec, simulation, Ray)."""
    tree = _children()
    pids, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running, not only a zombie that its (already stopped) parent did not reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to clean up")
def test_flwr_run_local_completes_a_round(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ,
           "FLWR_HOME": str(flwr_home),
           # the local SuperLink's fixed ports, free ones here (tests may run side by side)
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "FLWR_TELEMETRY_ENABLED": "0",
           # `flwr` starts `flower-superlink` from PATH: this environment's
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           # uv may not download anything: the run's environment must need nothing
           "UV_OFFLINE": "1", "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # as a user runs it
    try:
        result = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "local",
             "--federation-config", "num-supernodes=2",
             "--run-config", f'rounds=1 clients=2 dataset="synthetic" hidden-size=8 '
                             f'embedding-dim=8 out="{out}"',
             "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _stop_tree(_local_superlinks(flwr_home))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    # Flower's runtime dependency installation ran, and installed nothing
    assert "No additional application dependencies needed installation" in log, log
    assert "round   1/1" in log, log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"], r["dropped"]) for r in rows] == [(1, 2, 0)]
    assert (out / "summary.json").exists()
    assert not _local_superlinks(flwr_home)
