"""``fedrnn server``: Flower's SuperLink on the network, and fedrnn's ServerApp run on it.

The SuperLink (Flower's deployment engine) serves sites over HTTPS on ``--address``,
optionally admitting only sites whose public keys were authorised (``--require-auth``).
That address answers the Fleet API and nothing else (``fedrnn.server.superlink``); the Control
and Runtime APIs are on a loopback port of their own. This process starts the SuperLink,
registers the authorised keys through its Control API (on loopback), submits
the fedrnn app as a run (a FAB built from the installed code, with the run's resolved
config as its ``[tool.flwr.app.config]``) and relays the run's log until it ends. The
ServerApp itself runs in the SuperLink's ``flwr-serverapp`` process, as with ``flwr run``.

Restarting with the same ``--out`` resumes from the last completed round (the ServerApp
checkpoints every round, ``server.checkpoint``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

from fedrnn.server.initial import initial_weights
from fedrnn.shared.config import RunConfig, dump_toml
from fedrnn.shared.errors import ConfigError, FedrnnError
from fedrnn.shared.processes import die_with_parent, stop
from fedrnn.shared.run_records import METRICS_FILE, SUMMARY_FILE

log = logging.getLogger("fedrnn")

APP_PACKAGES = ("client", "server", "shared", "simulations")
DEFAULT_ROUND_TIMEOUT = 600.0  # seconds


@dataclass(frozen=True)
class ServerOptions:
    address: str = "0.0.0.0:9092"
    certificates: Path | None = None
    insecure: bool = False
    require_auth: Path | None = None
    startup_timeout: float = 60.0

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--address {self.address!r}: expected HOST:PORT")
        return host.strip("[]"), int(port)

    def tls_files(self) -> dict[str, Path]:
        if self.certificates is None:
            raise ConfigError("--certificates DIR is required (it holds ca.crt, server.crt "
                              "and server.key; `fedrnn certs DIR` writes a development set), "
                              "or --insecure, which sends weights in the clear")
        files = {name: self.certificates / name for name in ("ca.crt", "server.crt",
                                                             "server.key")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (`fedrnn certs "
                              f"{self.certificates}` writes a development set)")
        return files

    def authorised_keys(self) -> list[Path]:
        if self.require_auth is None:
            return []
        if self.insecure:
            raise ConfigError("--require-auth needs TLS: drop --insecure")
        if not self.require_auth.is_dir():
            raise ConfigError(f"--require-auth {self.require_auth}: not a directory of "
                              "site public keys (*.pub)")
        keys = sorted(self.require_auth.glob("*.pub"))
        if not keys:
            raise ConfigError(f"--require-auth {self.require_auth}: no *.pub keys in it; "
                              "no site could join")
        return keys


def check_server_config(config: RunConfig) -> RunConfig:
    """The run a deployed server can start: a schema fixed without anyone's records, by a
    built-in dataset's (public) schema, or by the flags (``dataset`` empty: the sites'
    own records)."""
    from fedrnn.shared.data import resolve

    if config.data:
        raise ConfigError("the server holds no records: drop --data; fix the schema with "
                          "--labels (classify) and --features (numeric sequences) instead, "
                          "or use a built-in --dataset, whose schema is public")
    # A built-in dataset is public (synthetic data is generated from the config): its
    # schema may be read from it.
    config = resolve(config)
    if config.init_from:
        # Flower's ServerApp process reads it, and a resumed run compares it: one absolute path
        config = config.replace(init_from=str(Path(config.init_from).expanduser().resolve()))
    initial_weights(config)  # weights that do not fit: one line, before the SuperLink starts
    if not config.round_timeout:
        # Across a network a site can vanish mid-round; without a limit the round would
        # wait for it until Flower's message expiry (hours).
        config = config.replace(round_timeout=DEFAULT_ROUND_TIMEOUT)
        log.info("round timeout %gs (--round-timeout to change)", DEFAULT_ROUND_TIMEOUT)
    if not config.mechanism.sites_run_dpsgd:
        log.warning("%s: deployed sites train only with record-level DP and will decline "
                    "this run", config.mechanism.describe())
    return config


def prepare_out(config: RunConfig) -> tuple[RunConfig, bool]:
    """The run directory: new, or one to resume. Returns (config, resuming)."""
    from fedrnn.server.checkpoint import CHECKPOINT

    out = Path(config.out).expanduser().resolve()
    config = config.replace(out=str(out))
    if (out / SUMMARY_FILE).exists():
        raise ConfigError(f"{out} holds a finished run; choose another --out")
    saved = out / "config.toml"
    if not (out / CHECKPOINT).exists():
        if (out / METRICS_FILE).exists():
            log.warning("%s holds a run that never completed a round: starting afresh", out)
        if not config.run_id:  # fixed now, so that a resumed run charges under the same name
            config = config.replace(run_id=f"{out.name}-{uuid.uuid4().hex[:8]}")
        return config, False
    with saved.open("rb") as fh:
        before = RunConfig.from_flat(tomllib.load(fh))
    changed = [k for k, v in before.to_flat().items()
               if k not in ("run-id",) and config.to_flat().get(k) != v]
    if changed:
        diff = ", ".join(f"{k} {before.to_flat()[k]!r} -> {config.to_flat()[k]!r}"
                         for k in changed)
        raise ConfigError(f"{out} holds a run with other settings ({diff}); restart with the "
                          "same settings to resume it, or choose another --out")
    return before, True


def run_server(config: RunConfig, options: ServerOptions) -> Path:
    """Serve one federated run to the sites that connect; returns the run directory."""
    host, port = options.host_port
    tls = {} if options.insecure else options.tls_files()
    keys = options.authorised_keys()
    config = check_server_config(config)
    config, resuming = prepare_out(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_port_free(host, port)

    home = out / ".flwr"  # Flower's FAB installs and CLI state, kept with the run
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    local_port = _free_loopback_port()
    # Flower's SuperLink with its Fleet API alone on the sites' address; the Control and
    # Runtime APIs on loopback only (server.superlink says why)
    cmd = [sys.executable, "-m", "fedrnn.server.superlink", "--public", f"{host}:{port}",
           "--host", "127.0.0.1", "--port", str(local_port),
           "--disable-runtime-dependency-installation"]
    if options.insecure:
        cmd.append("--insecure")
        log.warning("--insecure: weights travel in the clear and any site may join")
    else:
        cmd += ["--ssl-certfile", str(tls["server.crt"]), "--ssl-keyfile",
                str(tls["server.key"]), "--ssl-ca-certfile", str(tls["ca.crt"])]
    if keys:
        cmd.append("--enable-supernode-auth")
    log_path = out / "superlink.log"
    log.info("starting Flower's SuperLink: Fleet API on %s:%d (%s), Control and Runtime "
             "APIs on 127.0.0.1:%d; its log: %s", host, port,
             "insecure" if options.insecure else "TLS", local_port, log_path)
    log.debug("%s", shlex.join(cmd))
    with log_path.open("a") as link_log:
        link = subprocess.Popen(cmd, stdout=link_log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_parent())
    try:
        control = _control_client("127.0.0.1", local_port, tls, options)
        _wait_until_up(control, link, options.startup_timeout, log_path)
        for key in keys:
            _register(control, key)
        run_id = _start_run(control, config)
        log.info("%s run %s: %d rounds, waiting for %d site(s) each round; sites connect "
                 "with `fedrnn client --server HOST:%d ...`", "resuming" if resuming
                 else "started", run_id, config.rounds, config.clients, port)
        status = _follow(control, run_id, link)
    finally:
        stop(link)
    if not (out / SUMMARY_FILE).exists():
        raise FedrnnError(f"the run ended without finishing ({status}); its checkpoint is in "
                          f"{out}: start `fedrnn server` again with the same --out to resume")
    return out


def _check_port_free(host: str, port: int, patience: float = 10.0) -> None:
    """Fail early and clearly if the port is taken. A server restarted right after a crash
    may find its old SuperLink still exiting, so this waits ``patience`` seconds first."""
    deadline = time.monotonic() + patience
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            # as the SuperLink's server does: connections of a dead server in TIME_WAIT
            # do not hold the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(f"--address {host}:{port} is not available "
                                      f"({exc.strerror}); is another server running "
                                      "there?") from None
        time.sleep(0.5)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _control_client(host: str, port: int, tls: dict[str, Path], options: ServerOptions):
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    local = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    connection = SuperLinkConnection(
        name="fedrnn", address=f"{local}:{port}", insecure=options.insecure,
        root_certificates=None if options.insecure else str(tls["ca.crt"]))
    return init_http_client_from_connection(connection)


def _wait_until_up(control, link: subprocess.Popen, timeout: float, log_path: Path) -> None:
    from flwr.proto.control_pb2 import ListRunsRequest

    deadline = time.monotonic() + timeout
    while True:
        if link.poll() is not None:
            tail = "\n".join(log_path.read_text().splitlines()[-5:])
            raise FedrnnError(f"Flower's SuperLink exited (code {link.returncode}):\n{tail}")
        try:
            control.ListRuns(ListRunsRequest())
            return
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                raise FedrnnError(f"the SuperLink did not come up within {timeout:.0f}s; "
                                  f"see {log_path}") from None
            time.sleep(0.3)


def _register(control, key_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    try:
        key = serialization.load_ssh_public_key(key_path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path}: not an OpenSSH public key ({exc})") from None
    control.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key),
                                             name=key_path.stem))
    log.info("authorised site key %s", key_path.name)


def build_fab(config: RunConfig) -> bytes:
    """The fedrnn app as a Flower App Bundle: the installed code plus a pyproject whose
    ``[tool.flwr.app.config]`` is this run's config."""
    from flwr.cli.build import build_fab_from_files

    import fedrnn.shared

    # The source tree keeps the design's four folders; the bundle lays them out as the
    # installed ``fedrnn.*`` packages, so the bundle imports the same names without fedrnn.
    root = Path(fedrnn.shared.__file__).resolve().parent.parent
    files: dict[str, bytes | Path] = {"pyproject.toml": _pyproject(config).encode()}
    for package in APP_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            files["fedrnn/" + path.relative_to(root).as_posix()] = path
    return build_fab_from_files(files)[0]


