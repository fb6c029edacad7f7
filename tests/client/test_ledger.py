"""The ledger and per-record spending: every record's loss stays within its budget, across
edits of the data, concurrent processes and kills, and a run can never raise the budget."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import independent_rdp_epsilon

from fedrnn.client.ledger import Budget, Ledger, Release
from fedrnn.client.spending import BudgetExhausted, charge, keep_budget, site_epsilon

BUDGET = Budget(2.0, 1e-5, "rdp")
RELEASE = Release(site="s", run_id="r", round=1, purpose="train", mechanism="dp-sgd",
                  noise_multiplier=0.0, sample_rate=1.0, steps=1, clip_norm=1.0, delta=0.0)


def fixed(sigma: float = 4.0, steps: int = 2):
    """A planner: the same release whatever the records."""
    return lambda n, _reference: (sigma, 0.5, steps)


def losses(ledger: Ledger, keys) -> dict[str, float]:
    """Each record's loss, recomputed by an independent accountant from its releases."""
    out = {}
    for cohort, group in ledger.cohorts_of(keys).items():
        eps = independent_rdp_epsilon(ledger.history(cohort), 1e-5) if cohort else 0.0
        out.update({k: eps for k in group})
    return out


def test_each_record_composes_exactly_the_releases_it_took_part_in(tmp_path):
    with Ledger(tmp_path / "site.sqlite") as ledger:
        charge(ledger, keys=["a", "b"], budget=Budget(50, 1e-5, "rdp"), plan=fixed(2.0, 1),
               release=RELEASE)
        charge(ledger, keys=["b", "c"], budget=Budget(50, 1e-5, "rdp"), plan=fixed(3.0, 1),
               release=RELEASE)
        history = {k: ledger.history(c) for c, keys in ledger.cohorts_of("abc").items()
                   for k in keys}
    assert history == {"a": [(2.0, 0.5, 1)], "b": [(2.0, 0.5, 1), (3.0, 0.5, 1)],
                       "c": [(3.0, 0.5, 1)]}


def test_records_retire_when_spent_and_new_records_start_fresh(tmp_path):
    keys = [f"r{i}" for i in range(8)]
    with Ledger(tmp_path / "site.sqlite") as ledger:
        rounds = 0
        with pytest.raises(BudgetExhausted, match="has spent its budget"):
            for _ in range(100):
                charge(ledger, keys=keys, budget=BUDGET, plan=fixed(), release=RELEASE)
                rounds += 1
        assert rounds >= 1
        spent = losses(ledger, keys)
        assert max(spent.values()) <= 2.0  # never over budget, by an independent accountant
        # the file edited: reordered, one record added. Only the new record takes part.
        charged = charge(ledger, keys=["new", *reversed(keys)], budget=BUDGET, plan=fixed(),
                         release=RELEASE)
        assert charged.keys == {"new"} and charged.retired == len(keys)
        assert max(losses(ledger, ["new", *keys]).values()) <= 2.0


