"""Privacy accounting: the mathematics, kept apart from the DP-SGD mechanics.

A site's spend is its *history*: the list of ``(noise_multiplier, sample_rate, steps)``
of every DP-SGD release it made, the format of Opacus's accountants. Storing the history,
not an epsilon, means any accountant can recompute the spend later. The functions here
wrap Opacus's accountants (``rdp``, ``prv``, ``gdp``) and never re-derive them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings

import numpy as np

# Opacus is imported by the functions that compute with it: this module's types and
# sampling arithmetic are used by processes that never account (a simulation's driver),
# and importing Opacus would cost them CPU while the workers need it.

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)

# Opacus's RDP orders stop at 63; small spends (few steps, much noise) are tightest at
# larger orders, where Opacus warns and over-reports. These are dp-accounting's orders.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def _options(accountant: str) -> dict:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


@contextlib.contextmanager
def _quiet(accountant: str):
    """Opacus's PRV accountant bounds its domain with an internal RDP pass at extreme noise
    levels, which warns (log of 0, largest order) without affecting the PRV result."""
    if accountant != "prv":
        yield
        return
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        yield


def sample_rate(n_records: int, batch_size: int) -> float:
    """Poisson sampling rate of DP-SGD: ``1 / ceil(N / batch_size)``.

    The single source of truth for both what a site plans and charges and what its
    training runs (``fedrnn.client.training.poisson_loader`` samples at this rate, and Opacus's
    accountant records it as ``1 / len(loader)``, the same float).
    """
    return 1.0 / _batches(n_records, batch_size)


def steps_per_round(n_records: int, batch_size: int, local_epochs: int) -> int:
    """DP-SGD steps of one round: ``local_epochs * ceil(N / batch_size)``.

    The single source of truth for both what a site plans and charges and what its
    training runs (``fedrnn.client.training.poisson_loader`` yields ``ceil(N / batch_size)``
    batches a pass, not Opacus's ``int(1 / q)``, which floating point makes one fewer
    for 141 batch counts below 2,000: 93, 99, 105, ...).
    """
    return local_epochs * _batches(n_records, batch_size)


def _batches(n_records: int, batch_size: int) -> int:
    if n_records < 1 or batch_size < 1:
        raise ValueError(f"need at least one record and a batch size of at least 1, got "
                         f"{n_records} records, batch size {batch_size}")
    return -(-n_records // batch_size)  # ceil in integers: no float division of large N


def epsilon(history: History, *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after every release in ``history`` (0 for none)."""
    if not history:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(merge_history(history), delta)
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = merge_history(history)
    with _quiet(accountant):
        return float(acc.get_epsilon(delta=delta, **_options(accountant)))


# --- RDP: Opacus's numbers, fewer of them ---------------------------------------------------
# Opacus's RDPAccountant computes the RDP curve at every order and converts it to epsilon
# at the best one. Nearly all of a curve's cost is the fractional orders below 2.3, whose
# series converges slowly, and a calibration evaluates many curves (paid by every
# simulation worker in round 1; docs/benchmarks.md has the figures).
# Most orders cannot be the best one, and two facts say which without computing them:
#   - epsilon at order a is RDP(a) + c(a), c being the conversion's part without RDP
#     (Opacus's ``get_privacy_spent``), and RDP(a) is at least RDP at any lower order
#     (a Renyi divergence never decreases with its order; at least 0 below 2);
#   - so once the integer orders (a closed form, cheap) give an epsilon, a
#     fractional order whose lower bound is no better is never computed, and gets RDP
#     +inf in the curve handed to Opacus's conversion, which then picks the same order
#     and returns the same float as over the full curve.
# Tested equal (==) to Opacus's accountant and to its noise calibration.

_ORDERS = np.array(RDP_ORDERS, dtype=float)
_INTEGER = np.floor(_ORDERS) == _ORDERS
# the integer order at or below each order (orders below 2 have none: RDP >= 0 there)
_FLOOR_INDEX = np.array([RDP_ORDERS.index(math.floor(a)) if a >= 2 else -1
                         for a in RDP_ORDERS])
# Opacus's fractional-order series drops terms below e^-30 of the sum: relative errors
# near 1e-13. Bounds are loosened far beyond that, so rounding never skips an order that
# could be the best.
_SLACK = 1e-6


class _RdpCurves:
    """One-step RDP curves per (noise multiplier, sample rate), computed order by order as
    asked for (NaN where not yet), the most recent ``size`` of them kept. Callers get a
    copy. Locked: Flower may run a process's clients on several threads."""

    def __init__(self, size: int = 512) -> None:
        self.size, self.curves, self.lock = size, {}, threading.Lock()

    def get(self, sigma: float, q: float, wanted: np.ndarray) -> np.ndarray:
        from opacus.accountants.analysis import rdp as rdp_analysis

        key = (float(sigma), float(q))
        with self.lock:
            curve = self.curves.pop(key, None)
            if curve is None:
                curve = np.full(len(RDP_ORDERS), np.nan)
            missing = wanted & np.isnan(curve)
            if missing.any():
                curve[missing] = rdp_analysis.compute_rdp(
                    q=q, noise_multiplier=sigma, steps=1, orders=_ORDERS[missing].tolist())
            self.curves[key] = curve  # most recent last
            if len(self.curves) > self.size:
                del self.curves[next(iter(self.curves))]
            return curve.copy()


