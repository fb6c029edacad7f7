"""A site's own privacy policy, and its check of what a server proposes.

The server's run config is a proposal. A deployed site's budget, delta, accountant and
train/evaluation split are its own (``fedrnn client`` flags, handed to the ClientApp as
node config); the server can ask the site to lose less, never more. A proposal the
policy does not allow is declined with the reason code ``policy``, and its details stay
in the site's log.

A simulated site has no policy of its own: the researcher running the simulation is every
party at once, and the run's config is the sites' policy (docs/threat-model.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedrnn.client.ledger import Budget
from fedrnn.shared.config import RunConfig

OFFERED_ACCOUNTANTS = ("rdp", "prv")  # GDP's CLT approximation can under-count small runs


class Declined(Exception):
    """The site refuses this message; ``code`` goes to the server, the text to the log."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


@dataclass(frozen=True)
class SitePolicy:
    """What a deployed site allows, whatever a server asks."""

    budget_epsilon: float
    budget_delta: float
    accountant: str = "rdp"
    eval_fraction: float = 0.2
    evaluate: bool = True
    # DP-SGD's sample rate 1/ceil(N/B) and its steps are public: a batch size of 1 would
    # tell the number of training records exactly; the site never goes below this
    min_batch_size: int = 16

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """The policy ``fedrnn client`` put in the SuperNode's node config. A site started
        without a budget (by hand, with Flower's own CLI) has none and trains nothing."""
        missing = [k for k in ("budget-epsilon", "budget-delta") if k not in node_config]
        if missing:
            raise ValueError(f"the site has no {' and '.join(missing)} of its own: start it "
                             "with fedrnn client --budget-epsilon E --budget-delta D")
        policy = cls(budget_epsilon=float(node_config["budget-epsilon"]),
                     budget_delta=float(node_config["budget-delta"]),
                     accountant=str(node_config.get("accountant", "rdp")),
                     eval_fraction=float(node_config.get("eval-fraction", 0.2)),
                     evaluate=bool(node_config.get("evaluate", True)),
                     min_batch_size=int(node_config.get("min-batch-size", 16)))
        if not (0 < policy.budget_epsilon < math.inf and 0 < policy.budget_delta < 1
                and policy.accountant in OFFERED_ACCOUNTANTS
                and 0 < policy.eval_fraction < 1 and policy.min_batch_size >= 1):
            raise ValueError(f"the site's own policy is not valid: {policy}")
        return policy

    @property
    def budget(self) -> Budget:
        return Budget(self.budget_epsilon, self.budget_delta, self.accountant)


def check_proposal(proposal: RunConfig, policy: SitePolicy) -> RunConfig:
    """The run config this site will follow: the server's proposal checked against the
    site's policy, with the site's own privacy terms in place of the server's.

    Declines (``Declined``, code ``DECLINED_POLICY``) a run without record-level DP (the
    site's update would leave it raw), an epsilon that is not a finite positive number,
    and an accountant the site does not offer. The epsilon the server asks for is kept
    only where it is below the site's budget: a run may spend less, never more.
    """
    from fedrnn.shared import protocol as P

    problems = []
    if not proposal.mechanism.sites_run_dpsgd:
        problems.append("it trains only with record-level DP (the server asked for "
                        f"{proposal.mechanism.describe()})")
    if not 0 < proposal.epsilon < math.inf:
        problems.append(f"epsilon {proposal.epsilon} is not a finite positive number")
    if proposal.accountant not in OFFERED_ACCOUNTANTS:
        problems.append(f"accountant {proposal.accountant!r} is not one it offers "
                        f"({', '.join(OFFERED_ACCOUNTANTS)})")
    if problems:
        raise Declined(P.DECLINED_POLICY, "declined the run: " + "; ".join(problems))
    return proposal.replace(
        epsilon=min(proposal.epsilon, policy.budget_epsilon), delta=policy.budget_delta,
        accountant=policy.accountant, budget_epsilon=policy.budget_epsilon,
        budget_delta=policy.budget_delta, eval_fraction=policy.eval_fraction,
        batch_size=max(proposal.batch_size, policy.min_batch_size))
