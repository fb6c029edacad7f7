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
import warnings

import numpy as np

# Opacus is imported by the functions that compute with it: this module's types and
# sampling arithmetic are used by processes that never account (a simulation's driver),
# and importing Opacus costs them 1.4 s of CPU.

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
    """Poisson sampling rate of DP-SGD, as Opacus derives it from a DataLoader."""
    return 1.0 / math.ceil(n_records / batch_size)


def steps_per_round(n_records: int, batch_size: int, local_epochs: int) -> int:
    return local_epochs * math.ceil(n_records / batch_size)


def epsilon(history: History, *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after every release in ``history`` (0 for none)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if accountant == "rdp":
        # Opacus's RDPAccountant.get_privacy_spent, with each mechanism's one-step RDP
        # curve cached: computing it (156 orders, fractional ones by series) took 0.13 s,
        # more than a client's whole DP-SGD round, and every charge needs it.
        rdp = sum(steps * _rdp_per_step(sigma, q) for sigma, q, steps in merge_history(history))
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = merge_history(history)
    with _quiet(accountant):
        return float(acc.get_epsilon(delta=delta, **_options(accountant)))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                   orders=RDP_ORDERS)
    rdp.flags.writeable = False  # shared by every caller of the cache
    return rdp


def merge_history(history: History) -> History:
    """Releases with the same (noise multiplier, sample rate) as one entry of summed steps.

    The same mechanism composed n1 then n2 times is that mechanism composed n1 + n2 times,
    for every accountant here; a site that runs the same DP-SGD every round keeps a
    one-entry history, so its epsilon costs the same in round 1000 as in round 1 (computed
    entry by entry it cost about 0.13 s more per round).
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
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet(accountant):
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.01,
                                          **_options(accountant)))
