"""The mathematics of the one-shot empirical privacy estimate (Andrew et al., "One-shot
Empirical Privacy Estimation for Federated Learning", 2023): pure functions, no I/O.

Canary clients send a fixed random direction each round they are sampled; after the run,
the cosine between each canary's direction and the model's total change is large for
canaries that were inserted and near zero for directions that never were. Fitting a
Gaussian to each group gives two normal distributions of common spread ``sigma``; the
estimate is the epsilon, at the run's delta, of telling them apart: the Gaussian
mechanism's epsilon for ``mu = |mean_inserted - mean_unseen| / sigma``.

The Gaussian mechanism of sensitivity-to-noise ratio ``mu`` satisfies (epsilon, delta)-DP
exactly when (Balle and Wang, 2018, analytic Gaussian mechanism)

    delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon * Phi(-epsilon/mu - mu/2),

which falls as epsilon grows; ``gaussian_epsilon`` inverts it by bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.special import log_ndtr, ndtr

# bisection to this absolute precision in epsilon
TOLERANCE = 1e-10


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The smallest delta for which the Gaussian mechanism of ratio ``mu`` (sensitivity over
    noise std) is (``epsilon``, delta)-DP."""
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    first = float(ndtr(-epsilon / mu + mu / 2))
    # e^eps * Phi(x) in log space: e^eps overflows long before the product does
    second = math.exp(epsilon + float(log_ndtr(-epsilon / mu - mu / 2)))
    return max(first - second, 0.0)


def gaussian_epsilon(mu: float, *, delta: float) -> float:
    """The epsilon at ``delta`` of the Gaussian mechanism of ratio ``mu`` (0 for mu = 0:
    two identical distributions; ``inf`` for mu = inf)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isnan(mu) or mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, mu) > delta:
        low, high = high, high * 2
    while high - low > TOLERANCE * max(1.0, high):
        middle = (low + high) / 2
        if gaussian_delta(middle, mu) > delta:
            low = middle
        else:
            high = middle
    return high


@dataclass(frozen=True)
class Fit:
    """A normal distribution fitted to a sample: its mean, standard deviation and size."""

    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Fit:
        if len(values) < 2:
            raise ValueError("a fit needs at least two values")
        return cls(statistics.fmean(values), statistics.stdev(values), len(values))

    def to_json(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "count": self.count}


@dataclass(frozen=True)
class Estimate:
    """The one-shot estimate: the two fits, the ratio mu and its epsilon at ``delta``."""

    inserted: Fit
    unseen: Fit
    mu: float
    epsilon: float
    delta: float
    mu_standard_error: float  # of the mean gap, in unseen stds: mostly the few canaries'

    def epsilon_interval(self, z: float = 1.96) -> tuple[float, float]:
        """The estimate's epsilon at mu -/+ ``z`` standard errors (95% by default): with
        ten canaries, mu is known to about a third of a unit."""
        low = max(self.mu - z * self.mu_standard_error, 0.0)
        return (gaussian_epsilon(low, delta=self.delta),
                gaussian_epsilon(self.mu + z * self.mu_standard_error, delta=self.delta))


def one_shot_estimate(inserted: Sequence[float], unseen: Sequence[float], *,
                      delta: float) -> Estimate:
    """Epsilon of telling N(mean_unseen, sigma) from N(mean_inserted, sigma), where sigma is
    the unseen cosines' standard deviation.

    The unseen directions are the null distribution, and many of them (hundreds) can be
    drawn at no cost, so their spread is the well-estimated one; the inserted cosines are
    as many as there are canary clients (often ten). Under the Gaussian mechanism the two
    spreads are the same: an inserted canary's cosine is an unseen one shifted by its
    contribution.
    """
    fit_in, fit_out = Fit.of(inserted), Fit.of(unseen)
    gap = abs(fit_in.mean - fit_out.mean)
    if fit_out.std > 0:
        mu = gap / fit_out.std
        error = math.sqrt(fit_in.std**2 / fit_in.count
                          + fit_out.std**2 / fit_out.count) / fit_out.std
    else:
        mu, error = (math.inf if gap > 0 else 0.0), 0.0
    return Estimate(fit_in, fit_out, mu, gaussian_epsilon(mu, delta=delta), delta, error)
