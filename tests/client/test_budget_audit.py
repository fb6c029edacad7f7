"""`fedrnn budget` and `fedrnn audit` against an independent accountant (dp-accounting)."""

import json

import dp_accounting
import pytest

from fedrnn.client.ledger import Budget, Ledger, Release
from fedrnn.shared.cli import main


def _pld(history, delta):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    steps)
    return acc.get_epsilon(delta)


def _budget(capsys, *args):
    assert main(["budget", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.1, 1000), (0.05, 0.8, 300),
                                           (0.2, 2.0, 50), (0.004, 0.9, 10_000)])
def test_budget_epsilon_matches_dp_accounting(capsys, rdp_reference, q, sigma, steps):
    args = ["--sample-rate", str(q), "--noise-multiplier", str(sigma), "--steps", str(steps),
            "--delta", "1e-5"]
    rdp = _budget(capsys, *args)
    assert rdp["accountant"] == "rdp" and rdp["delta"] == 1e-5
    assert rdp["epsilon"] == pytest.approx(rdp_reference([(sigma, q, steps)], 1e-5), rel=0.01)
    prv = _budget(capsys, *args, "--accountant", "prv")
    assert prv["epsilon"] == pytest.approx(_pld([(sigma, q, steps)], 1e-5), rel=0.03, abs=0.02)
    assert prv["epsilon"] <= rdp["epsilon"] + 0.01  # PRV is the tighter analysis


def test_budget_published_value(capsys):
    # Abadi et al. 2016 / Opacus's MNIST example: q=256/60000, sigma=1.1, 60 epochs
    # (14,062 steps) give epsilon of about 2.9 (RDP) at delta=1e-5.
    out = _budget(capsys, "--sample-rate", str(256 / 60000), "--noise-multiplier", "1.1",
                  "--steps", "14062", "--delta", "1e-5")
    assert 2.5 < out["epsilon"] < 3.2


def test_budget_solves_for_noise(capsys, rdp_reference):
    out = _budget(capsys, "--sample-rate", "0.05", "--target-epsilon", "3", "--steps", "300",
                  "--delta", "1e-5")
    assert 2.97 <= out["epsilon"] <= 3.0
    reference = rdp_reference([(out["noise_multiplier"], 0.05, 300)], 1e-5)
    assert reference == pytest.approx(3.0, rel=0.02)


@pytest.mark.parametrize("args,message", [
    (["--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"], "exactly one of"),
    (["--sample-rate", "2", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
     "sample-rate"),
    # not a number, or no bound at all: refused, not answered (inf and NaN ran to a
    # made-up noise multiplier of 10, or into Opacus's endless series)
    *[(["--sample-rate", "0.1", flag, value, "--steps", "10", "--delta", "1e-5"], flag)
      for flag in ("--noise-multiplier", "--target-epsilon") for value in ("inf", "nan")],
])
def test_budget_bad_flags(capsys, args, message):
    assert main(["budget", *args]) == 2
    assert message in capsys.readouterr().err


def test_audit_json_recomputes_from_its_own_history(tmp_path, capsys, rdp_reference):
    ledgers = tmp_path / "ledgers"
    histories = {"site-a": [(1.2, 0.05, 20)] * 5, "site-b": [(0.9, 0.1, 10), (1.5, 0.1, 10)]}
    for site, history in histories.items():
        with Ledger(ledgers / f"{site}.sqlite") as ledger:
            ledger.set_budget(Budget(6.0, 1e-5, "rdp"))
            for r, (sigma, q, steps) in enumerate(history, start=1):
                # a record that took part in every release, and one only in the first
                keys = ["a", "b"] if r == 1 else ["a"]
                with ledger.transaction():
                    ledger.record_release(
                        Release(site=site, run_id="run-1", round=r, purpose="train",
                                mechanism="dp-sgd", noise_multiplier=sigma, sample_rate=q,
                                steps=steps, clip_norm=1.0, delta=1e-5),
                        ledger.cohorts_of(keys))
    plot = tmp_path / "eps.png"
    report = tmp_path / "audit.html"
    assert main(["audit", str(ledgers), "--json", "--plot", str(plot),
                 "--html", str(report)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["user_level"] is None
    assert [c["client"] for c in out["clients"]] == ["site-a", "site-b"]
    for client in out["clients"]:
        history = [(h["noise_multiplier"], h["sample_rate"], h["steps"])
                   for h in client["history"]]
        assert history == histories[client["client"]]  # the record that lost the most
        assert client["records"] == 2
        assert client["rounds"] == len(history) and client["budget_epsilon"] == 6.0
        assert client["epsilon"] == pytest.approx(rdp_reference(history, client["delta"]), rel=0.01)
        assert not client["accountants_disagree"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    page = report.read_text()
    assert "site-b" in page and "data:image/png;base64," in page and "protects" in page
    # the human table names every site and its share of the budget
    assert main(["audit", str(ledgers / "site-a.sqlite")]) == 0
    assert "site-a" in capsys.readouterr().out


def test_audit_missing_path(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
