"""Exposure of planted secrets (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A secret is "my code is d d d d d d" with random digits: a space of 10^6 candidates. Its
rank is its position among all candidates ordered by the final model's loss (1: the model
finds it likelier than any other); exposure = log2(10^6) - log2(rank). Scoring all 10^6
candidates would take minutes, so the rank is estimated from ``CANDIDATES`` random ones,
as the paper's sampling estimate: 1 + (share of the sample with a lower loss) x
(10^6 - 1). A secret no sampled candidate beats gets the largest exposure the space allows
(log2 10^6, about 19.9); the sample resolves exposures up to about log2(10^6 /
``CANDIDATES``) finely, beyond that only as "no sampled candidate was likelier".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedrnn.client.empirical.scores import load_audited, record_losses
from fedrnn.client.empirical.sections import register_section
from fedrnn.shared.data import text_tensors
from fedrnn.shared.data.canaries import SECRET_DIGITS, format_secret, secret_texts

CANDIDATES = 5000
SPACE = 10 ** SECRET_DIGITS


def exposure(secret_loss: float, candidate_losses: np.ndarray, *, space: int = SPACE
             ) -> tuple[float, float]:
    """(estimated rank, exposure in bits) of a secret among ``space`` candidates, from a
    random sample of the others' losses."""
    lower = float(np.mean(candidate_losses < secret_loss)) if len(candidate_losses) else 0.0
    rank = 1.0 + lower * (space - 1)
    return rank, math.log2(space) - math.log2(rank)


@register_section("exposure")
def exposure_section(run_dir: Path) -> dict[str, Any] | None:
    run = load_audited(run_dir)
    if run is None or not run.draw.secrets:
        return None
    secrets = secret_texts(run.draw)
    # the candidates are public randomness: a fixed stream of the draw, the secrets left out
    rng = np.random.default_rng([run.draw.seed, 2])
    candidates = [format_secret(rng.integers(0, 10, SECRET_DIGITS)) for _ in range(CANDIDATES)]
    candidates = [c for c in candidates if c not in set(secrets)]
    candidate_losses = record_losses(run.model, run.config, text_tensors(run.config, candidates))
    secret_losses = record_losses(run.model, run.config, text_tensors(run.config, secrets))
    rows = []
    for text, loss in zip(secrets, secret_losses, strict=True):
        rank, bits = exposure(float(loss), candidate_losses)
        rows.append({"secret": text, "loss": float(loss), "rank": rank, "exposure": bits})
    return {"method": "secret-sharer", "repeats": run.draw.repeats, "space": SPACE,
            "candidates_sampled": len(candidates),
            "max_exposure": max(r["exposure"] for r in rows),
            "largest_possible": math.log2(SPACE), "secrets": rows}
