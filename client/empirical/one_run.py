"""The record-level one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

Every canary gets two scores, each lower for a canary more likely trained on: its loss
under the final model (``loss``, black box) and, when the run kept the canary site's
releases, its coefficients in those releases (``release``, white box: ``white_box``). For
each score the auditor guesses "in" for the ``k+`` lowest and "out" for the ``k-``
highest, abstaining on the rest, and counts its correct guesses against the secret draw.
``shared.audit_bounds`` turns (canaries, guesses, correct, delta) into a lower bound on
epsilon.

Choosing the score or ``(k+, k-)`` after seeing the scores would overstate the bound, so
the choices are fixed in advance (``SCORES`` x ``GUESS_PLANS``) and every pair is tried at
confidence ``1 - (1 - CONFIDENCE) / pairs`` (Bonferroni): the largest of their bounds
holds at ``CONFIDENCE`` overall. Every pair tried is reported.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedrnn.client.empirical.scores import AuditedRun, load_audited, record_losses
from fedrnn.client.empirical.sections import register_section
from fedrnn.client.empirical.white_box import release_scores, scales_for_adam
from fedrnn.shared.audit_bounds import epsilon_lower_bound
from fedrnn.shared.canary_releases import read_releases
from fedrnn.shared.config import RunConfig, load_toml
from fedrnn.shared.data import SequenceTensors, canary_tensors, site_records
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.run_records import json_value

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
# (share guessed "in", share guessed "out") of the canaries, fixed before any run was
# audited. Guessing only "in" on the lowest losses suits canaries of which the model
# memorised some; balanced guesses suit a model that learnt every included canary a little.
GUESS_PLANS: tuple[tuple[float, float], ...] = (
    (0.02, 0.0), (0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.05, 0.05), (0.1, 0.1), (0.25, 0.25),
)
# The scores, each lower for a canary more likely trained on. Every run is charged for
# both in the correction, whether or not it kept the releases the second one needs.
SCORES: dict[str, str] = {
    "loss": "loss under the final model (lower: guessed in)",
    "release": "coefficient in the canary site's releases (higher: guessed in)",
}


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


def one_run_bound(scores: dict[str, np.ndarray], included: np.ndarray, *, delta: float,
                  confidence: float = CONFIDENCE,
                  plans: tuple[tuple[float, float], ...] = GUESS_PLANS,
                  pairs: int | None = None) -> dict[str, Any]:
    """The largest lower bound over every (score, plan) pair, each at the
    Bonferroni-corrected level, and every pair's (score, k+, k-, guesses, correct, bound).

    ``scores`` maps a score's name to one value a canary, lower meaning "in" is likelier.
    ``pairs`` is the number of pairs the correction covers (default: those tried here); it
    may exceed them, never be fewer."""
    m = len(included)
    tried_pairs = len(scores) * len(plans)
    pairs = tried_pairs if pairs is None else pairs
    if pairs < tried_pairs:
        raise ValueError(f"the correction must cover the {tried_pairs} pairs tried, not {pairs}")
    each = 1 - (1 - confidence) / pairs
    tried = []
    for name, values in scores.items():
        for share_in, share_out in plans:
            k_in, k_out = max(1, round(share_in * m)), round(share_out * m)
            r, v = guesses(values, included, k_in=k_in, k_out=k_out)
            tried.append({"score": name, "k_in": k_in, "k_out": k_out, "guesses": r,
                          "correct": v, "epsilon_lower_bound": epsilon_lower_bound(
                              m=m, r=r, v=v, delta=delta, confidence=each)})
    best = max(tried, key=lambda t: (t["epsilon_lower_bound"], t["correct"] / t["guesses"]))
    return {"epsilon_lower_bound": best["epsilon_lower_bound"], "confidence": confidence,
            "canaries": m, "guesses": best["guesses"], "correct": best["correct"],
            "k_in": best["k_in"], "k_out": best["k_out"], "best_score": best["score"],
            "tried": tried, "confidence_per_plan": each}


def accounted_epsilon(run_dir: Path, site: str) -> tuple[float, float, float]:
    """(epsilon, delta, noise multiplier) the ledger charged the canary site, the noise
    multiplier the median of its training releases'; (inf, 0, 0) when nothing was charged
    (no DP, or clipping without noise)."""
    from fedrnn.client.audit import audit

    try:
        spends = [s for s in audit(run_dir).sites if s.client == site]
    except FedrnnError:  # no ledgers: the run released without DP
        spends = []
    if not spends or not spends[0].history:
        return math.inf, 0.0, 0.0
    spend = spends[0]
    purposes = spend.purposes or ["train"] * len(spend.history)
    noises = [h[0] for h, purpose in zip(spend.history, purposes, strict=True)
              if purpose == "train"]
    return spend.epsilon, spend.delta, float(np.median(noises)) if noises else 0.0


def canary_site_records(run: AuditedRun) -> SequenceTensors | None:
    """The canary site's own training records (``shared.data.site_records``), read again
    from the run's data; None, with a warning, when the data is no longer where the run
    read it (the release score then estimates Adam's scaling from the canaries alone)."""
    try:
        settings = RunConfig.from_flat(load_toml(run.run_dir / "config.toml"))
        return site_records(settings, run.draw.site)
    except FedrnnError as exc:
        log.warning("the canary site's records could not be read again (%s): the release "
                    "score estimates Adam's scaling from the canaries alone", exc)
        return None


@register_section("one_run")
def one_run_section(run_dir: Path) -> dict[str, Any] | None:
    run = load_audited(run_dir)
    if run is None or not run.draw.included:
        return None
    tensors = canary_tensors(run.config, run.draw)
    losses = record_losses(run.model, run.config, tensors)
    scores = {"loss": losses}
    releases = read_releases(run_dir)
    accounted, delta, noise = accounted_epsilon(run_dir, run.draw.site)
    if releases:
        site = canary_site_records(run) if scales_for_adam(run.config) else None
        scores["release"] = release_scores(releases, run.config, tensors, site=site,
                                           noise_multiplier=noise)
    included = np.array(run.draw.included, dtype=bool)
    result = one_run_bound(scores, included, delta=delta,
                           pairs=len(SCORES) * len(GUESS_PLANS))
    best = result.pop("best_score")
    return {
        "method": "one-run", "site": run.draw.site,
        "epsilon_lower_bound": result.pop("epsilon_lower_bound"),
        "epsilon_accounted": json_value(accounted), "delta": delta, **result,
        "score": SCORES[best], "releases": len(releases),
        "losses": {"included": losses[included].tolist(),
                   "excluded": losses[~included].tolist()},
    }
