"""One round at one site, without Flower: check, charge, train or evaluate, reply.

``fedrnn.client.app`` calls these from Flower's handlers; the simulation benchmark calls them in a
plain loop. Two kinds of site:

- a **deployed** site (``Site.policy`` set) follows its own policy (``client.policy``):
  the server's config is a proposal, its noise is calibrated to the site's own budget,
  evaluation is a DP release charged like training, and no exact statistic of its records
  leaves it (docs/threat-model.md lists what does);
- a **simulated** site takes the run's config as its policy (the researcher is every
  party), reports exact evaluation metrics and its training loss, and draws its
  randomness from the run's seed, so a seeded run repeats bit for bit.

Both account per record in a ledger (``fedrnn.client.spending``): records whose budget is spent
retire, in a simulation with ``--ledger-dir`` as in a deployment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from fedrnn.client.evaluation import SENSITIVITY, per_record, release
from fedrnn.client.ledger import MECHANISM_DPSGD, MECHANISM_GAUSSIAN_SUM, Budget, Ledger, Release
from fedrnn.client.policy import Declined, SitePolicy
from fedrnn.client.spending import Planner, charge, noise_for
from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import ClientData, client_data
from fedrnn.shared.data.canaries import is_planted
from fedrnn.shared.models import SequenceModel
from fedrnn.shared.privacy import sample_rate, steps_per_round
from fedrnn.shared.randomness import SiteRandomness

log = logging.getLogger("fedrnn")

SIMULATION_LEDGER = "sites.sqlite"  # one ledger for every simulated site: see client.ledger


@dataclass
class Site:
    """Where a round runs: whose records, which ledger, under whose policy."""

    name: str
    data: ClientData
    ledger: Path
    randomness: SiteRandomness
    policy: SitePolicy | None = None  # None: a simulated site

    @property
    def deployed(self) -> bool:
        return self.policy is not None

    def budget(self, config: RunConfig) -> Budget:
        if self.policy is not None:
            return self.policy.budget
        epsilon, delta = config.site_budget
        return Budget(epsilon, delta, config.accountant)


def simulated_site(config: RunConfig, partition: int, server_round: int) -> Site:
    """The simulated site serving ``partition`` in ``server_round``: the partition's
    records, the run's one ledger for every simulated site, and randomness keyed from the
    run's seed, the partition and the round (the same draws on every worker)."""
    data = client_data(config, partition)
    return Site(name=data.name, data=data, ledger=config.ledger_root / SIMULATION_LEDGER,
                randomness=SiteRandomness.from_seed(config.seed, partition, server_round))


def train_round(site: Site, config: RunConfig, server_round: int,
                model: SequenceModel) -> dict[str, float]:
    """Train ``model`` in place for one round at ``site``; returns the reply's metrics.

    With record-level DP the release is charged first, for the records whose budget
    allows it, and the update is released only if DP-SGD ran exactly what was charged.
    """
    from fedrnn.client.training import train as train_local

    if not site.data.train_keys:
        raise Declined(P.FAILED_DATA, f"site {site.name} holds no training records")
    if not config.mechanism.sites_run_dpsgd:  # a simulation's baseline or user-level DP
        if site.deployed:
            raise Declined(P.DECLINED_POLICY, "record-level DP is required")
        result = train_local(model, site.data.train, config, noise_multiplier=None,
                             randomness=site.randomness)
        return _train_metrics(site, config, site.data.train_keys, result, math.inf)
    if not site.deployed and not config.calibrate_noise and config.noise_multiplier == 0:
        # clipping without noise (a simulation's --epsilon inf): no DP release to account
        result = train_local(model, site.data.train, config, noise_multiplier=0.0,
                             randomness=site.randomness)
        return _train_metrics(site, config, site.data.train_keys, result, math.inf)
    with Ledger(site.ledger, own=site.deployed) as ledger:
        charged = charge(
            ledger, keys=site.data.train_keys, budget=site.budget(config),
            plan=_training_planner(site, config, server_round),
            release=_release(site, config, server_round, "train", MECHANISM_DPSGD,
                             config.clip_norm))
    if charged.retired:
        log.info("site %s: %d training record(s) retired (budget spent), %d train",
                 site.name, charged.retired, len(charged.keys))
    records = site.data.active(set(charged.keys), "train")
    # Only now, with the release committed to the ledger, does training on the records start.
    result = train_local(model, records, config, noise_multiplier=charged.entry[0],
                         randomness=site.randomness)
    if result.history != [charged.entry]:
        # Never release an update whose mechanism differs from what was charged.
        raise RuntimeError(f"DP-SGD ran {result.history}, but {charged.entry} was charged")
    return _train_metrics(site, config, charged.keys, result, charged.epsilon_max,
                          charged.entry)


