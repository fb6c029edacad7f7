"""Spending privacy budget record by record: check, charge, then release.

A record's privacy loss is the composition of every release computed from a data set that
held it; its budget bounds that loss. Before each release the site runs a per-record
filter (individual privacy accounting, Feldman and Zrnic 2021; docs/privacy.md): every
record whose loss would exceed the budget after this release is left out of it (it
*retires*), and the release is planned for the records that remain. Records new to the
ledger start with the full budget.

The order is the guarantee. ``charge`` checks and commits the release to the ledger in
one ``BEGIN IMMEDIATE`` transaction, so two processes on one ledger cannot both pass the
check before either charges; the caller trains (or evaluates) only on the records
``charge`` returns, and only after it returns. A crash after the charge wastes budget but
never spends it uncounted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from fedrnn.client.ledger import Budget, Ledger, Release
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.privacy import History, calibrate_after, calibrate_noise, epsilon

log = logging.getLogger("fedrnn")

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
# records that will take part -> their release, or None if they cannot take part at all;
# given the history of the records the plan is made for (the largest group)
Planner = Callable[[int, History], Entry | None]


# Records whose remaining budget would need more noise than this many times what the run
# is planned with retire instead: at four times the noise an update carries a sixteenth of
# the signal-to-noise ratio, and the last slivers of a budget would buy nothing useful.
MAX_NOISE_FACTOR = 4.0


class BudgetExhausted(FedrnnError):
    """No record may take part in this release without exceeding the budget."""


@dataclass(frozen=True)
class Charged:
    """A release committed to the ledger, to be made now on exactly these records."""

    release_id: int
    keys: frozenset[str]
    entry: Entry
    retired: int  # records left out because their budget would not allow this release
    epsilon_max: float  # the largest loss of any of the site's records, this one included


def keep_budget(ledger: Ledger, wanted: Budget) -> Budget:
    """The budget that holds: the stored one, lowered to ``wanted`` where that is lower.

    A run never raises it (``fedrnn ledger set-budget`` does, explicitly); a site's first
    run stores its own. Call inside the charge's transaction.
    """
    stored = ledger.budget()
    if stored is None:
        ledger.set_budget(wanted)
        return wanted
    holds = Budget(min(stored.epsilon, wanted.epsilon), min(stored.delta, wanted.delta),
                   wanted.accountant)
    if (holds.epsilon, holds.delta, holds.accountant) != (stored.epsilon, stored.delta,
                                                          stored.accountant):
        ledger.set_budget(holds)
    if wanted.epsilon > stored.epsilon or wanted.delta > stored.delta:
        log.warning("%s: the stored budget (epsilon %g, delta %g) stays: a run cannot raise "
                    "it (fedrnn ledger set-budget %s ... raises it)", ledger.path,
                    stored.epsilon, stored.delta, ledger.path)
    return holds


def charge(ledger: Ledger, *, keys: Collection[str], budget: Budget, plan: Planner,
           release: Release) -> Charged:
    """Check every record in ``keys`` against ``budget``, then commit ``release`` (its
    site, run, round, purpose, mechanism and clip norm; the entry comes from ``plan``) for
    the records whose loss stays within it. Raises ``BudgetExhausted``, writing nothing,
    if no record can take part."""
    with ledger.transaction():
        holds = keep_budget(ledger, budget)
        groups = ledger.cohorts_of(keys)
        histories = {c: ledger.history(c) for c in groups}

        def loss(history: History) -> float:
            return epsilon(history, delta=holds.delta, accountant=holds.accountant)

        active = dict(groups)
        while True:
            if not active:
                raise BudgetExhausted(
                    f"{release.site}: every one of its {len(keys)} {release.purpose} records "
                    f"has spent its budget (epsilon {holds.epsilon:g} at delta "
                    f"{holds.delta:g}); none can take part in round {release.round}")
            # plan for the largest group (ties: the least spent), then drop every group
            # whose loss the planned release would take past the budget, and plan again for
            # those left: fewer records means a higher sampling rate
            reference = max(active, key=lambda c: (len(active[c]), -len(histories[c])))
            entry = plan(sum(len(k) for k in active.values()), histories[reference])
            if entry is None:
                del active[reference]
                continue
            over = [c for c in active if loss([*histories[c], entry]) > holds.epsilon]
            if not over:
                break
            for c in over:
                del active[c]
        sigma, rate, steps = entry
        release_id = ledger.record_release(
            Release(site=release.site, run_id=release.run_id, round=release.round,
                    purpose=release.purpose, mechanism=release.mechanism,
                    noise_multiplier=sigma, sample_rate=rate, steps=steps,
                    clip_norm=release.clip_norm, delta=holds.delta), active)
        used = frozenset(k for group in active.values() for k in group)
        spent = max(loss(ledger.history(c)) for c in ledger.cohorts_of_site(release.site))
    return Charged(release_id=release_id, keys=used, entry=entry,
                   retired=len(keys) - len(used), epsilon_max=spent)


def site_epsilon(ledger: Ledger, site: str | None = None) -> float:
    """The largest loss of any record of ``site`` (every site: None), by its budget's
    accountant at its delta; 0 for a ledger without budget or releases."""
    budget = ledger.budget()
    if budget is None:
        return 0.0
    return max((epsilon(ledger.history(c), delta=budget.delta, accountant=budget.accountant)
                for c in ledger.cohorts_of_site(site)), default=0.0)


def noise_for(*, target_epsilon: float, budget: Budget, reference: History, sample_rate: float,
              steps: int, rounds: int, rounds_left: int, floor: float = 0.0) -> float | None:
    """The noise multiplier of one release of ``steps`` steps at ``sample_rate``.

    Calibrated so that ``rounds`` such releases from a fresh start cost at most
    ``target_epsilon`` (the site cannot know how often it will be asked, so it plans for
    every round), never below ``floor``. If the records the plan is made for (their
    history: ``reference``) could not afford the ``rounds_left`` releases still to come at
    that noise, it is calibrated to what their remaining budget allows. None: nothing fits
    (or only with more than ``MAX_NOISE_FACTOR`` times the planned noise).
    """
    try:
        sigma = max(floor, calibrate_noise(target_epsilon=target_epsilon, delta=budget.delta,
                                           sample_rate=sample_rate, steps=steps * rounds,
                                           accountant=budget.accountant))
    except ValueError:  # Opacus: "The privacy budget is too low."
        return None
    if reference and epsilon([*reference, (sigma, sample_rate, steps * rounds_left)],
                             delta=budget.delta, accountant=budget.accountant) > budget.epsilon:
        after = calibrate_after(reference, target_epsilon=budget.epsilon, delta=budget.delta,
                                sample_rate=sample_rate, steps=steps * rounds_left,
                                accountant=budget.accountant)
        if after is None or after > MAX_NOISE_FACTOR * sigma:
            return None
        sigma = max(sigma, after)
    return sigma
