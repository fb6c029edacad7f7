"""``fedrnn client``: one deployed site, a Flower SuperNode plus one long-lived ClientApp.

Flower's SuperNode holds the connection to the server (TLS, node authentication,
reconnection). In its default ``subprocess`` isolation it starts a fresh ``flwr-clientapp``
process for every message, which here means importing torch and reading the site's
records again for every train and every evaluate message: seconds per round that
training does not need. So the SuperNode runs with ``--isolation process`` and this
process is its executor: it claims each task from the SuperNode's local Runtime API and
runs fedrnn's ClientApp in-process, with Flower's own task functions
(``pull_task_input``/``push_message``/``push_task_output``, the same calls
``flwr-clientapp`` makes). Torch is imported and the records are read once.

The SuperNode's local Runtime API hands tasks, and with them the server's messages and the
site's replies, to whoever claims them. Any local user can reach a loopback port, so each
SuperNode session gets a fresh random secret (``--superexec-auth-secret-file``, a 0600 file
in a private temporary directory) and only a caller holding it can claim a task: this
process signs its ``AcquireTask`` calls with Flower's own ``SuperExecAuthHttpInterceptor``,
as Flower's SuperExec does. A task's other calls carry the task token that the signed claim
returned, which is how the SuperNode authenticates them.

What leaves the site about a failure or a decline is a code and its word
(``shared.protocol.REASONS``), never the text of an exception or of a reason: that text
names the site's files and records and goes to the site's own log only.

The site's records, ledger and privacy policy reach the ClientApp as the SuperNode's node
config (``data``, ``ledger``, ``name``, ``budget-epsilon``, ``budget-delta``, ``accountant``,
``eval-fraction``, ``evaluate``): the site's own, never the server's (``client.policy``).
"""

from __future__ import annotations

import logging
import math
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedrnn.client.policy import OFFERED_ACCOUNTANTS
from fedrnn.shared import protocol as P
from fedrnn.shared.errors import ConfigError, DataError, FedrnnError
from fedrnn.shared.files import write_atomic
from fedrnn.shared.processes import die_with_parent, flower_bin, stop

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger("fedrnn")

POLL_SECONDS = 0.2  # how often an idle site asks its SuperNode for work
SECRET_BYTES = 32  # the SuperNode session's secret: an HMAC-SHA256 key
# The calls Flower's SuperNode checks a signature on (Flower's own SuperExec signs the same,
# flwr/supercore/superexec/run_superexec.py ``_SUPEREXEC_AUTH_METHODS``): the other task
# calls are authenticated by the token the signed claim returns.
SIGNED_METHODS = ("/flwr.proto.Runtime/AcquireTask",)
# With --require-auth a site's SuperNode is bound to its key, and Flower's SuperLink will not
# activate a node it still holds as online: a site killed without saying goodbye stays
# online until two missed heartbeats (flwr.common.constant: HEARTBEAT_PATIENCE x the default
# 30 s interval, which flower-supernode 1.41 cannot change), and the same refusal as for an
# unknown key greets it when it restarts. So a refused key is retried this long first
# (``--rejoin-wait``).
REJOIN_WINDOW = 2 * 30.0 + 5.0


