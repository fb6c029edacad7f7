"""``fedrnn audit``: what every site has spent, recomputed from its ledger.

Input: a run directory (its ledgers and its user-level record), one ledger file, or a
directory of ledger files. For each site in a ledger, its spend is the largest loss of
any of its records (what the budget bounds), recomputed from the releases that record
took part in (``history``) by two accountants: RDP (an upper bound) and PRV (an estimate
within ``PRV_EPS_ERROR``). Were PRV's estimate, less its error, above the RDP bound, one
of them would be wrong: such rows are flagged. Every change of the site's budget is
listed with who made it (``site``: lowered by its policy; ``set-budget``: by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrnn.client.ledger import Ledger
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.privacy import History, epsilon
from fedrnn.shared.run_records import SUMMARY_FILE, UserLevelSummary, read_summary

PRV_EPS_ERROR = 0.01  # Opacus's default accuracy of the PRV accountant


@dataclass
class SiteSpend:
    client: str
    ledger: str
    records: int  # records the site has ever used in a release
    records_at_max: int  # how many of them have lost ``epsilon``
    accountant: str
    delta: float
    budget_epsilon: float | None
    history: History
    clip_norms: list[float]
    runs: list[str]
    purposes: list[str] = field(default_factory=list)  # per history entry: train / evaluate
    budget_changes: list[dict[str, Any]] = field(default_factory=list)
    epsilon: float = 0.0  # by ``accountant``
    epsilon_rdp: float = 0.0
    epsilon_prv: float = 0.0
    curve: list[float] = field(default_factory=list)  # epsilon after each release

    @property
    def disagree(self) -> bool:
        return self.epsilon_prv - PRV_EPS_ERROR > self.epsilon_rdp * (1 + 1e-9)

    @property
    def share_used(self) -> float | None:
        return self.epsilon / self.budget_epsilon if self.budget_epsilon else None

    def to_json(self) -> dict[str, Any]:
        return {
            "client": self.client, "epsilon": self.epsilon, "delta": self.delta,
            "budget_epsilon": self.budget_epsilon, "accountant": self.accountant,
            "rounds": len(self.history),
            "history": [{"noise_multiplier": s, "sample_rate": q, "steps": n}
                        for s, q, n in self.history],
            "epsilon_rdp": self.epsilon_rdp, "epsilon_prv": self.epsilon_prv,
            "accountants_disagree": self.disagree, "clip_norms": self.clip_norms,
            "runs": self.runs, "ledger": self.ledger, "records": self.records,
            "records_at_max": self.records_at_max, "purposes": self.purposes,
            "budget_changes": self.budget_changes,
        }


@dataclass
class Audit:
    source: Path
    sites: list[SiteSpend]
    user_level: UserLevelSummary | None
    run_config: str | None  # config.toml text of a run directory

    def to_json(self) -> dict[str, Any]:
        return {"clients": [s.to_json() for s in self.sites], "user_level":
                None if self.user_level is None else self.user_level.to_json()}


class NothingToAudit(FedrnnError):
    """A run with no ledger and no user-level record: trained without DP, or clipped
    without noise. Its empirical audit still applies; a damaged ledger is never this."""


def audit(path: str | Path) -> Audit:
    """Read ``path`` (run dir, ledger file or ledger dir) and recompute every site's spend."""
    path = Path(path)
    if not path.exists():
        raise FedrnnError(f"{path}: not found (give a run directory, a ledger file or a "
                          "directory of ledgers)")
    user_level, run_config = None, None
    if path.is_file():
        ledgers = [path]
    elif (path / SUMMARY_FILE).exists() or (path / "config.toml").exists():
        run_config = (path / "config.toml").read_text() if (path / "config.toml").exists() \
            else None
        privacy = read_summary(path).privacy if (path / SUMMARY_FILE).exists() else None
        user_level = privacy.user_level if privacy is not None else None
        # the run's own record of where its ledgers are; else the default beside it
        recorded = privacy.ledger_dir if privacy is not None else None
        ledger_dir = Path(recorded) if recorded else path / "ledgers"
        ledgers = sorted(ledger_dir.glob("*.sqlite"))
    else:
        ledgers = sorted(path.glob("*.sqlite"))
    if not ledgers and user_level is None:
        raise NothingToAudit(f"{path}: no ledgers found (*.sqlite) and no user-level record")
    sites = [site for ledger in ledgers for site in _read_ledger(ledger)]
    return Audit(source=path, sites=sites, user_level=user_level, run_config=run_config)


