"""The ledger: round trips, refusals that write nothing, and durability under SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from client.ledger import Charge, Ledger
from client.spending import BudgetExhausted, charge_round
from shared.config import RunConfig
from shared.privacy import epsilon


def _charge(fp="abc", round_=1, sigma=1.0):
    return Charge(fingerprint=fp, site="s", run_id="r", round=round_, mechanism="dp-sgd",
                  noise_multiplier=sigma, sample_rate=0.1, steps=10, clip_norm=1.0,
                  delta=1e-5)


def test_charges_round_trip_and_persist(tmp_path):
    path = tmp_path / "site.sqlite"
    with Ledger(path) as ledger:
        ledger.charge(_charge(round_=1))
        ledger.charge(_charge(round_=2, sigma=2.0))
        ledger.charge(_charge(fp="other"))
    with Ledger(path) as ledger:  # a new process would see the same
        assert ledger.history("abc") == [(1.0, 0.1, 10), (2.0, 0.1, 10)]
        assert ledger.fingerprints() == ["abc", "other"]
        assert ledger.check_integrity()


def test_over_budget_round_is_refused_and_not_charged(tmp_path):
    config = RunConfig(epsilon=2.0)
    planned = (1.5, 0.05, 50)
    with Ledger(tmp_path / "site.sqlite") as ledger:
        spent = []
        with pytest.raises(BudgetExhausted, match="declined round"):
            for r in range(1, 100):
                spent.append(charge_round(ledger, fingerprint="fp", site="s", run_id="r",
                                          server_round=r, planned=planned, config=config))
        history = ledger.history("fp")
        assert len(history) == len(spent) >= 1
        assert epsilon(history, delta=1e-5) <= 2.0  # never over budget
        assert epsilon([*history, planned], delta=1e-5) > 2.0  # the refused one would be
        assert ledger.budget("fp").epsilon == 2.0


def test_not_a_ledger_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.sqlite"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(Exception, match="not a fedrnn ledger"):
        Ledger(bad)


WRITER = textwrap.dedent("""
    import sys
    from client.ledger import Charge, Ledger
    ledger = Ledger(sys.argv[1])
    i = 0
    while True:
        i += 1
        ledger.charge(Charge(fingerprint="fp", site="s", run_id="r", round=i,
                             mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=0.1,
                             steps=1, clip_norm=1.0, delta=1e-5))
        print(i, flush=True)  # only after the commit returned
""")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
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
        rounds = [c.round for c in ledger.charges()]
    # every confirmed charge is there; at most the one in flight more; no gaps
    assert rounds == list(range(1, len(rounds) + 1))
    assert confirmed[-1] <= len(rounds) <= confirmed[-1] + 1


TRAINER = textwrap.dedent("""
    import sys
    from client.ledger import Ledger
    from client.randomness import SiteRandomness
    from client.spending import charge_round
    from client.training import train
    from shared.config import RunConfig
    from shared.data import client_data, resolve
    from shared.models import build_model
    config = resolve(RunConfig(dataset="synthetic", clients=2, local_epochs=100000,
                               batch_size=4, budget_epsilon=1e9))
    data = client_data(config, 0)
    with Ledger(sys.argv[1]) as ledger:
        charge_round(ledger, fingerprint=data.fingerprint, site=data.name, run_id="r",
                     server_round=1, planned=(1.0, 4 / 24, 6 * 100000), config=config)
    print("charged", flush=True)
    train(build_model(config), data.train, config, noise_multiplier=1.0,
          randomness=SiteRandomness.from_seed(0))
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
        assert len(ledger.charges()) == 1  # the budget was spent before training began