@dataclass(frozen=True)
class SiteOptions:
    server: str
    data: Path
    ledger: Path
    name: str
    budget_epsilon: float
    budget_delta: float
    accountant: str = "rdp"
    eval_fraction: float = 0.2
    evaluate: bool = True
    min_batch_size: int = 16
    root_cert: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    max_wait: float = 0.0  # give up connecting after this many seconds (0: keep trying)
    rejoin_wait: float = REJOIN_WINDOW  # retry a refused key this long (0: give up at once)

    def node_config(self) -> str:
        # Flower parses node config as TOML values: strings quoted, numbers bare.
        return " ".join(f"{k}={_toml_value(v)}" for k, v in self.node_config_values().items())

    def node_config_values(self) -> dict[str, str | float | bool]:
        """The site's records, ledger and policy, as its ClientApp reads them."""
        return {"data": str(self.data), "ledger": str(self.ledger), "name": self.name,
                  "budget-epsilon": self.budget_epsilon, "budget-delta": self.budget_delta,
                  "accountant": self.accountant, "eval-fraction": self.eval_fraction,
                  "evaluate": self.evaluate, "min-batch-size": self.min_batch_size}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def check_options(options: SiteOptions) -> None:
    """Everything that can be checked before connecting; each problem is one clear error."""
    if ":" not in options.server:
        raise ConfigError(f"--server {options.server!r}: expected HOST:PORT")
    if not options.insecure:
        if options.root_cert is None:
            raise ConfigError("--root-cert CA.crt is required to verify the server "
                              "(or --insecure, which sends weights in the clear)")
        if not options.root_cert.is_file():
            raise ConfigError(f"--root-cert {options.root_cert}: file not found")
    if options.auth_key is not None:
        if not options.auth_key.is_file():
            raise ConfigError(f"--auth-key {options.auth_key}: file not found")
        if options.insecure:
            raise ConfigError("--auth-key needs TLS: drop --insecure and give --root-cert")
    if not options.ledger.parent.is_dir():
        raise ConfigError(f"--ledger {options.ledger}: directory {options.ledger.parent} "
                          "does not exist")
    # written so that NaN fails too: every comparison with NaN is false
    if not (0 < options.budget_epsilon < math.inf and 0 < options.budget_delta < 1):
        raise ConfigError("--budget-epsilon must be a positive number and --budget-delta in "
                          "(0, 1): the site's own limit on what any record may lose")
    if options.accountant not in OFFERED_ACCOUNTANTS:
        raise ConfigError(f"--accountant must be one of {', '.join(OFFERED_ACCOUNTANTS)}")
    if not 0 < options.eval_fraction < 1:
        raise ConfigError("--eval-fraction must be in (0, 1)")
    if options.min_batch_size < 1:
        raise ConfigError("--min-batch-size must be at least 1")
    if not options.rejoin_wait >= 0:
        raise ConfigError("--rejoin-wait must be a number of seconds >= 0")
    if not options.max_wait >= 0:
        raise ConfigError("--max-wait must be 0 (keep trying) or a number of seconds")


def read_site_records(options: SiteOptions) -> int:
    """Read and check the records file now, so a bad file fails before connecting. The
    read is cached: the first round trains on it without reading it again."""
    from fedrnn.shared.config import RunConfig
    from fedrnn.shared.data import load_corpus
    from fedrnn.shared.errors import DataError

    corpus = load_corpus(RunConfig(data=str(options.data)))
    if len(corpus) < 2:
        raise DataError(options.data, f"holds {len(corpus)} record(s); a site needs at least 2")
    return len(corpus)


def run_site(options: SiteOptions) -> int:
    """Serve the site until it is stopped, or cannot go on; returns the exit status.

    A SuperNode exits when it loses an established connection (the server stopped or
    crashed); the site then starts a new one, which waits for the server to come back,
    so a restarted server finds its sites again. Only ``--max-wait`` seconds without a
    server, or a problem retrying cannot fix (certificate, key), end the site.
    """
    check_options(options)
    with _exit_on_sigterm():
        return _run_site(options)


def _run_site(options: SiteOptions) -> int:
    n_records = read_site_records(options)
    log.info("site %s: %d records in %s, ledger %s", options.name, n_records, options.data,
             options.ledger)
    # Imported before connecting: the first round must not wait for torch and Opacus.
    import fedrnn.client.app  # noqa: F401
    import fedrnn.client.training  # noqa: F401

    last_contact = time.monotonic()
    first_refusal: float | None = None
    while True:
        watcher = _session(options)
        fatal = [p for p in watcher.problems if p not in watcher.TRANSIENT]
        if fatal == [_SuperNodeLog.REFUSED]:
            if first_refusal is None:
                first_refusal = time.monotonic()
                if options.rejoin_wait:
                    log.warning("the server refused this site's key; if this site was just "
                                "restarted, the server may still hold its previous "
                                "connection (up to 60s): retrying for %.0fs",
                                options.rejoin_wait)
            if time.monotonic() - first_refusal < options.rejoin_wait:
                time.sleep(5.0)
                continue
            waited = (f"retried for {options.rejoin_wait:.0f}s" if options.rejoin_wait
                      else "not retried: --rejoin-wait 0")
            fatal = [f"{_SuperNodeLog.REFUSED}, or still held for a previous connection of "
                     f"this site's ({waited})"]
        if fatal:
            raise FedrnnError(f"site {options.name} stopped: {'; '.join(fatal)}")
        if watcher.connected.is_set():
            last_contact = time.monotonic()
            first_refusal = None  # a later restart gets its own window
        elif not watcher.problems and watcher.process.returncode != 0:
            tail = "\n".join(watcher.lines[-5:])
            raise FedrnnError(f"site {options.name} stopped: Flower's SuperNode exited "
                              f"(code {watcher.process.returncode}):\n{tail}")
        if options.max_wait and time.monotonic() - last_contact >= options.max_wait:
            raise FedrnnError(f"site {options.name} stopped: the server at {options.server} "
                              f"could not be reached for {options.max_wait:g}s")
        log.warning("lost the connection to %s; reconnecting", options.server)
        time.sleep(1.0)


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """A stopped site (SIGTERM: ``kill``, systemd) unwinds like Ctrl-C, so that its
    SuperNode is stopped and its session's secret removed; Python's default would end the
    process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; a caller there handles them
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def session_secret() -> Iterator[tuple[Path, bytes]]:
    """A fresh random secret for one SuperNode session: yields the file the SuperNode reads
    it from and the secret itself.

    The file is created 0600 by ``open(2)`` inside a directory only this user can enter
    (``mkdtemp``: 0700), and both are removed when the session ends.
    """
    secret = secrets.token_bytes(SECRET_BYTES)
    with tempfile.TemporaryDirectory(prefix="fedrnn-site-") as directory:
        path = Path(directory) / "superexec.secret"
        write_atomic(path, secret, private=True)
        yield path, secret


def _session(options: SiteOptions) -> _SuperNodeLog:
    """One SuperNode's life: connect, serve tasks until it exits; returns its log."""
    port = _free_port()
    with session_secret() as (secret_file, secret):
        supernode = subprocess.Popen(_supernode_command(options, port, secret_file),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, preexec_fn=die_with_parent())
        watcher = _SuperNodeLog(supernode)
        watcher.start()
        try:
            _serve(port, supernode, secret, options.node_config_values())
        finally:
            stop(supernode)
            watcher.join(timeout=5)
    return watcher