def _read_ledger(path: Path) -> list[SiteSpend]:
    with Ledger(path) as ledger:
        if not ledger.check_integrity():
            raise FedrnnError(f"{path}: the ledger fails SQLite's integrity check")
        budget = ledger.budget()
        accountant = budget.accountant if budget else "rdp"
        delta = budget.delta if budget else 1e-5
        changes = [{"epsilon": b.epsilon, "delta": b.delta, "accountant": b.accountant,
                    "source": b.source, "at": b.created_at} for b in ledger.budget_changes()]
        sites = []
        for name in ledger.sites() or [path.stem]:
            cohorts = ledger.cohorts_of_site(name)
            spends = {c: epsilon(ledger.history(c), delta=delta, accountant=accountant)
                      for c in cohorts}
            worst = max(spends, key=lambda c: (spends[c], len(ledger.history(c))),
                        default=None)
            releases = ledger.releases_of(worst)
            history = [r.entry for r in releases]
            site = SiteSpend(
                client=name, ledger=str(path), records=sum(cohorts.values()),
                records_at_max=sum(n for c, n in cohorts.items()
                                   if worst is not None and spends[c] == spends[worst]),
                accountant=accountant, delta=delta,
                budget_epsilon=budget.epsilon if budget else None, history=history,
                clip_norms=sorted({r.clip_norm for r in releases}),
                runs=list(dict.fromkeys(r.run_id for r in ledger.releases(name))),
                purposes=[r.purpose for r in releases], budget_changes=changes)
            site.epsilon = epsilon(history, delta=delta, accountant=accountant)
            site.epsilon_rdp = epsilon(history, delta=delta, accountant="rdp")
            site.epsilon_prv = epsilon(history, delta=delta, accountant="prv")
            site.curve = [epsilon(history[: i + 1], delta=delta, accountant=accountant)
                          for i in range(len(history))]
            sites.append(site)
    return sites


def table(result: Audit) -> str:
    """The audit as a fixed-width text table."""
    header = ("site", "epsilon", "rdp", "prv", "delta", "budget", "used", "records", "releases",
              "noise mult.", "sample rate", "clip", "")
    rows = [header]
    for s in result.sites:
        noises = sorted({round(h[0], 4) for h in s.history})
        rates = sorted({round(h[1], 4) for h in s.history})
        rows.append((
            s.client, f"{s.epsilon:.3f}", f"{s.epsilon_rdp:.3f}", f"{s.epsilon_prv:.3f}",
            f"{s.delta:g}", "-" if s.budget_epsilon is None else f"{s.budget_epsilon:g}",
            "-" if s.share_used is None else f"{100 * s.share_used:.0f}%",
            str(s.records), str(len(s.history)), ", ".join(f"{n:g}" for n in noises) or "-",
            ", ".join(f"{r:g}" for r in rates) or "-",
            ", ".join(f"{c:g}" for c in s.clip_norms) or "-",
            "ACCOUNTANTS DISAGREE" if s.disagree else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    raised = {(c["at"], c["epsilon"], c["delta"], c["source"]) for s in result.sites
              for c in s.budget_changes}
    for at, eps, delta, source in sorted(raised):
        who = "raised by hand (fedrnn ledger set-budget)" if source == "set-budget" else \
            "set by the site's policy"
        lines.append(f"budget epsilon {eps:g}, delta {delta:g} from {at}: {who}")
    if result.user_level:
        u = result.user_level
        lines.append(f"\nuser-level (whole-site) DP: epsilon {u.epsilon:.3f} at delta "
                     f"{u.delta:g} over {len(u.history)} releases (noise multiplier "
                     f"{u.noise_multiplier:g}, clip {u.clip_norm:g}, {u.accountant})")
    return "\n".join(lines)