def evaluate_round(site: Site, config: RunConfig, server_round: int,
                   model: SequenceModel) -> dict[str, float]:
    """The reply's metrics of ``model`` on ``site``'s evaluation records: exact for a
    simulated site, a charged DP release for a deployed one."""
    from fedrnn.client.training import evaluate as evaluate_exact

    if not site.deployed:
        return evaluate_exact(model, site.data.eval, config)
    assert site.policy is not None
    if not site.policy.evaluate:
        raise Declined(P.DECLINED_POLICY, "evaluation is off at this site (--no-evaluate)")
    if not site.data.eval_keys:
        raise Declined(P.FAILED_DATA, f"site {site.name} holds no evaluation records")
    budget = site.budget(config)

    def plan(n: int, reference: list) -> tuple[float, float, int] | None:
        sigma = noise_for(target_epsilon=config.epsilon, budget=budget, reference=reference,
                          sample_rate=1.0, steps=1, rounds=config.rounds,
                          rounds_left=_rounds_left(config, server_round))
        return None if sigma is None else (sigma, 1.0, 1)

    with Ledger(site.ledger, own=site.deployed) as ledger:
        charged = charge(ledger, keys=site.data.eval_keys, budget=budget, plan=plan,
                         release=_release(site, config, server_round, "evaluate",
                                          MECHANISM_GAUSSIAN_SUM, SENSITIVITY))
    losses, scores = per_record(model, site.data.active(set(charged.keys), "eval"), config)
    return release(losses, scores, config, sigma=charged.entry[0],
                   normal=lambda n: site.randomness.gaussian(
                       (n,), std=1.0, dtype=torch.float64).numpy())


def _training_planner(site: Site, config: RunConfig, server_round: int) -> Planner:
    budget = site.budget(config)

    def plan(n: int, reference: list) -> tuple[float, float, int] | None:
        rate = sample_rate(n, config.batch_size)
        steps = steps_per_round(n, config.batch_size, config.local_epochs)
        if not site.deployed and not config.calibrate_noise:  # the researcher's own noise
            return (config.noise_multiplier, rate, steps)
        # A deployed site calibrates to its own budget; a noise multiplier the server
        # names is only a floor: it can ask for more noise, never for less.
        sigma = noise_for(target_epsilon=config.epsilon, budget=budget, reference=reference,
                          sample_rate=rate, steps=steps, rounds=config.rounds,
                          rounds_left=_rounds_left(config, server_round),
                          floor=config.noise_multiplier if site.deployed else 0.0)
        return None if sigma is None else (sigma, rate, steps)

    return plan


def _rounds_left(config: RunConfig, server_round: int) -> int:
    return max(1, config.rounds - server_round + 1)


def _release(site: Site, config: RunConfig, server_round: int, purpose: str, mechanism: str,
             clip_norm: float) -> Release:
    """The release's description; ``charge`` fills in its noise, rate and steps."""
    return Release(site=site.name, run_id=config.run_id, round=server_round, purpose=purpose,
                   mechanism=mechanism, noise_multiplier=0.0, sample_rate=1.0, steps=1,
                   clip_norm=clip_norm, delta=0.0)


def _train_metrics(site: Site, config: RunConfig, keys: Collection[str], result,  # noqa: ANN001
                   spent: float, entry: tuple[float, float, int] | None = None,
                   ) -> dict[str, float]:
    # An audited simulation's canaries are counted nowhere the server sees: how many of
    # them trained would tell the server the sum of their secret draw.
    n_records = sum(1 for key in keys if not is_planted(key))
    metrics = {
        P.UNIT_WEIGHT: 1,
        P.STEPS: result.steps,
        P.NOISE_MULTIPLIER: entry[0] if entry else 0.0,
        P.EPSILON: spent,
    }
    if site.deployed and entry is not None:
        # The FedAvg weight: batch size / sample rate, a function of the release's own
        # public parameters, not the exact number of records trained on.
        metrics[P.NUM_EXAMPLES] = float(round(config.batch_size / entry[1]))
    else:
        metrics[P.NUM_EXAMPLES] = n_records
        metrics[P.TRAIN_LOSS] = result.loss  # exact: the researcher holds the records
    return metrics

