"""End to end on Flower's Simulation Engine: seeded runs repeat, injected faults are recorded."""

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import releases_by_site

from fedrnn.shared.cli import main

pytestmark = pytest.mark.e2e  # every test here runs a real simulation

COMMON = ["simulate", "--dataset", "synthetic", "--clients", "6", "--clients-per-round", "3",
          "--rounds", "2", "--hidden-size", "8", "--batch-size", "16"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _charged_rounds(out):
    return {site: [r.round for r in releases]
            for site, releases in releases_by_site(out / "ledgers").items()}


def test_same_seed_same_sites_and_metrics(tmp_path, rdp_reference):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main([*COMMON, "--seed", "5", "--dp-level", "both", "--dropout-rate", "0.3",
                     "--user-noise-multiplier", "1.5", "--user-clip-norm", "0.5",
                     "--out", str(out)]) == 0
    a, b = ([{k: v for k, v in row.items() if k != "seconds"} for row in _rows(out)]
            for out in runs)
    assert _charged_rounds(runs[0]) == _charged_rounds(runs[1])  # the same sites, each round
    assert a == b  # bit for bit: replies are aggregated in partition order, whatever order
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["clients_total"] == 6
    # user-level DP is accounted apart from the sites' record-level spend: one release a
    # round, 3 of 6 sites sampled; the noise, sized for the 3 sampled, protects only as much
    # as it is against the clip of the sites that did reply (dropouts make it less);
    # checked against an independent accountant
    assert 0 < a[0]["user_epsilon"] < a[1]["user_epsilon"]
    user = summary["privacy"]["user_level"]
    history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in user["history"]]
    assert history == [(pytest.approx(1.5 * row["clients"] / 3), 0.5, 1) for row in a]
    assert user["epsilon"] == pytest.approx(rdp_reference(history, 1e-5), rel=0.01)
    assert user["epsilon"] == a[-1]["user_epsilon"]


def test_dropouts_are_recorded_and_still_charged(tmp_path):
    out = tmp_path / "faulty"
    assert main([*COMMON, "--rounds", "3", "--dropout-rate", "0.5", "--out", str(out)]) == 0
    rows = _rows(out)
    charged = _charged_rounds(out)
    dropped = [(row["round"], p) for row in rows for p in row["dropped_ids"]]
    assert dropped, "with half the sites failing, some must have dropped out"
    for row in rows:
        assert row["clients"] + row["dropped"] == 3  # aggregated what arrived
        assert len(row["dropped_ids"]) == row["dropped"] and row["timed_out"] == []
    for server_round, partition in dropped:
        assert server_round in charged[f"site-{partition}"]  # failed after the charge
    assert sum(len(r) for r in charged.values()) == 9  # every sampled site charged once


def _one_straggler_seed(config_flags):
    """A seed whose first round samples exactly one straggler (faults are seeded)."""
    from fedrnn.client.faults import STRAGGLE, fault_of
    from fedrnn.server.sampling import ClientSampler
    from fedrnn.shared.config import RunConfig

    for seed in range(100):
        config = RunConfig(clients=6, clients_per_round=3, seed=seed, **config_flags)
        faults = [fault_of(seed=seed, server_round=1, partition_id=p, dropout_rate=0.0,
                           straggler_rate=config.straggler_rate)
                  for p in ClientSampler(range(6), config).sample(1, "train")]
        if faults.count(STRAGGLE) == 1:
            return seed, faults.index(STRAGGLE)
    raise AssertionError("no seed found")


# The `fedrnn` program, its round deadline measured on a clock this script controls: the
# deadline passes once the round's two punctual replies are in and all three sampled sites
# (the straggler included) have charged their ledgers, never before. The straggler's reply
# is ten minutes late, so on no machine can it beat the deadline, nor a slow cold start
# miss it; the real clock still runs beneath (--round-timeout 300) so that a broken run
# fails rather than hangs. A program, not main() in this process: it stops Ray once the
# run is written instead of waiting out the straggler's sleep.
STRAGGLER_RUN = textwrap.dedent("""
    import sqlite3, sys, time
    from pathlib import Path
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    from fedrnn.server import messaging
    from fedrnn.shared import cli

    ledger = Path(sys.argv[1]) / "ledgers" / "sites.sqlite"
    sent, trained, passed = {}, [], []
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def recording_push(self, messages):
        messages = list(messages)
        ids = list(push(self, messages))
        sent.update((i, m.metadata.message_type) for i, m in zip(ids, messages))
        return ids

    def recording_pull(self, message_ids):
        replies = list(pull(self, message_ids))
        trained.extend(m for m in replies if sent[m.metadata.reply_to_message_id] == "train")
        return replies

    def charged():
        try:
            with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
                return db.execute("SELECT count(*) FROM releases WHERE purpose = 'train'"
                                  ).fetchone()[0]
        except sqlite3.OperationalError:  # not yet created
            return 0

    def clock():
        if not passed and len(trained) == 2 and charged() == 3:
            passed.append(True)
            print("deadline passed on the test's clock", file=sys.stderr, flush=True)
        return time.monotonic() + (3600.0 if passed else 0.0)

    InMemoryGrid.push_messages, InMemoryGrid.pull_messages = recording_push, recording_pull
    messaging.deadline_clock = clock
    sys.argv = ["fedrnn", *sys.argv[2:]]
    cli.run()
""")