def test_a_release_is_planned_for_the_records_that_remain(tmp_path):
    # four spent records and four fresh: the plan is made for the fresh ones alone
    with Ledger(tmp_path / "site.sqlite") as ledger:
        old = ["o1", "o2", "o3", "o4"]
        while True:
            try:
                charge(ledger, keys=old, budget=BUDGET, plan=fixed(), release=RELEASE)
            except BudgetExhausted:
                break
        seen = []

        def plan(n, reference):
            seen.append((n, reference))
            return (4.0, 1 / -(-n // 4), 2)

        charged = charge(ledger, keys=[*old, "f1", "f2", "f3", "f4"], budget=BUDGET, plan=plan,
                         release=RELEASE)
    assert charged.keys == {"f1", "f2", "f3", "f4"}
    assert seen[-1] == (4, [])  # the last plan: four records, no history


def test_a_run_lowers_the_budget_but_never_raises_it(tmp_path):
    with Ledger(tmp_path / "site.sqlite") as ledger:
        assert keep_budget(ledger, Budget(8, 1e-5, "rdp")).epsilon == 8
        assert keep_budget(ledger, Budget(1000, 0.9, "rdp")) == Budget(8, 1e-5, "rdp")
        assert keep_budget(ledger, Budget(3, 1e-6, "rdp")) == Budget(3, 1e-6, "rdp")
        assert keep_budget(ledger, Budget(8, 1e-5, "rdp")) == Budget(3, 1e-6, "rdp")
        ledger.set_budget(Budget(10, 1e-5, "rdp", source="set-budget"))  # the local act
        assert ledger.budget().epsilon == 10
        sources = [b.source for b in ledger.budget_changes()]
    assert sources == ["site", "site", "set-budget"]


def test_no_release_without_noise_can_be_written(tmp_path):
    with Ledger(tmp_path / "site.sqlite") as ledger:
        with pytest.raises(BudgetExhausted):  # its loss is infinite: no record fits
            charge(ledger, keys=["a"], budget=BUDGET, plan=lambda n, r: (0.0, 1.0, 1),
                   release=RELEASE)
        # and the ledger itself refuses the row, whatever code tries to write it
        with pytest.raises(sqlite3.IntegrityError), ledger.transaction():
            ledger.record_release(RELEASE, {None: ["a"]})
        assert ledger.releases() == []


def test_the_ledger_is_private_from_creation_and_refuses_other_files(tmp_path):
    path = tmp_path / "site.sqlite"
    old = os.umask(0)  # even a permissive umask: created 0600 by open(2) itself
    try:
        Ledger(path).close()
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o077 == 0
    bad = tmp_path / "notes.sqlite"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(Exception, match="not a fedrnn ledger"):
        Ledger(bad)
    legacy = tmp_path / "v01.sqlite"
    with sqlite3.connect(legacy) as db:
        db.execute("CREATE TABLE charges (id INTEGER)")
    with pytest.raises(Exception, match="per file, not per record"):
        Ledger(legacy)


CONTENDER = textwrap.dedent("""
    import sys
    from fedrnn.client.ledger import Budget, Ledger, Release
    from fedrnn.client.spending import BudgetExhausted, charge
    release = Release(site="s", run_id=sys.argv[2], round=1, purpose="train",
                      mechanism="dp-sgd", noise_multiplier=0.0, sample_rate=1.0, steps=1,
                      clip_norm=1.0, delta=0.0)
    n = 0
    with Ledger(sys.argv[1]) as ledger:
        while True:
            try:
                charge(ledger, keys=["a", "b", "c"], budget=Budget(2.0, 1e-5, "rdp"),
                       plan=lambda n, r: (3.0, 1.0, 1), release=release)
                n += 1
            except BudgetExhausted:
                break
    print(n)
""")


def test_concurrent_processes_never_spend_past_the_budget(tmp_path):
    # Both check and charge in one transaction: two processes cannot both pass the check
    # with the last release that fits.
    # (and all of them create the ledger at once, as a simulation's workers do)
    path = tmp_path / "site.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(path), f"run-{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    counts = [int(p.communicate(timeout=120)[0]) for p in procs]
    with Ledger(path) as ledger:
        assert len(ledger.releases()) == sum(counts)
        assert max(losses(ledger, "abc").values()) <= 2.0
        # and the budget was used: one more release would have crossed it
        history = ledger.history(next(iter(ledger.cohorts_of("a"))))
        assert independent_rdp_epsilon([*history, (3.0, 1.0, 1)], 1e-5) > 2.0


WRITER = textwrap.dedent("""
    import sys
    from fedrnn.client.ledger import Budget, Ledger, Release
    from fedrnn.client.spending import charge
    ledger = Ledger(sys.argv[1])
    i = 0
    while True:
        i += 1
        charge(ledger, keys=["a", "b"], budget=Budget(1e9, 1e-5, "rdp"),
               plan=lambda n, r: (1.0, 0.1, 1),
               release=Release(site="s", run_id="r", round=i, purpose="train",
                               mechanism="dp-sgd", noise_multiplier=0.0, sample_rate=1.0,
                               steps=1, clip_norm=1.0, delta=0.0))
        print(i, flush=True)  # only after the commit returned
""")


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_kill_during_ledger_writes_never_corrupts_or_undercounts(tmp_path, delay):
    path = tmp_path / "site.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    first = proc.stdout.readline()  # the writer is up and committing
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    confirmed = [int(first), *(int(line) for line in proc.stdout.read().split())]
    proc.wait()
    with Ledger(path) as ledger:
        assert ledger.check_integrity()
        rounds = [r.round for r in ledger.releases()]
        # every record's history holds every committed release, none half-written
        assert all(len(ledger.history(c)) == len(rounds) for c in ledger.cohorts_of("ab"))
    # every confirmed charge is there; at most the one in flight more; no gaps
    assert rounds == list(range(1, len(rounds) + 1))
    assert confirmed[-1] <= len(rounds) <= confirmed[-1] + 1


TRAINER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from fedrnn.shared.randomness import SiteRandomness
    from fedrnn.client.site import Site, train_round
    from fedrnn.shared.config import RunConfig
    from fedrnn.shared.data import client_data, resolve
    from fedrnn.shared.models import build_model
    config = resolve(RunConfig(dataset="synthetic", clients=2, local_epochs=100000,
                               batch_size=4, noise_multiplier=1.0, budget_epsilon=1e9))
    site = Site(name="s", data=client_data(config, 0), ledger=Path(sys.argv[1]),
                randomness=SiteRandomness.from_seed(0))
    import fedrnn.client.spending
    charge = fedrnn.client.spending.charge
    def charge_and_say(*args, **kwargs):
        charged = charge(*args, **kwargs)
        print("charged", flush=True)
        return charged
    import fedrnn.client.site
    fedrnn.client.site.charge = charge_and_say
    train_round(site, config, 1, build_model(config))
    print("released", flush=True)
""")


def test_kill_during_training_leaves_the_charge(tmp_path):
    path = tmp_path / "site.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "charged"
    time.sleep(1.0)  # training is under way
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    assert "released" not in rest
    with Ledger(path) as ledger:
        assert ledger.check_integrity()
        assert len(ledger.releases()) == 1  # the budget was spent before training began
        assert site_epsilon(ledger) > 0
