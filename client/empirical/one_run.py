"""The record-level one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

Every canary is scored by its loss under the final model (black box: lower loss, more
likely trained on). The auditor guesses "in" for the ``k+`` lowest losses and "out" for
the ``k-`` highest, abstaining on the rest, and counts its correct guesses against the
secret draw. ``shared.audit_bounds`` turns (canaries, guesses, correct, delta) into a
lower bound on epsilon.

Choosing ``(k+, k-)`` after seeing the scores would overstate the bound, so the choices are
fixed in advance (``GUESS_PLANS``) and every one is tried at confidence
``1 - (1 - CONFIDENCE) / len(plans)`` (Bonferroni): the largest of their bounds holds at
``CONFIDENCE`` overall. Every plan tried is reported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedrnn.client.empirical.scores import load_audited, record_losses
from fedrnn.client.empirical.sections import register_section
from fedrnn.shared.audit_bounds import epsilon_lower_bound
from fedrnn.shared.data import canary_tensors
from fedrnn.shared.run_records import json_value

CONFIDENCE = 0.95
# (share guessed "in", share guessed "out") of the canaries, fixed before any run was
# audited. Guessing only "in" on the lowest losses suits canaries of which the model
# memorised some; balanced guesses suit a model that learnt every included canary a little.
GUESS_PLANS: tuple[tuple[float, float], ...] = (
    (0.02, 0.0), (0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.05, 0.05), (0.1, 0.1), (0.25, 0.25),
)


def guesses(losses: np.ndarray, included: np.ndarray, *, k_in: int, k_out: int
            ) -> tuple[int, int]:
    """(guesses, correct) guessing "in" for the ``k_in`` lowest losses and "out" for the
    ``k_out`` highest (ties broken by position, a choice made without the draw)."""
    order = np.argsort(losses, kind="stable")
    k_in = min(k_in, len(losses))
    k_out = min(k_out, len(losses) - k_in)
    guessed_in, guessed_out = order[:k_in], order[len(order) - k_out:] if k_out else order[:0]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return k_in + k_out, correct


def one_run_bound(losses: np.ndarray, included: np.ndarray, *, delta: float,
                  confidence: float = CONFIDENCE,
                  plans: tuple[tuple[float, float], ...] = GUESS_PLANS) -> dict[str, Any]:
    """The largest lower bound over ``plans``, each at the Bonferroni-corrected level, and
    every plan's (k+, k-, guesses, correct, bound)."""
    m = len(losses)
    each = 1 - (1 - confidence) / len(plans)
    tried = []
    for share_in, share_out in plans:
        k_in, k_out = max(1, round(share_in * m)), round(share_out * m)
        r, v = guesses(losses, included, k_in=k_in, k_out=k_out)
        tried.append({"k_in": k_in, "k_out": k_out, "guesses": r, "correct": v,
                      "epsilon_lower_bound": epsilon_lower_bound(m=m, r=r, v=v, delta=delta,
                                                                 confidence=each)})
    best = max(tried, key=lambda t: (t["epsilon_lower_bound"], t["correct"] / t["guesses"]))
    return {"epsilon_lower_bound": best["epsilon_lower_bound"], "confidence": confidence,
            "canaries": m, "guesses": best["guesses"], "correct": best["correct"],
            "k_in": best["k_in"], "k_out": best["k_out"], "tried": tried,
            "confidence_per_plan": each}


def accounted_epsilon(run_dir: Path, site: str) -> tuple[float, float]:
    """(epsilon, delta) the ledger charged the canary site; (inf, 0) when nothing was
    charged (no DP, or clipping without noise)."""
    from fedrnn.client.audit import audit
    from fedrnn.shared.errors import FedrnnError

    try:
        spends = [s for s in audit(run_dir).sites if s.client == site]
    except FedrnnError:  # no ledgers: the run released without DP
        spends = []
    if not spends or not spends[0].history:
        return math.inf, 0.0
    return spends[0].epsilon, spends[0].delta


@register_section("one_run")
def one_run_section(run_dir: Path) -> dict[str, Any] | None:
    run = load_audited(run_dir)
    if run is None or not run.draw.included:
        return None
    losses = record_losses(run.model, run.config, canary_tensors(run.config, run.draw))
    included = np.array(run.draw.included, dtype=bool)
    accounted, delta = accounted_epsilon(run_dir, run.draw.site)
    result = one_run_bound(losses, included, delta=delta)
    return {
        "method": "one-run", "site": run.draw.site,
        "epsilon_lower_bound": result.pop("epsilon_lower_bound"),
        "epsilon_accounted": json_value(accounted), "delta": delta, **result,
        "score": "loss (lower: guessed in)",
        "losses": {"included": losses[included].tolist(),
                   "excluded": losses[~included].tolist()},
    }
