"""A deployed site's host (``client/node.py``): the SuperNode's local API serves only the
holder of the session's secret, the secret lives in a private file for one session, and
what a site's reply says about a failure is a code and its word, never the site's text.

The attacker here is another local user: it reaches the SuperNode's loopback port with
Flower's own ``RuntimeHttpClient`` and task functions, as Flower's executors do."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fedrnn.shared import protocol as P
from fedrnn.shared.errors import ConfigError, DataError, FedrnnError

SECRET_PATH = "/secret/path/records.csv"  # the site's records file, never to leave the site

PROBE_SERVER_APP = '''
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # One train message to the one site; everything the server receives back is recorded.
    while not grid.get_node_ids():
        time.sleep(0.2)
    node = sorted(grid.get_node_ids())[0]
    message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                      message_type="train")
    replies = [{"error": r.has_error(), "code": r.error.code if r.has_error() else None,
                "reason": r.error.reason if r.has_error() else None,
                "content": repr(r.content) if r.has_content() else None}
               for r in grid.send_and_receive([message], timeout=60)]
    Path(str(context.run_config["out"])).write_text(json.dumps(replies))
'''


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _message(message_type: str = "train"):
    """An incoming message as a SuperNode hands it to the ClientApp."""
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    metadata = Metadata(run_id=7, message_id="m1", src_node_id=1, dst_node_id=42,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=3600, message_type=message_type)
    return Message(RecordDict({P.CONFIG: ConfigRecord({"rounds": 3})}), metadata=metadata)


def _wire(reply) -> bytes:
    """The reply as it is serialised to leave the site."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(reply).SerializeToString()


# --- replies carry codes, not text -------------------------------------------------------

@pytest.mark.parametrize(("exc", "code", "word"), [
    (DataError(SECRET_PATH, "label(s) hiv, hepatitis-c not in the run's labels", line=17,
               column="diagnosis"), P.FAILED_DATA, "data"),
    (ConfigError(f"--data {SECRET_PATH}: hidden-size 8 does not fit"), P.FAILED_DATA, "data"),
    (RuntimeError(f"DP-SGD ran on {SECRET_PATH} (label hiv)"), P.FAILED_INTERNAL, "internal"),
    (KeyError("hiv"), P.FAILED_INTERNAL, "internal"),
])
def test_a_failure_reply_carries_a_code_and_its_word(exc, code, word):
    from fedrnn.client.node import reply_for_failure

    message = _message()
    reply = reply_for_failure(message, exc)
    assert reply.has_error() and not reply.has_content()
    assert (reply.error.code, reply.error.reason) == (code, word) == (code, P.REASONS[code])
    assert reply.metadata.reply_to_message_id == "m1" and reply.metadata.dst_node_id == 1
    wire = _wire(reply)
    for text in ("secret", "records.csv", "hiv", "hepatitis", "diagnosis", "line 17",
                 type(exc).__name__):
        assert text.encode() not in wire, text


def test_an_error_reply_of_the_app_leaves_with_its_word_only():
    from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

    from fedrnn.client.node import sanitised

    message = _message()
    for code, reason, word in [
        (P.DECLINED_BUDGET, f"site {SECRET_PATH} declined: epsilon 7.9 of 8 spent on hiv",
         "budget"),
        (P.DECLINED_POLICY, "site records declined: it trains only with record-level DP",
         "policy"),
        (P.FAILED_DATA, f"{SECRET_PATH}: label(s) hiv", "data"),
        (0, f"Traceback ... {SECRET_PATH}", "internal"),  # a code fedrnn does not define
    ]:
        sent = sanitised(Message(Error(code, reason), reply_to=message), message)
        assert (sent.error.code, sent.error.reason) == (code, word)
        assert b"secret" not in _wire(sent) and b"hiv" not in _wire(sent)
        assert sent.metadata.reply_to_message_id == "m1"
    update = Message(RecordDict({P.ARRAYS: ArrayRecord(), P.METRICS: MetricRecord({"x": 1})}),
                     reply_to=message)
    assert sanitised(update, message) is update  # an update passes as the app built it


# --- the session's secret ----------------------------------------------------------------

def test_the_session_secret_is_fresh_private_and_removed():
    from fedrnn.client.node import SECRET_BYTES, session_secret

    previous = os.umask(0)  # whatever mode the files get is the mode they were made with
    try:
        with session_secret() as (first, secret_1), session_secret() as (second, secret_2):
            for path, secret in ((first, secret_1), (second, secret_2)):
                assert _mode(path.parent) == 0o700 and _mode(path) == 0o600
                assert path.read_bytes() == secret and len(secret) == SECRET_BYTES
            assert secret_1 != secret_2 and first.parent != second.parent
    finally:
        os.umask(previous)
    assert not first.parent.exists() and not second.parent.exists()


