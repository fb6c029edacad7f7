"""The one-shot estimate's mathematics against Google's dp-accounting (an independent
implementation: the privacy loss distribution of the Gaussian mechanism)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant

from fedrnn.shared.one_shot import gaussian_delta, gaussian_epsilon, one_shot_estimate


def _pld_epsilon(mu: float, delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-5)
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier=1 / mu))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 5.0])
def test_the_gaussian_epsilon_matches_dp_accounting(mu):
    assert gaussian_epsilon(mu, delta=1e-5) == pytest.approx(_pld_epsilon(mu, 1e-5), abs=1e-6)


def test_known_values_and_edges():
    # mu = 1 at delta 1e-5: 4.3772 (dp-accounting's PLD gives 4.377178)
    assert gaussian_epsilon(1.0, delta=1e-5) == pytest.approx(4.377178, abs=1e-5)
    # the relation inverted: the epsilon found has exactly the asked delta
    assert gaussian_delta(gaussian_epsilon(3.0, delta=1e-6), 3.0) == pytest.approx(1e-6,
                                                                                  rel=1e-6)
    assert gaussian_epsilon(0.0, delta=1e-5) == 0.0
    assert gaussian_epsilon(1e-3, delta=0.5) == 0.0  # delta(0) already below 0.5
    assert gaussian_epsilon(math.inf, delta=1e-5) == math.inf
    assert gaussian_epsilon(40.0, delta=1e-5) > gaussian_epsilon(20.0, delta=1e-5) > 100
    for bad in ({"mu": -1.0, "delta": 1e-5}, {"mu": 1.0, "delta": 0.0},
                {"mu": math.nan, "delta": 1e-5}):
        with pytest.raises(ValueError):
            gaussian_epsilon(bad["mu"], delta=bad["delta"])


def test_the_estimate_is_the_epsilon_of_the_gap_in_unseen_stds():
    rng = np.random.default_rng(0)
    unseen = rng.normal(0.0, 0.05, 5000)
    inserted = unseen[:10] + 0.1  # shifted by two unseen stds
    estimate = one_shot_estimate(inserted, unseen, delta=1e-5)
    assert estimate.unseen.count == 5000 and estimate.inserted.count == 10
    assert estimate.mu == pytest.approx(abs(np.mean(inserted) - np.mean(unseen))
                                        / np.std(unseen, ddof=1))
    assert estimate.epsilon == gaussian_epsilon(estimate.mu, delta=1e-5)
    # ten inserted values: their mean is known to std / sqrt(10), in unseen stds
    assert estimate.mu_standard_error == pytest.approx(
        math.sqrt(np.var(inserted, ddof=1) / 10 + np.var(unseen, ddof=1) / 5000)
        / np.std(unseen, ddof=1))
    low, high = estimate.epsilon_interval()
    assert low < estimate.epsilon < high
    # nothing inserted: the two samples alike, a small estimate
    assert one_shot_estimate(rng.normal(0, 0.05, 10), unseen, delta=1e-5).epsilon < 2
    with pytest.raises(ValueError):
        one_shot_estimate([0.1], unseen, delta=1e-5)
