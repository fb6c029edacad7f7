"""The one-run audit's bound (Steinke, Nasr and Jagielski 2023) against values computed
independently: closed forms for delta 0, an exact rational tail for delta > 0."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from fedrnn.shared.audit_bounds import epsilon_lower_bound, p_value
from fedrnn.shared.errors import ConfigError


@pytest.mark.parametrize(("r", "expected"), [(100, 3.49), (1000, 5.81)])
def test_all_guesses_correct_at_delta_zero_gives_the_papers_values(r, expected):
    assert epsilon_lower_bound(m=r, r=r, v=r) == pytest.approx(expected, abs=0.005)


def test_all_correct_matches_the_closed_form():
    # P[Binomial(r, q) >= r] = q^r = 0.05  =>  eps = log(q / (1 - q)), q = 0.05^(1/r)
    for r in (5, 20, 300):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(m=1000, r=r, v=r) == pytest.approx(math.log(q / (1 - q)),
                                                                      abs=1e-6)


def _reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's Algorithm 2 computed with exact binomial coefficients (math.comb) and
    rationals for everything but q: independent of the module's log-space terms."""
    q = Fraction(1 / (1 + math.exp(-eps)))

    def pmf(k: int) -> Fraction:
        return math.comb(r, k) * q ** k * (1 - q) ** (r - k)

    beta = sum((pmf(k) for k in range(v, r + 1)), Fraction(0))
    alpha, mass = Fraction(0), Fraction(0)
    for i in range(1, v + 1):
        mass += pmf(v - i)
        alpha = max(alpha, mass / i)
    return float(min(Fraction(1), beta + alpha * Fraction(delta) * 2 * m))


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (100, 40, 35, 1.0, 1e-3), (1000, 60, 50, 1.5, 1e-5), (500, 30, 30, 2.0, 1e-4),
    (200, 50, 20, 0.5, 0.01),
])
def test_p_value_with_delta_matches_an_exact_reference(m, r, v, eps, delta):
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(
        _reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_the_bound_is_the_largest_epsilon_the_observation_rejects():
    m, r, v, delta = 1000, 100, 90, 1e-5
    eps = epsilon_lower_bound(m=m, r=r, v=v, delta=delta)
    assert eps > 0
    assert _reference_p_value(m, r, v, eps - 1e-6, delta) < 0.05
    assert _reference_p_value(m, r, v, eps + 1e-4, delta) >= 0.05


def test_delta_only_lowers_the_bound_and_chance_gives_none():
    assert epsilon_lower_bound(m=1000, r=100, v=100, delta=1e-3) < \
        epsilon_lower_bound(m=1000, r=100, v=100)
    assert epsilon_lower_bound(m=1000, r=1000, v=500) == 0.0  # a coin's accuracy
    assert epsilon_lower_bound(m=1000, r=100, v=95, confidence=0.99) < \
        epsilon_lower_bound(m=1000, r=100, v=95, confidence=0.95)


@pytest.mark.parametrize("args", [dict(m=10, r=20, v=5), dict(m=10, r=5, v=6),
                                  dict(m=10, r=5, v=5, delta=2.0)])
def test_impossible_counts_are_refused(args):
    with pytest.raises(ConfigError):
        epsilon_lower_bound(**args)