@pytest.mark.e2e
def test_a_stopped_site_removes_its_secret(tmp_path):
    # ``kill``/systemd stop a site with SIGTERM: its SuperNode session unwinds, and the
    # secret's directory goes with it.
    from fedrnn.client.node import _free_port
    from fedrnn.shared.cli import main

    assert main(["split", str(tmp_path / "sites"), "--dataset", "synthetic",
                 "--clients", "2"]) == 0
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "FLWR_HOME": str(tmp_path / "flwr"),
           "OMP_NUM_THREADS": "1"}
    # nothing listens on the server's port: the site keeps trying until it is stopped
    site = subprocess.Popen(
        [sys.executable, "-m", "fedrnn.shared.cli", "client", "--server",
         f"127.0.0.1:{_free_port()}",
         "--insecure", "--data", str(tmp_path / "sites" / "site-0.csv"), "--ledger",
         str(tmp_path / "site.sqlite"), "--budget-epsilon", "8", "--budget-delta", "1e-5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _until(lambda: list(temp.glob("fedrnn-site-*/superexec.secret")), 60,
               "the session's secret")
        [secret] = temp.glob("fedrnn-site-*/superexec.secret")
        assert _mode(secret.parent) == 0o700 and _mode(secret) == 0o600
        time.sleep(1.0)  # the SuperNode is starting with it
        site.send_signal(signal.SIGTERM)
        assert site.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if site.poll() is None:
            site.kill()
            site.wait()
    assert list(temp.iterdir()) == []


# --- the SuperNode's local API against a local attacker ----------------------------------

@pytest.fixture
def superlink(tmp_path):
    """A real insecure SuperLink on loopback, and a run of a probe ServerApp that sends
    one train message and records what comes back (``replies.json``)."""
    import hashlib

    from flwr.cli.build import build_fab_from_files
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import ListRunsRequest, StartRunRequest
    from flwr.supercore.fab import Fab

    from fedrnn.client.node import _free_port
    from fedrnn.shared.processes import flower_bin

    port = _free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "link-home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    with (tmp_path / "superlink.log").open("w") as log_file:
        link = subprocess.Popen([flower_bin("flower-superlink"), "--insecure", "--host",
                                 "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        control = init_http_client_from_connection(SuperLinkConnection(
            name="probe", address=f"127.0.0.1:{port}", insecure=True))

        def up() -> bool:
            try:
                control.ListRuns(ListRunsRequest())
                return True
            except Exception:  # noqa: BLE001  not listening yet
                assert link.poll() is None, (tmp_path / "superlink.log").read_text()
                return False

        _until(up, 30, "the SuperLink")
        replies = tmp_path / "replies.json"
        pyproject = (
            '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
            '[project]\nname = "siteprobe"\nversion = "1.0.0"\ndependencies = []\n\n'
            '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
            '[tool.flwr.app]\npublisher = "fedrnn"\n\n'
            '[tool.flwr.app.components]\nserverapp = "siteprobe_server:app"\n'
            'clientapp = "fedrnn.client.app:app"\n\n'
            f'[tool.flwr.app.config]\nout = "{replies}"\n')
        fab = build_fab_from_files({"pyproject.toml": pyproject.encode(),
                                    "siteprobe_server.py": PROBE_SERVER_APP.encode()})[0]
        control.StartRun(StartRunRequest(fab=fab_to_proto(
            Fab(hashlib.sha256(fab).hexdigest(), fab, {}))))
        yield f"127.0.0.1:{port}", replies
    finally:
        link.terminate()
        try:
            link.wait(timeout=15)
        except subprocess.TimeoutExpired:
            link.kill()
            link.wait()


@pytest.mark.e2e
def test_only_the_holder_of_the_session_secret_claims_tasks(superlink, tmp_path, caplog):
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        PullAppMessagesRequest,
        PushAppMessagesRequest,
        PushTaskOutputRequest,
    )
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    from fedrnn.client.node import (
        SIGNED_METHODS,
        SiteOptions,
        _free_port,
        _supernode_command,
        executor_client,
        run_task,
        session_secret,
    )

    server, replies = superlink
    options = SiteOptions(server=server, data=Path(SECRET_PATH), ledger=tmp_path / "l.sqlite",
                          name="site", budget_epsilon=8, budget_delta=1e-5, insecure=True)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "node-home")}

    def attacker(*interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          *interceptors])

    def refused(call) -> bool:
        try:
            call()
        except httpx.HTTPStatusError as exc:
            # Flower's authentication failure, not a missing task or a bad request
            return (exc.response.status_code == 401
                    and "Authentication failed" in exc.response.text)
        return False

    claim = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    with session_secret() as (secret_file, secret):
        with (tmp_path / "supernode.log").open("w") as log_file:
            supernode = subprocess.Popen(_supernode_command(options, port, secret_file),
                                         stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            no_secret = attacker()
            guessed = attacker(SuperExecAuthHttpInterceptor(master_secret=b"guess",
                                                            protected_methods=SIGNED_METHODS))
            executor = executor_client(address, secret)
            response = None
            deadline = time.monotonic() + 40
            while response is None:
                assert time.monotonic() < deadline, (tmp_path / "supernode.log").read_text()
                # Before every claim of the site's own, the attacker tries first.
                try:
                    no_secret_refused = refused(lambda: no_secret.AcquireTask(claim))
                    guess_refused = refused(lambda: guessed.AcquireTask(claim))
                    answer = executor.AcquireTask(claim)
                except httpx.TransportError:  # the SuperNode's API is not up yet
                    time.sleep(0.2)
                    continue
                assert no_secret_refused and guess_refused
                if answer.HasField("task") and answer.token:
                    response = answer
                else:
                    time.sleep(0.2)

            # The claimed task's calls need its token, which only the signed claim returned.
            forged = attacker(RuntimeTokenHttpInterceptor("0" * len(response.token)))
            for client in (no_secret, guessed, forged):
                assert refused(lambda c=client: pull_task_input(c))
                assert refused(lambda c=client: c.PullMessages(PullAppMessagesRequest()))
                assert refused(lambda c=client: c.PushMessages(PushAppMessagesRequest()))
                assert refused(lambda c=client: c.PushTaskOutput(PushTaskOutputRequest(
                    sub_status="completed", details="forged")))
            forged.close()
            assert refused(lambda: no_secret.AcquireTask(claim))

            # The site runs it: its records file is missing, and says so in its own log only.
            with caplog.at_level(logging.INFO, logger="fedrnn"):
                run_task(address, response.token, supernode)
            assert f"{SECRET_PATH}: file not found" in caplog.text
            _until(replies.exists, 30, "the probe ServerApp's record of the reply")
        finally:
            supernode.terminate()
            supernode.wait(timeout=15)
            for client in (no_secret, guessed, executor):
                client.close()
    [reply] = json.loads(replies.read_text())
    assert reply == {"error": True, "code": P.FAILED_DATA, "reason": "data", "content": None}
    assert "secret" not in replies.read_text()


class _Watcher:
    """What a SuperNode session leaves: the problems its log showed, connected or not."""

    TRANSIENT: set[str] = set()

    def __init__(self, problems: list[str], connected: bool = False) -> None:
        self.problems, self.lines = problems, []
        self.connected = threading.Event()
        if connected:
            self.connected.set()
        self.process = subprocess.Popen([sys.executable, "-c", "pass"])
        self.process.wait()


def _sessions(monkeypatch, outcomes):
    """``_run_site`` with a clock that advances 1 s a session and each sleep as asked, its
    sessions ``outcomes`` in turn; returns the clock times the sessions started."""
    from fedrnn.client import node

    clock, started = [0.0], []
    monkeypatch.setattr(node.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(node.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(node, "read_site_records", lambda options: 10)
    plan = iter(outcomes)

    def session(options):
        started.append(clock[0])
        clock[0] += 1.0
        outcome = next(plan)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(node, "_session", session)
    return started


def test_a_refused_key_is_retried_while_a_killed_session_may_still_hold_it(monkeypatch):
    # With --require-auth a site killed without goodbye stays "online" at the SuperLink for
    # up to two missed heartbeats, and its restart is refused as an unknown key would be:
    # the site retries for that window, then joins.
    from fedrnn.client import node

    refused = _Watcher([node._SuperNodeLog.REFUSED])
    joined = _Watcher([], connected=True)
    stop_here = KeyboardInterrupt()
    started = _sessions(monkeypatch, [refused] * 5 + [joined, stop_here])
    options = node.SiteOptions(server="127.0.0.1:1", data=Path("d.csv"),
                               ledger=Path("l.sqlite"), name="site", budget_epsilon=1.0,
                               budget_delta=1e-5)
    with pytest.raises(KeyboardInterrupt):
        node._run_site(options)
    assert len(started) == 7 and started[5] < node.REJOIN_WINDOW


def test_each_refusal_after_a_connection_gets_its_own_window(monkeypatch):
    from fedrnn.client import node

    refused = _Watcher([node._SuperNodeLog.REFUSED])
    joined = _Watcher([], connected=True)
    # refused for most of a window, in, lost, then refused again for most of a window
    started = _sessions(monkeypatch, [refused] * 9 + [joined] + [refused] * 9 +
                        [joined, KeyboardInterrupt()])
    options = node.SiteOptions(server="127.0.0.1:1", data=Path("d.csv"),
                               ledger=Path("l.sqlite"), name="site", budget_epsilon=1.0,
                               budget_delta=1e-5)
    with pytest.raises(KeyboardInterrupt):
        node._run_site(options)
    assert len(started) == 21


def test_a_key_refused_beyond_the_window_ends_the_site_with_one_message(monkeypatch):
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    from fedrnn.client import node

    # the window outlasts the SuperLink's patience with a silent node (Flower's constants)
    assert node.REJOIN_WINDOW > HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
    refused = _Watcher([node._SuperNodeLog.REFUSED])
    started = _sessions(monkeypatch, [refused] * 100)
    options = node.SiteOptions(server="127.0.0.1:1", data=Path("d.csv"),
                               ledger=Path("l.sqlite"), name="site", budget_epsilon=1.0,
                               budget_delta=1e-5)
    with pytest.raises(FedrnnError, match="not among the server's authorised keys") as err:
        node._run_site(options)
    assert "retried for 65s" in str(err.value)
    assert started[-1] >= node.REJOIN_WINDOW - 6 and len(started) < 20