def _supernode_command(options: SiteOptions, port: int, secret_file: Path) -> list[str]:
    cmd = [flower_bin("flower-supernode"), "--superlink", options.server,
           "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
           "--superexec-auth-secret-file", str(secret_file),
           "--node-config", options.node_config()]
    if options.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(options.root_cert)]
    if options.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(options.auth_key)]
    if options.max_wait:
        cmd += ["--max-wait-time", str(options.max_wait)]
    log.debug("starting %s", shlex.join(cmd))
    return cmd


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _SuperNodeLog(threading.Thread):
    """Relays the SuperNode's log as the site's own, in plain words, and remembers the
    reasons it gave up (a refused certificate, an unknown key, an unreachable server)."""

    REFUSED = ("the server refused this site: its key is not among the server's authorised "
               "keys (--require-auth)")
    SIGNS = {
        "CERTIFICATE_VERIFY_FAILED": "the server's TLS certificate is not signed by "
                                     "--root-cert (wrong CA file, or not the right server)",
        "WRONG_VERSION_NUMBER": "the server does not speak TLS (was it started with "
                                "--insecure?)",
        "Unable to parse the private key": "--auth-key is not an ECDSA private key in "
                                           "OpenSSH format (fedrnn certs writes one)",
        "Failed to activate SuperNode": REFUSED,
        "SuperNode authentication is enabled": "the server admits only authorised sites: "
                                               "give this site's key with --auth-key",
        "Connection attempt failed": "cannot reach the server yet; still trying",
    }
    TRANSIENT = {"cannot reach the server yet; still trying"}

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(daemon=True, name="supernode-log")
        self.process = process
        self.problems: list[str] = []
        self.lines: list[str] = []
        self.connected = threading.Event()

    def run(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip()
            self.lines = [*self.lines[-50:], line]
            for sign, meaning in self.SIGNS.items():
                if sign in line and meaning not in self.problems:
                    self.problems.append(meaning)
                    if meaning in self.TRANSIENT:  # fatal ones end the site with this text
                        log.warning("%s", meaning)
            if "Connection successful" in line and self.TRANSIENT & set(self.problems):
                self.problems = [p for p in self.problems if p not in self.TRANSIENT]
            if "SuperNode ID" in line:
                self.connected.set()
                log.info("connected to the server (%s)", line.split("SuperNode ID", 1)[1]
                         .strip(" :"))
            log.debug("supernode: %s", line)


def executor_client(runtime_address: str, secret: bytes) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API that claims tasks as its executor: its
    ``AcquireTask`` calls are signed with the session's ``secret`` by Flower's own
    interceptor (HMAC-SHA256 over method, time, nonce and request body)."""
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    # No retry invoker: while the SuperNode is not connected, asking again next poll is
    # the retry, and a SuperNode that gave up must be noticed, not retried forever.
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=SIGNED_METHODS)])


def _serve(port: int, supernode: subprocess.Popen, secret: bytes,
           node_config: dict | None = None) -> None:
    """Claim and run the SuperNode's tasks while it lives; ``node_config``: the site's own
    (see ``run_task``)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    runtime_address = f"127.0.0.1:{port}"
    runtime = executor_client(runtime_address, secret)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    try:
        while supernode.poll() is None:
            try:
                response = runtime.AcquireTask(request)
            except Exception as exc:  # the SuperNode's API is not up yet, or is going down
                refused = (isinstance(exc, httpx.HTTPStatusError)
                           and exc.response.status_code == 401)
                # A refused signature is not a start-up state: the clock stepped, or what
                # answers on this port is not the SuperNode started with this secret.
                log.log(logging.WARNING if refused else logging.DEBUG,
                        "runtime API %s: %s", "refused the session secret" if refused
                        else "not ready", exc)
                time.sleep(POLL_SECONDS)
                continue
            if response.HasField("task") and response.token:
                try:
                    run_task(runtime_address, response.token, supernode,
                             node_config=node_config)
                except Exception:
                    if supernode.poll() is None:
                        raise
                    # The server went away during the task and the SuperNode with it: the
                    # task cannot be finished; the site reconnects (``run_site``).
                    log.warning("the connection ended during a task; it is dropped")
                    return
            else:
                time.sleep(POLL_SECONDS)
    finally:
        runtime.close()


def run_task(runtime_address: str, token: str, supernode: subprocess.Popen, *,
             node_config: dict | None = None) -> None:
    """Run one claimed task (one message) through fedrnn's ClientApp, in this process.

    Mirrors ``flwr.supernode.runtime.run_clientapp`` minus its per-process parts (FAB
    install, dependency install, ``sys.exit``): the app is the installed fedrnn. Calls to
    the SuperNode are retried as Flower retries them, except once ``supernode`` has exited
    (the server went away): Flower's invoker would retry that dead address forever, and
    the site would never reconnect.
    """
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from fedrnn.client.app import app as client_app

    retry = make_simple_http_retry_invoker()
    flowers_rule = retry.should_giveup
    retry.should_giveup = lambda exc: (supernode.poll() is not None
                                       or bool(flowers_rule and flowers_rule(exc)))
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    status, details = SubStatus.FAILED, P.REASON_INTERNAL
    try:
        message, context, _run, _fab = pull_task_input(client)
        if node_config is not None:
            # The site's records, ledger and budget are what this process was started with,
            # never what the local API hands back: a local user who bound the SuperNode's
            # port first could otherwise point the site at a ledger with no budget.
            context.node_config = dict(node_config)
        started = time.monotonic()
        try:
            reply = client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # the site's own failure: report it to the server, go on
            log.error("%s failed: %s", message.metadata.message_type, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            reply = reply_for_failure(message, exc)
            details = reply.error.reason
        if reply.has_error() and status == SubStatus.COMPLETED:
            log.warning("%s", reply.error.reason)  # a decline, e.g. the budget is spent
        else:
            log.info("%s %s in %.1fs", message.metadata.message_type,
                     "done" if status == SubStatus.COMPLETED else "failed",
                     time.monotonic() - started)
        push_message(client, sanitised(reply, message), context)
    finally:
        try:
            push_task_output(client=client, context=context, sub_status=status,
                             details=details)
        finally:
            heartbeat.stop()
            client.close()


def reply_for_failure(message: Message, exc: BaseException) -> Message:
    """The reply to ``message`` when the ClientApp raised ``exc``: a code and its word.

    ``FAILED_DATA`` when the site's records or settings do not fit the run (``DataError``,
    ``ConfigError``), ``FAILED_INTERNAL`` for anything else. The exception's text names
    the site's files, columns and labels: it belongs in the site's log, not in the reply.
    """
    from flwr.app import Error, Message

    code = P.FAILED_DATA if isinstance(exc, (DataError, ConfigError)) else P.FAILED_INTERNAL
    return Message(Error(code=code, reason=P.REASONS[code]), reply_to=message)


def sanitised(reply: Message, message: Message) -> Message:
    """``reply`` as it may leave the site: a reply that carries an error is rebuilt with its
    code and the code's word only (``REASONS``; "internal" for a code fedrnn does not
    define), whatever reason text the ClientApp wrote. Other replies pass unchanged."""
    from flwr.app import Error, Message

    if not reply.has_error():
        return reply
    code = reply.error.code
    return Message(Error(code=code, reason=P.REASONS.get(code, P.REASON_INTERNAL)),
                   reply_to=message)
