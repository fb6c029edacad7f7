"""End to end: the real CLI, Flower's Simulation Engine (Ray), Opacus, on tiny data."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import releases_by_site

from fedrnn.shared.cli import main
from fedrnn.shared.config import RunConfig
from fedrnn.shared.models import load_trained


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_simulate_own_jsonl_lm(tmp_path, text_jsonl):
    out = tmp_path / "lm"
    code = main(["simulate", "--data", str(text_jsonl), "--task", "lm", "--model", "lstm",
                 "--rounds", "2", "--hidden-size", "8", "--embedding-dim", "4",
                 "--noise-multiplier", "1.0", "--out", str(out)])
    assert code == 0
    rows = _rows(out)
    assert rows[-1]["clients"] == 3  # the 'client' column's three clinics
    assert rows[-1]["perplexity"] == pytest.approx(math.exp(rows[-1]["loss"]), rel=1e-6)
    assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"]


@pytest.mark.parametrize("content,expected", [
    (None, "file not found"),
    ("sequence_id,time,x\n1,0,1\n1,1,oops\n", "line 3, column 'x': non-numeric"),
])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys, content, expected):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    code = main(["simulate", "--data", str(path), "--task", "classify", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedrnn: error: ") and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--model", "transformer"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _ledger_rows(ledger_dir):
    return releases_by_site(ledger_dir)


@pytest.mark.e2e
def test_budget_carries_across_runs_on_the_same_ledgers(tmp_path, capsys):
    ledgers = tmp_path / "ledgers"
    common = ["simulate", "--dataset", "synthetic", "--clients", "2", "--rounds", "2",
              "--hidden-size", "8", "--epsilon", "3", "--ledger-dir", str(ledgers)]
    assert main([*common, "--out", str(tmp_path / "first")]) == 0
    first = _ledger_rows(ledgers)
    assert sorted(first) == ["site-0", "site-1"]
    assert all(len(charges) == 2 for charges in first.values())  # one charge per round
    capsys.readouterr()

    assert main([*common, "--out", str(tmp_path / "second")]) == 0
    captured = capsys.readouterr()
    assert _ledger_rows(ledgers) == first  # nothing more was charged or trained
    assert "ran out of privacy budget" in captured.out
    assert "has spent its budget" in captured.err
    rows = _rows(tmp_path / "second")
    assert rows[0]["clients"] == 0 and rows[0]["declined"] == 2
    assert len(rows) == 1  # the run stopped once every site was out of budget

    assert main(["audit", str(tmp_path / "second"), "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert [c["rounds"] for c in audit["clients"]] == [2, 2]
    assert all(2.9 < c["epsilon"] <= 3.0 for c in audit["clients"])


def _processes_using(directory: str) -> set[int]:
    """Live processes with a file open under ``directory`` (every Ray process keeps its log
    files in its session directory; their command lines are renamed, so not those)."""
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd).startswith(directory) for fd in fd_dir.iterdir()):
                found.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.e2e
def test_simulate_writes_the_run_and_ends_leaving_no_ray_process(tmp_path):
    """The default workflow, as the `fedrnn` program runs it: a DP simulation whose rows,
    summary, model and ledgers are whole; the program ends its process itself once the run
    is on disk, skipping Flower's wind-down and the interpreter's exit: nothing may be
    missing or left running."""
    out = tmp_path / "run"
    ray_dir = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # short: Ray's sockets live there
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fedrnn.shared.cli", "simulate", "--dataset", "synthetic",
             "--clients", "3", "--rounds", "2", "--hidden-size", "8", "--batch-size", "16",
             "--epsilon", "4", "--out", str(out)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "RAY_TMPDIR": ray_dir})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "run directory:" in proc.stdout  # printed before the process ended
        assert "error" not in proc.stderr.lower()
        assert "round   2/2" in proc.stderr  # progress shown while running
        rows = _rows(out)
        assert [r["round"] for r in rows] == [1, 2]
        for row in rows:
            assert {"loss", "accuracy", "auroc", "epsilon_max", "clients"} <= row.keys()
            assert row["clients"] == 3
        # the spend is cumulative and the calibration reaches the target at the last round
        assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"] <= 4.0
        assert rows[1]["epsilon_max"] > 3.8
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2
        assert summary["final"]["auroc"] == rows[-1]["auroc"]
        assert summary["privacy"]["epsilon_max"] == rows[-1]["epsilon_max"]
        assert summary["privacy"]["delta"] == 1e-5
        assert summary["privacy"]["accountant"] == "rdp"
        assert (out / "metrics.png").stat().st_size > 0
        model, config = load_trained(out)  # model.pt and config.toml whole
        assert config.rounds == 2 and config.labels == "neg,pos"
        assert not list(out.glob(".*.tmp"))  # every file renamed into place whole
        # the default ledger beside the run, one for every simulated site, recorded as an
        # absolute path
        assert [p.name for p in (out / "ledgers").glob("*.sqlite")] == ["sites.sqlite"]
        assert sorted(releases_by_site(out / "ledgers")) == ["site-0", "site-1", "site-2"]
        assert summary["privacy"]["ledger_dir"] == str((out / "ledgers").resolve())
        assert {k: len(v) for k, v in _ledger_rows(out / "ledgers").items()} == {
            "site-0": 2, "site-1": 2, "site-2": 2}
        deadline = time.monotonic() + 30
        while _processes_using(ray_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_using(ray_dir) == set()
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.e2e
def test_program_interrupted_stops_at_once_leaving_no_ray_process(tmp_path):
    # Ctrl-C: Flower's engine threads would otherwise play every remaining round first.
    out = tmp_path / "run"
    ray_dir = tempfile.mkdtemp(prefix="fr-", dir="/tmp")
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedrnn.shared.cli", "simulate", "--dataset", "synthetic",
             "--clients", "3", "--rounds", "200", "--hidden-size", "8", "--no-dp",
             "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RAY_TMPDIR": ray_dir},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or not _rows(out):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130 and "fedrnn: interrupted" in err, err[-3000:]
        assert 1 <= len(_rows(out)) < 200 and not (out / "summary.json").exists()
        assert (out / "checkpoint.pt").exists()  # the rounds done so far can be resumed
        deadline = time.monotonic() + 30
        while _processes_using(ray_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_using(ray_dir) == set()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.e2e
def test_simulate_long_tailed_speakers(tmp_path, long_tailed_jsonl, capsys):
    """Most speakers wrote once, some only empty messages: the run goes on without them."""
    out = tmp_path / "speakers"
    code = main(["simulate", "--data", str(long_tailed_jsonl), "--task", "lm", "--rounds", "1",
                 "--clients-per-round", "4", "--eval-clients-per-round", "4",
                 "--hidden-size", "8", "--embedding-dim", "4", "--noise-multiplier", "1.0",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 of 45 clients hold no usable record" in err
    row = _rows(out)[0]
    assert row["clients"] == 4 and row["dropped"] == 0 and math.isfinite(row["loss"])


@pytest.mark.e2e
def test_early_stopping_keeps_the_best_round_and_charges_no_round_not_run(tmp_path, capsys):
    out = tmp_path / "stopped"
    # no later round beats the first by 100: round 2 is stale and, with patience 1, the
    # run stops. Round 3 was sent before round 2's evaluation came in, so it is finished.
    code = main(["simulate", "--dataset", "synthetic", "--task", "classify", "--rounds", "6",
                 "--clients", "2", "--hidden-size", "8", "--batch-size", "16",
                 "--epsilon", "4", "--early-stopping-patience", "1",
                 "--early-stopping-metric", "loss", "--early-stopping-min-delta", "100",
                 "--out", str(out)])
    assert code == 0
    assert [r["round"] for r in _rows(out)] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_round"], summary["stopped_early"], summary["rounds"]) == (1, True, 3)
    assert (out / "model_best.pt").exists() and (out / "model.pt").exists()
    for releases in releases_by_site(out / "ledgers").values():
        assert {r.round for r in releases} <= {1, 2, 3}
    assert "early stopping: loss has not improved for 1 round(s)" in capsys.readouterr().err


@pytest.mark.e2e
def test_init_from_a_finished_run_starts_where_it_ended(tmp_path):
    common = ["simulate", "--dataset", "synthetic", "--task", "classify", "--clients", "2",
              "--hidden-size", "8", "--batch-size", "16", "--no-dp", "--lr", "0.05"]
    first, fresh, resumed = tmp_path / "first", tmp_path / "fresh", tmp_path / "from-first"
    assert main([*common, "--rounds", "4", "--out", str(first)]) == 0
    assert main([*common, "--rounds", "1", "--seed", "1", "--out", str(fresh)]) == 0
    assert main([*common, "--rounds", "1", "--seed", "1", "--init-from", str(first),
                 "--out", str(resumed)]) == 0
    ended, fresh_loss = _rows(first)[-1]["loss"], _rows(fresh)[0]["loss"]
    started = _rows(resumed)[0]["loss"]
    assert ended < fresh_loss  # the first run learnt something
    assert abs(started - ended) < 0.5 * (fresh_loss - ended)
    assert main([*common, "--rounds", "1", "--hidden-size", "16", "--init-from", str(first),
                 "--out", str(tmp_path / "wrong")]) == 2


@pytest.mark.parametrize(("flags", "said"), [
    ({}, "record-level DP epsilon 8 delta 1e-05"),
    ({"dp_level": "user"}, "user-level DP noise 1 x clip 1"),
    ({"dp_level": "both", "epsilon": 3.0},
     "record-level DP epsilon 3 delta 1e-05 and user-level DP noise 1 x clip 1"),
    ({"dp": False}, "no DP"),
])
def test_the_first_log_line_names_the_privacy_the_run_has(flags, said):
    # a user-level run once announced the record-level epsilon it never targets
    from fedrnn.simulations.simulate import _privacy_line

    assert _privacy_line(RunConfig(**flags)) == said