def test_stragglers_past_the_round_timeout_are_left_out(tmp_path):
    seed, _ = _one_straggler_seed({"straggler_rate": 0.3})
    out = tmp_path / "late"
    proc = subprocess.run(
        [sys.executable, "-c", STRAGGLER_RUN, str(out), *COMMON, "--rounds", "1", "--seed",
         str(seed), "--straggler-rate", "0.3", "--straggler-delay", "600",
         "--round-timeout", "300", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deadline passed on the test's clock" in proc.stderr  # not on the real one
    row = _rows(out)[0]
    assert len(row["timed_out"]) == 1 and row["clients"] == 2 and row["dropped"] == 1
    assert row["dropped_ids"] == row["timed_out"]
    late = row["timed_out"][0]
    assert _charged_rounds(out)[f"site-{late}"] == [1]  # it trained and charged, too late


def test_evaluation_and_the_next_training_are_in_flight_together(tmp_path, monkeypatch):
    # Both start from the round's trained weights: the next round's training is sent with
    # the round's evaluation, before any evaluation reply is collected, so that Flower's
    # engine (which picks up new messages every 100 ms) never leaves its workers idle
    # between the phases. The rounds' results are those of phases run one after another.
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedrnn.shared import protocol as P

    sent, events = {}, []
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def recording_push(self, messages):
        messages = list(messages)
        ids = list(push(self, messages))
        for message, message_id in zip(messages, ids, strict=True):
            sent[message_id] = (message.metadata.message_type,
                                int(message.content[P.CONFIG][P.ROUND]))
        events.extend(("sent", sent[i]) for i in ids)
        return ids

    def recording_pull(self, message_ids):
        replies = list(pull(self, message_ids))
        events.extend(("replied", sent[m.metadata.reply_to_message_id]) for m in replies)
        return replies

    monkeypatch.setattr(InMemoryGrid, "push_messages", recording_push)
    monkeypatch.setattr(InMemoryGrid, "pull_messages", recording_pull)
    out = tmp_path / "run"
    assert main([*COMMON, "--rounds", "3", "--out", str(out)]) == 0
    assert len(_rows(out)) == 3
    for server_round in (1, 2):
        next_training = events.index(("sent", ("train", server_round + 1)))
        first_reply = events.index(("replied", ("evaluate", server_round)))
        assert events.index(("sent", ("evaluate", server_round))) < next_training < first_reply
    assert ("sent", ("train", 4)) not in events  # none beyond the last round


def test_a_round_every_site_fails_keeps_the_round_before_it(tmp_path, monkeypatch):
    # A round's row and checkpoint are written once the next round's training replies are
    # in (server/federation.py); when every site then fails, the run stops with an error
    # and the round before it is still recorded, so a restart resumes after it.
    from flwr.app import Error, Message
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedrnn.server import checkpoint
    from fedrnn.shared import protocol as P

    sent = {}
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def recording_push(self, messages):
        messages = list(messages)
        ids = list(push(self, messages))
        sent.update(zip(ids, messages, strict=True))
        return ids

    def failing_pull(self, message_ids):
        replies = []
        for reply in pull(self, message_ids):
            original = sent[reply.metadata.reply_to_message_id]
            if (original.metadata.message_type == "train"
                    and int(original.content[P.CONFIG][P.ROUND]) == 2):
                reply = Message(Error(code=0, reason="injected failure"), reply_to=original)
            replies.append(reply)
        return replies

    monkeypatch.setattr(InMemoryGrid, "push_messages", recording_push)
    monkeypatch.setattr(InMemoryGrid, "pull_messages", failing_pull)
    out = tmp_path / "run"
    assert main([*COMMON, "--rounds", "3", "--out", str(out)]) != 0
    assert [row["round"] for row in _rows(out)] == [1]
    assert checkpoint.load(out).server_round == 1
