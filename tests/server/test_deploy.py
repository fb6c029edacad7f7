"""Deployment end to end on loopback: real `fedrnn server` / `fedrnn client` processes,
Flower's SuperLink and SuperNodes, TLS, node authentication, kills and restarts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from fedrnn.shared.certs import write_certificates
from fedrnn.shared.cli import main
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import site_data
from fedrnn.shared.data.readers import read_file

BUDGET = ["--budget-epsilon", "8", "--budget-delta", "1e-5"]
# the README's deployment of sites' own records: the schema from flags, no dataset
OWN = ["--task", "classify", "--labels", "neg,pos", "--features", "x0,x1,x2",
       "--hidden-size", "8", "--batch-size", "16"]
SMALL = ["--dataset", "synthetic", "--task", "classify", "--hidden-size", "8",
         "--batch-size", "16"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A fedrnn CLI process whose output goes to a file the test can search."""

    def __init__(self, tmp: Path, name: str, args: list[str]) -> None:
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_HOME": str(tmp / f"{name}.flwr")}
        with self.log.open("w") as fh:
            # its own process group: what it starts (SuperLink, ServerApp, SuperNode) can be
            # ended with it, even after the process itself was killed
            self.process = subprocess.Popen([sys.executable, "-m", "fedrnn.shared.cli", *args],
                                            stdout=fh, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        tail = lambda: "\n".join(self.output.splitlines()[-20:])  # noqa: E731
        # a process that ended without the text fails the test now, not at the timeout
        _until(lambda: text in self.output or self.process.poll() is not None, timeout,
               f"{text!r} in {self.log.name}:\n{tail()}")
        if text not in self.output:
            pytest.fail(f"{self.log.name} ended without {text!r}:\n{tail()}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"{self.log.name} did not end:\n{self.output[-3000:]}")

    def kill(self) -> None:
        """The host dies: the process and what it started (a site's SuperNode, which would
        otherwise stay connected and be sampled again)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            continue
    return [pid for pid in found if pid != os.getpid()]


def _charges(ledger: Path) -> list[int]:
    if not ledger.exists():
        return []
    with sqlite3.connect(ledger) as db:
        try:
            return [r[0] for r in db.execute("SELECT round FROM releases WHERE purpose = "
                                             "'train' ORDER BY id")]
        except sqlite3.OperationalError:  # created, tables not yet there
            return []


def _rounds(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line]


@pytest.fixture
def deployment(tmp_path: Path):
    """Certificates, three sites' records files, and every process stopped at the end."""
    write_certificates(tmp_path / "certs", clients=4)
    keys = tmp_path / "keys"
    keys.mkdir()
    for i in (1, 2, 3):  # site-4's key exists but is not authorised
        (keys / f"site-{i}.pub").write_bytes((tmp_path / "certs" / f"site-{i}.pub").read_bytes())
    assert main(["split", str(tmp_path / "sites"), "--dataset", "synthetic",
                 "--task", "classify", "--clients", "3"]) == 0
    procs: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(tmp_path, name, list(args))
        procs.append(proc)
        return proc

    yield tmp_path, start
    for proc in procs:  # all asked at once, then each awaited
        if proc.process.poll() is None:
            proc.process.terminate()
    for proc in procs:
        proc.stop()
        with contextlib.suppress(ProcessLookupError):  # what a killed process left running
            os.killpg(proc.process.pid, signal.SIGKILL)
    # A killed server's ServerApp runs in a session of Flower's own and outlives it; its
    # command line names this test's certificates.
    for pid in _processes_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _client(tmp: Path, site: int, port: int, *extra: str) -> list[str]:
    return ["client", "--server", f"127.0.0.1:{port}", "--root-cert",
            str(tmp / "certs" / "ca.crt"), "--data", str(tmp / "sites" / f"site-{site}.csv"),
            "--ledger", str(tmp / f"site-{site}.sqlite"), *BUDGET, *extra]


def test_certs_cover_the_hosts_and_refuse_to_overwrite(tmp_path):
    written = write_certificates(tmp_path, hosts=["fedrnn.example.org", "10.0.0.7"], clients=2)
    assert {p.name for p in written} == {"ca.crt", "ca.key", "server.crt", "server.key",
                                         "site-1.key", "site-1.pub", "site-2.key", "site-2.pub"}
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fedrnn.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1",
                                                                             "10.0.0.7"}
    assert (tmp_path / "site-1.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    assert main(["certs", str(tmp_path)]) == 2  # a CA is never replaced by accident


def test_split_writes_files_a_site_reads_back(tmp_path):
    config = RunConfig(dataset="synthetic", task="classify", clients=3)
    assert main(["split", str(tmp_path), "--dataset", "synthetic", "--task", "classify",
                 "--clients", "3"]) == 0
    files = sorted(tmp_path.glob("*.csv"))
    assert [f.name for f in files] == ["site-0.csv", "site-1.csv", "site-2.csv"]
    assert sum(len(read_file(f)) for f in files) == 90
    from fedrnn.shared.data import resolve

    data = site_data(resolve(config), files[0], secret=b"k" * 32, eval_fraction=0.2)
    assert len(data.train) + len(data.eval) == 30


def test_a_classify_site_whose_columns_differ_from_the_runs_is_refused(tmp_path):
    """Column i is the run's feature i: a site with other or reordered columns would train
    the shared model on the wrong inputs, silently."""
    from fedrnn.shared.errors import DataError

    run = RunConfig(dataset="", task="classify", labels="neg,pos", features="x0,x1")
    rows = [f"p{i},{t},{i + t},{i - t},{'pos' if i % 2 else 'neg'}"
            for i in range(6) for t in range(2)]
    for header in ("sequence_id,time,x1,x0,label", "sequence_id,time,x0,hr,label"):
        path = tmp_path / "site.csv"
        path.write_text(header + "\n" + "\n".join(rows) + "\n")
        with pytest.raises(DataError, match="differ from the run's features x0,x1"):
            site_data(run, path, secret=b"k" * 32, eval_fraction=0.2)
    path.write_text("sequence_id,time,x0,x1,label\n" + "\n".join(rows) + "\n")
    data = site_data(run, path, secret=b"k" * 32, eval_fraction=0.2)
    assert len(data.train) + len(data.eval) == 6


def test_client_with_a_bad_data_file_stops_before_connecting(tmp_path, capsys):
    bad = tmp_path / "records.csv"
    bad.write_text("sequence_id,time,hr\np1,0,abc\n")
    write_certificates(tmp_path / "certs")
    code = main(["client", "--server", "127.0.0.1:1", "--root-cert",
                 str(tmp_path / "certs" / "ca.crt"), "--data", str(bad),
                 "--ledger", str(tmp_path / "site.sqlite"), *BUDGET])
    assert code == 2
    err = capsys.readouterr().err
    assert "records.csv, line 2, column 'hr'" in err and "Traceback" not in err
    assert not (tmp_path / "site.sqlite").exists()
    assert main(["client", "--server", "127.0.0.1:1", "--data", str(bad),
                 "--ledger", str(tmp_path / "site.sqlite"), *BUDGET]) == 2
    assert "--root-cert" in capsys.readouterr().err
    # a site without its own budget refuses to start: one line naming both flags
    assert main(["client", "--server", "127.0.0.1:1", "--insecure", "--data", str(bad),
                 "--ledger", str(tmp_path / "site.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "--budget-epsilon and --budget-delta required" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    good = tmp_path / "good.csv"
    good.write_text("sequence_id,time,hr\np1,0,60\np2,0,61\n")
    for flag, value in (("--budget-epsilon", "nan"), ("--budget-epsilon", "inf"),
                        ("--budget-delta", "0"), ("--max-wait", "-1")):
        assert main(["client", "--server", "127.0.0.1:1", "--root-cert",
                     str(tmp_path / "certs" / "ca.crt"), "--data", str(good),
                     "--ledger", str(tmp_path / "site.sqlite"), *BUDGET, flag, value]) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "site.sqlite").exists()


def test_client_gives_up_on_an_unreachable_server_after_max_wait(tmp_path, capsys):
    write_certificates(tmp_path / "certs")
    assert main(["split", str(tmp_path / "sites"), "--dataset", "synthetic", "--clients",
                 "2"]) == 0
    code = main(["client", "--server", f"127.0.0.1:{_free_port()}", "--root-cert",
                 str(tmp_path / "certs" / "ca.crt"), "--data",
                 str(tmp_path / "sites" / "site-0.csv"), "--ledger",
                 str(tmp_path / "site.sqlite"), "--max-wait", "3", *BUDGET])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not be reached" in err and "Traceback" not in err


def test_a_server_for_sites_own_records_takes_its_schema_from_flags(tmp_path, text_jsonl):
    from fedrnn.server.deploy import check_server_config
    from fedrnn.shared.errors import ConfigError

    series = check_server_config(RunConfig(dataset="", task="classify", labels="neg,pos",
                                           features="x0,x1,x2"))
    assert series.dataset == "" and series.feature_names == ["x0", "x1", "x2"]
    text = check_server_config(RunConfig(dataset="", task="classify", labels="neg,pos"))
    site = site_data(text, text_jsonl, secret=b"k" * 32, eval_fraction=0.2)  # JSONL site
    assert len(site.train) + len(site.eval) == 30
    assert check_server_config(RunConfig(dataset="", task="lm")).task == "lm"
    for bad in (dict(task="classify", labels="only"), dict(task="forecast"),
                dict(task="lm", features="x")):
        with pytest.raises(ConfigError):
            check_server_config(RunConfig(dataset="", **bad))


def test_server_refuses_bad_settings_before_starting(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["server", "--insecure", "--data", "x.csv", "--out", str(out)]) == 2
    assert "the server holds no records" in capsys.readouterr().err
    assert main(["server", "--out", str(out)]) == 2
    assert "--certificates" in capsys.readouterr().err
    assert main(["server", "--certificates", str(tmp_path), "--out", str(out)]) == 2
    assert "ca.crt" in capsys.readouterr().err
    missing = tmp_path / "pretrained.pt"
    assert main(["server", "--insecure", "--dataset", "synthetic", "--init-from",
                 str(missing), "--out", str(out)]) == 2
    assert f"{missing}: init-from not found" in capsys.readouterr().err
    assert not (out / "superlink.log").exists()  # refused before Flower's SuperLink started


@pytest.mark.e2e
def test_tls_auth_three_sites_complete_a_run(deployment, capsys):
    tmp, start = deployment
    port = _free_port()
    out = tmp / "run"
    # the sites hold their own long-format CSVs (missing values included); the server
    # has no records, only the schema
    server = start("server", "server", "--address", f"127.0.0.1:{port}", "--certificates",
                   str(tmp / "certs"), "--require-auth", str(tmp / "keys"), "--min-clients",
                   "3", "--rounds", "2", "--out", str(out), *OWN)
    server.wait_for("started run")

    # refused: a CA that did not sign the server's certificate; a key not authorised
    write_certificates(tmp / "other")
    # (--rejoin-wait 0: a refused key is not retried for the window a restarted site's
    # previous connection may still hold it, tests/client/test_site_host.py)
    unknown = start("unknown", *_client(tmp, 0, port, "--auth-key",
                                        str(tmp / "certs" / "site-4.key"), "--rejoin-wait",
                                        "0"))
    no_ca = start("no-ca", *_client(tmp, 0, port, "--auth-key",  # the last --root-cert wins
                                    str(tmp / "certs" / "site-1.key"), "--root-cert",
                                    str(tmp / "other" / "ca.crt")))
    assert unknown.wait(120) == 2
    assert "not among the server's authorised keys" in unknown.output
    assert no_ca.wait(120) == 2
    assert "not signed by --root-cert" in no_ca.output
    for proc in (unknown, no_ca):
        assert "Traceback" not in proc.output
        assert _charges(tmp / "site-0.sqlite") == []

    # site 2 allows far less than the run asks for (epsilon 8): it calibrates its noise
    # to its own budget; site 1 declines to evaluate
    sites = [start(f"site-{i}", *_client(tmp, i, port, "--auth-key",
                                         str(tmp / "certs" / f"site-{i + 1}.key"),
                                         *(["--budget-epsilon", "0.5"] if i == 2 else []),
                                         *(["--no-evaluate"] if i == 1 else [])))
             for i in range(3)]
    assert server.wait(300) == 0, server.output[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 3 and r["declined"] == 0 for r in rows)
    assert {"summary.json", "model.pt", "metrics.png", "config.toml"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "checkpoint.pt").exists()
    # each site's own ledger shows its spend, within its own budget
    for i in range(3):
        assert _charges(tmp / f"site-{i}.sqlite") == [1, 2]
    sites[1].wait_for("evaluation is off")
    assert main(["audit", str(tmp / "site-2.sqlite"), "--json"]) == 0
    spent = json.loads(capsys.readouterr().out)["clients"][0]
    assert 0 < spent["epsilon"] <= 0.5 and spent["budget_epsilon"] == 0.5
    assert "final:" in server.output and "Traceback" not in server.output


@pytest.mark.e2e
def test_killed_client_and_killed_server_resume(deployment):
    tmp, start = deployment
    port = _free_port()
    out = tmp / "run"
    server_args = ["server", "--address", f"127.0.0.1:{port}", "--certificates",
                   str(tmp / "certs"), "--min-clients", "3", "--rounds", "3", "--out",
                   str(out), "--round-timeout", "10", *SMALL]
    server = start("server", *server_args)
    sites = [start(f"site-{i}", *_client(tmp, i, port)) for i in range(3)]

    # site 2 dies mid-round: after charging its ledger, before its reply
    _until(lambda: _charges(tmp / "site-2.sqlite"), 180, "site-2's first charge")
    sites[2].kill()
    charged = _charges(tmp / "site-2.sqlite")
    _until(lambda: 1 in _rounds(out), 240, "round 1 to complete without site 2")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["clients"] == 2 and first["dropped"] == 1  # the two that answered
    # it restarts with the same ledger, which still holds what was charged
    sites[2] = start("site-2-again", *_client(tmp, 2, port))
    sites[2].wait_for("connected to the server")
    assert _charges(tmp / "site-2.sqlite")[:len(charged)] == charged

    # the server dies after round 2 and resumes from its checkpoint, not from scratch
    _until(lambda: 2 in _rounds(out), 240, "round 2")
    server.kill()
    assert _rounds(out)[:2] == [1, 2]
    server = start("server-again", *server_args)
    assert server.wait(300) == 0, server.output[-3000:]
    assert "resuming" in server.output
    assert _rounds(out) == [1, 2, 3]
    assert (out / "summary.json").exists()
    spent = _charges(tmp / "site-2.sqlite")
    assert spent[:len(charged)] == charged and len(spent) > len(charged)


def test_a_task_whose_supernode_is_gone_ends_instead_of_retrying_forever():
    # The server died during a task and took the site's SuperNode with it: Flower's retry
    # invoker would retry the SuperNode's dead address forever and the site would never
    # reconnect (seen as a restarted server waiting for its third site).
    # (A thread, so that the old behaviour fails the test instead of hanging it.)
    import threading

    import httpx

    from fedrnn.client.node import run_task

    supernode = subprocess.Popen([sys.executable, "-c", "pass"])
    supernode.wait()
    outcome = []

    def task() -> None:
        try:
            run_task(f"127.0.0.1:{_free_port()}", "token", supernode)
        except Exception as exc:  # noqa: BLE001  checked below
            outcome.append(exc)

    thread = threading.Thread(target=task, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the task still retries the dead SuperNode's address"
    # it gave up on the connection itself, not on some other error along the way
    [error] = outcome
    assert isinstance(error, httpx.ConnectError), repr(error)


@pytest.mark.e2e
def test_the_sites_address_answers_the_fleet_api_and_nothing_else(deployment):
    # An outsider on the sites' address, with Flower's own control client: it can list no
    # runs, register no node key and start no run (whose code would run on the server).
    import hashlib
    import re

    import httpx
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest, StartRunRequest
    from flwr.supercore.fab import Fab

    tmp, start = deployment
    port = _free_port()
    server = start("server", "server", "--address", f"127.0.0.1:{port}", "--insecure",
                   "--min-clients", "1", "--rounds", "1", "--out", str(tmp / "run"), *SMALL)
    server.wait_for("started run")
    local = int(re.search(r"Control and Runtime APIs on 127\.0\.0\.1:(\d+)",
                          server.output).group(1))

    def control(at: int):
        return init_http_client_from_connection(SuperLinkConnection(
            name="outsider", address=f"127.0.0.1:{at}", insecure=True))

    outsider = control(port)
    pwned = tmp / "pwned"
    fab = build_fab_from_files({
        "pyproject.toml": (
            b'[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
            b'[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n'
            b'[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
            b'[tool.flwr.app]\npublisher = "evil"\n[tool.flwr.app.components]\n'
            b'serverapp = "evil:app"\nclientapp = "evil:app"\n'),
        "evil.py": f"open({str(pwned)!r}, 'w').write('ran')\n".encode()})[0]
    attempts = {
        "list runs": lambda: outsider.ListRuns(ListRunsRequest()),
        "register a node": lambda: outsider.RegisterNode(RegisterNodeRequest(
            public_key=b"\x04" + b"k" * 64, name="evil")),
        "start a run": lambda: outsider.StartRun(StartRunRequest(fab=fab_to_proto(
            Fab(hashlib.sha256(fab).hexdigest(), fab, {})))),
    }
    for what, attempt in attempts.items():
        # answered 404 by the route filter itself (server/superlink.py), not by Flower's app
        with pytest.raises(httpx.HTTPStatusError) as refused:
            attempt()
        assert refused.value.response.status_code == 404, what
    # on loopback the server's own control client sees one run only: its own
    runs = control(local).ListRuns(ListRunsRequest()).run_dict
    assert len(runs) == 1
    time.sleep(2)
    assert not pwned.exists()
    server.stop()
    assert "Traceback" not in server.output


def test_the_server_passes_init_from_on_as_an_absolute_path(tmp_path, monkeypatch):
    # Flower's ServerApp process reads the weights, and a resumed run compares its settings
    # with the saved ones: neither may depend on the directory the server was started in.
    import torch

    from fedrnn.server.deploy import check_server_config
    from fedrnn.shared.models import build_model

    config = check_server_config(RunConfig(dataset="", task="lm", hidden_size=8))
    torch.save(build_model(config).state_dict(), tmp_path / "pretrained.pt")
    monkeypatch.chdir(tmp_path)
    checked = check_server_config(config.replace(init_from="pretrained.pt"))
    assert checked.init_from == str(tmp_path / "pretrained.pt")
