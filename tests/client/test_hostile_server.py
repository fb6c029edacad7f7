"""A hostile server against a real site: Flower's own SuperLink runs a ServerApp written to
attack, and a real `fedrnn client`, started as the README says, answers it over loopback.

The site must decline each attack or stay within its own budget at its own delta, with
noise in every release, recomputed from its ledger by an independent accountant; and its
replies must hold nothing but code words and DP-released values."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import independent_rdp_epsilon

from fedrnn.client.ledger import Ledger

pytestmark = pytest.mark.e2e  # every test here runs a real deployment

BUDGET_EPSILON, BUDGET_DELTA = 3.0, 1e-6

HOSTILE_SERVER_APP = '''
import json
import math
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrnn.shared.config import RunConfig
from fedrnn.shared.models import build_model

app = ServerApp()
PROPOSAL = RunConfig(task="classify", labels="sick,well", features="hr,temp", hidden_size=8,
                     batch_size=8, rounds=3, run_id="hostile")
ATTACKS = [
    ("train", {"epsilon": math.inf}),  # noise off
    # (an accountant that under-counts, dp off and the rest: tests/client/test_site_trust.py)
    # a raised budget, the server's delta, a huge epsilon in one round: spend it all now
    ("train", {"budget-epsilon": 1000.0, "budget-delta": 0.9, "delta": 0.9,
               "epsilon": 1e6, "rounds": 1, "noise-multiplier": 0.0}),
    ("train", {"budget-epsilon": 1000.0, "budget-delta": 0.9, "delta": 0.9,
               "epsilon": 1e6, "rounds": 1, "noise-multiplier": 0.0}),
    ("evaluate", {"eval-fraction": 0.99, "seed": 1}),  # a crafted model, one evaluation
]


@app.main()
def main(grid: Grid, context: Context) -> None:
    while not grid.get_node_ids():
        time.sleep(0.2)
    node = sorted(grid.get_node_ids())[0]
    crafted = {k: torch.full_like(v, 0.3) for k, v in build_model(PROPOSAL).state_dict().items()}
    out = []
    for server_round, (kind, attack) in enumerate(ATTACKS, start=1):
        config = {**PROPOSAL.to_flat(), **attack, "server-round": server_round}
        content = RecordDict({"arrays": ArrayRecord(crafted), "config": ConfigRecord(config)})
        replies = list(grid.send_and_receive(
            [Message(content, dst_node_id=node, message_type=kind)], timeout=120))
        for r in replies:
            out.append({"kind": kind, "error": r.has_error(),
                        "code": r.error.code if r.has_error() else None,
                        "reason": r.error.reason if r.has_error() else None,
                        "records": sorted(r.content.keys()) if r.has_content() else [],
                        "metrics": dict(r.content["metrics"]) if r.has_content() else {}})
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
'''


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_hostile_server_cannot_make_a_real_site_overspend_or_talk(tmp_path, series_csv):
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
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        with (tmp_path / "superlink.log").open("w") as log_file:
            procs.append(subprocess.Popen(
                [flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                 "--port", str(port), "--disable-runtime-dependency-installation"],
                stdout=log_file, stderr=subprocess.STDOUT, env=env))
        control = init_http_client_from_connection(SuperLinkConnection(
            name="hostile", address=f"127.0.0.1:{port}", insecure=True))

        def up() -> bool:
            try:
                control.ListRuns(ListRunsRequest())
                return True
            except Exception:  # noqa: BLE001  not listening yet
                assert procs[0].poll() is None, (tmp_path / "superlink.log").read_text()
                return False

        _until(up, 30, "the SuperLink")
        ledger = tmp_path / "site.sqlite"
        with (tmp_path / "site.log").open("w") as site_log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedrnn.shared.cli", "client", "--insecure", "--server",
                 f"127.0.0.1:{port}", "--data", str(series_csv), "--ledger", str(ledger),
                 "--budget-epsilon", str(BUDGET_EPSILON), "--budget-delta",
                 str(BUDGET_DELTA), "--name", "ward"],
                stdout=site_log, stderr=subprocess.STDOUT,
                env={**env, "FLWR_HOME": str(tmp_path / "site-home")}))
        replies = tmp_path / "replies.json"
        pyproject = (
            '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
            '[project]\nname = "hostile"\nversion = "1.0.0"\ndependencies = []\n\n'
            '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
            '[tool.flwr.app]\npublisher = "attacker"\n\n'
            '[tool.flwr.app.components]\nserverapp = "hostile_server:app"\n'
            'clientapp = "fedrnn.client.app:app"\n\n'
            f'[tool.flwr.app.config]\nout = "{replies}"\n')
        fab = build_fab_from_files({"pyproject.toml": pyproject.encode(),
                                    "hostile_server.py": HOSTILE_SERVER_APP.encode()})[0]
        control.StartRun(StartRunRequest(fab=fab_to_proto(
            Fab(hashlib.sha256(fab).hexdigest(), fab, {}))))
        _until(replies.exists, 400, "the hostile ServerApp's record of the replies:\n"
               + (tmp_path / "site.log").read_text()[-3000:])
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    got = json.loads(replies.read_text())
    assert [(r["kind"], r["reason"]) for r in got] == [
        ("train", "policy"), ("train", None), ("train", "budget"), ("evaluate", None)]
    trained, evaluated = got[1], got[3]
    assert trained["records"] == ["arrays", "metrics"] and evaluated["records"] == ["metrics"]
    assert "train-loss" not in trained["metrics"] and trained["metrics"]["noise-multiplier"] > 0
    assert evaluated["metrics"]["auroc"] != evaluated["metrics"]["auroc"]  # NaN: not released
    assert "Traceback" not in (tmp_path / "site.log").read_text()
    with Ledger(ledger) as book:
        releases = book.releases()
        assert [r.purpose for r in releases] == ["train", "evaluate"]
        assert all(r.noise_multiplier > 0 and r.delta == BUDGET_DELTA for r in releases)
        assert book.budget().epsilon == BUDGET_EPSILON and book.budget().delta == BUDGET_DELTA
        for cohort in book.cohorts_of_site("ward"):
            assert independent_rdp_epsilon(book.history(cohort), BUDGET_DELTA) \
                <= BUDGET_EPSILON * 1.001


def test_a_hostile_site_cannot_poison_or_stop_a_deployed_run(tmp_path, monkeypatch):
    # A real `fedrnn server` for the sites' own messages (JSONL; the schema from flags) and
    # one honest `fedrnn client`; the second site is hostile: a real SuperNode whose
    # executor answers with a ClientApp of the attacker's making, a different malformed
    # reply every round.
    import threading

    import numpy as np
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    import fedrnn.client.app
    from fedrnn.client.node import SiteOptions, _free_port, _session
    from fedrnn.shared.cli import main as cli

    assert cli(["split", str(tmp_path / "sites"), "--dataset", "synthetic", "--task",
                "lm", "--clients", "2"]) == 0  # messages labelled long or short
    hostile = ClientApp()

    @hostile.train()
    def poison(msg: Message, context: Context) -> Message:
        weights = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        server_round = int(msg.content["config"]["server-round"])
        metrics = {"num-examples": 10, "unit-weight": 1}
        if server_round == 1:  # NaN everywhere
            weights = {k: np.full_like(v, np.nan) for k, v in weights.items()}
        else:  # a (1,) array, which averaging would broadcast
            weights = {k: np.full(1, 5e5, dtype=v.dtype) for k, v in weights.items()}
        if server_round == 2:  # and a negative weight, dividing by zero with the honest one
            metrics["num-examples"] = -10
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                          weights.items()}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    @hostile.evaluate()
    def lie(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": 1e9, "loss": -5.0, "accuracy": 7.0, "auroc": 0.5,
             "unit-weight": 1})}), reply_to=msg)

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_HOME": str(tmp_path / "home")}
    out = tmp_path / "run"
    procs = []
    with (tmp_path / "server.log").open("w") as log_file:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fedrnn.shared.cli", "server", "--insecure", "--address",
             f"127.0.0.1:{port}", "--min-clients", "2", "--rounds", "2", "--round-timeout",
             "60", "--out", str(out), "--task", "classify", "--labels", "long,short",
             "--hidden-size", "8", "--batch-size", "16"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env))
    try:
        with (tmp_path / "site.log").open("w") as log_file:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedrnn.shared.cli", "client", "--insecure", "--server",
                 f"127.0.0.1:{port}", "--data", str(tmp_path / "sites" / "site-0.jsonl"),
                 "--ledger", str(tmp_path / "site-0.sqlite"), "--budget-epsilon", "8",
                 "--budget-delta", "1e-5"], stdout=log_file, stderr=subprocess.STDOUT,
                env={**env, "FLWR_HOME": str(tmp_path / "site-home")}))
        monkeypatch.setattr(fedrnn.client.app, "app", hostile)
        attacker = SiteOptions(server=f"127.0.0.1:{port}", data=tmp_path / "sites" /
                               "site-1.csv", ledger=tmp_path / "evil.sqlite", name="evil",
                               budget_epsilon=8, budget_delta=1e-5, insecure=True)
        threading.Thread(target=_session, args=(attacker,), daemon=True).start()
        assert procs[0].wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 1 and r["rejected"] == 1 for r in rows)
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] >= 0 for r in rows)  # lies left out
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and log.count("rejected:") >= 4
