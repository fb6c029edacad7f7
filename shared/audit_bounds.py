"""The one-run audit's lower bound on epsilon (Steinke, Nasr and Jagielski, "Privacy Auditing
with One (1) Training Run", NeurIPS 2023), in pure Python.

``m`` canaries are each included in training by an independent fair coin. An auditor
guesses "in" or "out" for ``r`` of them (abstaining on the rest) and gets ``v`` right. If
the training were (epsilon, delta)-DP, ``v`` would be stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)) up to a delta term (the paper's Theorem 5.2 and its
Algorithm 2, whose reference code this follows); ``p_value`` is the probability of ``v``
or more correct guesses under that hypothesis. ``epsilon_lower_bound`` is the largest
epsilon that the observed ``v`` rejects at the given confidence: the training is not
(epsilon, delta)-DP for any smaller epsilon, unless a 1-in-20 (at 95%) event happened.

No scipy: the binomial terms are computed in log space with ``math.lgamma``.
"""

from __future__ import annotations

import math

from fedrnn.shared.errors import ConfigError

SEARCH_STEPS = 40  # bisection steps: epsilon to within 2^-40 of the bracket's width


def _log_pmf(k: int, n: int, q: float) -> float:
    """log P[Binomial(n, q) = k] for 0 < q < 1."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(q) + (n - k) * math.log1p(-q))


def _pmf(k: int, n: int, q: float) -> float:
    if q >= 1.0:
        return 1.0 if k == n else 0.0
    return math.exp(_log_pmf(k, n, q))


def _tail(v: int, n: int, q: float) -> float:
    """P[Binomial(n, q) >= v]."""
    if v <= 0:
        return 1.0
    return min(1.0, sum(_pmf(k, n, q) for k in range(v, n + 1)))


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] if training were (epsilon, delta)-DP,
    with ``m`` canaries each included with probability 1/2 (Steinke et al., Algorithm 2)."""
    _check(m, r, v, delta)
    if epsilon < 0:
        raise ConfigError("epsilon must be >= 0")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0  # eps-DP guess accuracy
    beta = _tail(v, r, q)
    # The delta term: the largest average, over i, of P[v - i <= Binomial(r, q) < v] / i.
    alpha, mass = 0.0, 0.0
    for i in range(1, v + 1):
        mass += _pmf(v - i, r, q)
        alpha = max(alpha, mass / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float = 0.0,
                        confidence: float = 0.95) -> float:
    """The largest epsilon with ``p_value`` below ``1 - confidence`` (0 if none): with this
    confidence, the training was not (epsilon', delta)-DP for any epsilon' below it."""
    _check(m, r, v, delta)
    if not 0 < confidence < 1:
        raise ConfigError("confidence must be in (0, 1)")
    alpha = 1.0 - confidence

    def rejects(eps: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < alpha

    if not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):  # the p-value grows with epsilon: bracket, then bisect
        low, high = high, 2 * high
        if high > 1e4:
            return math.inf  # only with delta 0 and guesses no DP mechanism could make
    for _ in range(SEARCH_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if rejects(mid) else (low, mid)
    return low


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not 0 <= delta <= 1:
        raise ConfigError("delta must be in [0, 1]")
