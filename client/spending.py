"""Spending a site's privacy budget: check, then charge the ledger, then train.

The order is the guarantee. ``charge_round`` commits the round's release to the ledger
before it returns, and the caller trains only after it returns; a round that would take
the site past its budget is refused before anything is written or trained.
"""

from __future__ import annotations

from client.ledger import MECHANISM_DPSGD, Budget, Charge, Ledger
from shared.config import RunConfig
from shared.errors import FedrnnError
from shared.privacy import History, epsilon


class BudgetExhausted(FedrnnError):
    """This round would take the site past its (epsilon, delta) budget."""


def charge_round(ledger: Ledger, *, fingerprint: str, site: str, run_id: str,
                 server_round: int, planned: tuple[float, float, int],
                 config: RunConfig) -> float:
    """Charge ``planned`` = (noise multiplier, sample rate, steps) if the budget allows.

    Returns the site's epsilon after the charge (at the budget's delta); raises
    ``BudgetExhausted`` without writing a charge otherwise.
    """
    budget_epsilon, budget_delta = config.site_budget
    ledger.set_budget(fingerprint, Budget(budget_epsilon, budget_delta, config.accountant))
    history: History = ledger.history(fingerprint)
    after = epsilon([*history, planned], delta=budget_delta, accountant=config.accountant)
    if after > budget_epsilon:
        spent = epsilon(history, delta=budget_delta, accountant=config.accountant)
        raise BudgetExhausted(
            f"site {site} declined round {server_round}: it has spent epsilon {spent:.3f} of "
            f"its budget {budget_epsilon:g} (delta {budget_delta:g}) and this round would "
            f"bring it to {after:.3f}")
    sigma, rate, steps = planned
    ledger.charge(Charge(fingerprint=fingerprint, site=site, run_id=run_id,
                         round=server_round, mechanism=MECHANISM_DPSGD, noise_multiplier=sigma,
                         sample_rate=rate, steps=steps, clip_norm=config.clip_norm,
                         delta=budget_delta))
    return after