def _pyproject(config: RunConfig) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("fedrnn")
    except PackageNotFoundError:
        app_version = "0.0.0"
    return (
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "fedrnn"\nversion = "{app_version}"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "fedrnn"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedrnn.server.app:app"\n'
        'clientapp = "fedrnn.client.app:app"\n\n'
        "[tool.flwr.app.config]\n" + dump_toml(config)
    )


def _start_run(control, config: RunConfig) -> int:
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes = build_fab(config)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    response = control.StartRun(StartRunRequest(fab=fab_to_proto(fab)))
    if not response.HasField("run_id"):
        raise FedrnnError("the SuperLink did not start the run")
    return response.run_id


def _follow(control, run_id: int, link: subprocess.Popen) -> str:
    """Relay the ServerApp's log until the run ends; returns its final status."""
    from flwr.proto.control_pb2 import ListRunsRequest, StreamLogsRequest

    after = 0.0
    waiting = ""
    while True:
        try:
            for chunk in control.StreamLogs(StreamLogsRequest(run_id=run_id,
                                                              after_timestamp=after)):
                for line in chunk.log_output.splitlines(keepends=True):
                    # Flower repeats its wait message every second: show each count once
                    if "Waiting for nodes" in line:
                        if line == waiting:
                            continue
                        waiting = line
                    sys.stderr.write(line)
                sys.stderr.flush()
                after = max(after, chunk.latest_timestamp)
        except Exception as exc:  # the stream broke; the run may still be going
            log.debug("log stream: %s", exc)
        if link.poll() is not None:
            return f"the SuperLink exited with code {link.returncode}"
        try:
            run = control.ListRuns(ListRunsRequest(run_id=run_id)).run_dict.get(run_id)
        except Exception as exc:  # the SuperLink is going down; poll() above will tell
            log.debug("run status: %s", exc)
            run = None
        if run is not None and run.status.status == "finished":
            return f"{run.status.sub_status} {run.status.details}".strip()
        time.sleep(0.5)