_CURVES = _RdpCurves()


def _composed(history: History, wanted: np.ndarray) -> np.ndarray:
    """RDP of the whole history at the ``wanted`` orders (NaN elsewhere): as Opacus's
    ``compute_rdp``, steps times the one-step curve, summed over the releases."""
    return sum(steps * _CURVES.get(sigma, q, wanted) for sigma, q, steps in history)


def _rdp_epsilon(history: History, delta: float, cap: float = math.inf) -> float:
    """Opacus's RDP epsilon of ``history`` (merged) at ``delta``, exactly, if it is at most
    ``cap``; otherwise some value above ``cap`` (what a calibration's comparisons need)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    # c(a): the conversion with RDP 0, in Opacus's order of operations, so that adding
    # any RDP >= 0 (rounding is monotone) can only raise it
    without_rdp = (0.0 - (np.log(delta) + np.log(_ORDERS)) / (_ORDERS - 1)
                   + np.log((_ORDERS - 1) / _ORDERS))
    rdp = _composed(history, _INTEGER)
    best = min(np.nanmin(rdp + without_rdp), cap)
    below = np.where(_FLOOR_INDEX >= 0, rdp[_FLOOR_INDEX], 0.0) * (1 - _SLACK)
    bound = (below - _SLACK) + without_rdp
    wanted = ~_INTEGER & ~(bound > best)  # a NaN bound is computed
    if wanted.any():
        rdp = np.where(wanted, _composed(history, wanted), rdp)
    rdp = np.where(_INTEGER | wanted, rdp, np.inf)
    # Skipped orders (+inf) are never the best one, so without a cap Opacus's warning when
    # the best order is the list's first or last comes exactly when it would over the
    # full curve. Capped (a calibration's search steps above the target), it may not.
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def merge_history(history: History) -> History:
    """Releases with the same (noise multiplier, sample rate) as one entry of summed steps.

    The same mechanism composed n1 then n2 times is that mechanism composed n1 + n2 times,
    for every accountant here; a site that runs the same DP-SGD every round keeps a
    one-entry history, so its epsilon costs the same in round 1000 as in round 1 (computed
    entry by entry, each round's charge would cost more than the last).
    """
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        key = (float(s), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items()]


@functools.lru_cache(maxsize=1024)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest noise multiplier whose ``steps`` releases at ``sample_rate`` stay within
    ``(target_epsilon, delta)`` (Opacus's search, tolerance 0.01 in epsilon)."""
    if accountant == "rdp":
        return _calibrate_rdp(target_epsilon, delta, sample_rate, steps)
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet(accountant):
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.01,
                                          **_options(accountant)))


def _calibrate_rdp(target: float, delta: float, q: float, steps: int) -> float:
    """Opacus's ``get_noise_multiplier`` (double, then bisect until within 0.01 below the
    target), step for step, with its epsilons from ``_rdp_epsilon``: the same comparisons,
    so the same noise multiplier, about 13 times sooner (see above). Its search steps
    above the target skip orders, so they do not repeat Opacus's warnings about them."""
    from opacus.accountants.utils import MAX_SIGMA

    def eps(sigma: float) -> float:
        return _rdp_epsilon([(sigma, q, steps)], delta, cap=target)

    eps_high, sigma_low, sigma_high = math.inf, 0, 10
    while eps_high > target:
        sigma_high = 2 * sigma_high
        eps_high = eps(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target - eps_high > 0.01:
        sigma = (sigma_low + sigma_high) / 2
        value = eps(sigma)
        if value < target:
            sigma_high, eps_high = sigma, value
        else:
            sigma_low = sigma
    return float(sigma_high)


def calibrate_after(history: History, *, target_epsilon: float, delta: float,
                    sample_rate: float, steps: int, accountant: str = "rdp") -> float | None:
    """Smallest noise multiplier (within 0.01 in epsilon, as ``calibrate_noise``) whose
    ``steps`` releases at ``sample_rate``, after ``history``, stay within ``target_epsilon``;
    None when ``history`` alone leaves no room. Without a history: ``calibrate_noise``."""
    if not history:
        try:
            return calibrate_noise(target_epsilon=target_epsilon, delta=delta,
                                   sample_rate=sample_rate, steps=steps, accountant=accountant)
        except ValueError:  # Opacus: "The privacy budget is too low."
            return None
    from opacus.accountants.utils import MAX_SIGMA

    def eps(sigma: float) -> float:
        return epsilon([*history, (sigma, sample_rate, steps)], delta=delta,
                       accountant=accountant)

    if epsilon(history, delta=delta, accountant=accountant) >= target_epsilon:
        return None
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            return None
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if eps(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return float(high)
