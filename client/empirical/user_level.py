"""The user-level section of ``fedrnn audit RUN --empirical``: the one-shot estimate of
Andrew et al. (2023) from a simulation's canary clients (``canary-clients``).

The final model's change ``delta = w_final - w_initial`` is compared with each inserted
canary's direction (cosine) and with as many directions never inserted ("unseen"); the
epsilon of telling the two fitted Gaussians apart (``shared.one_shot``) is the estimate.
It is an estimate, not a bound: it says how much a whole client's update shows through
the final model, against the accountant's user-level epsilon, which covers every
intermediate model too and so is expected to be larger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrnn.client.empirical.sections import register_section
from fedrnn.shared import canary_clients
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.model_card import load_model
from fedrnn.shared.one_shot import one_shot_estimate
from fedrnn.shared.run_records import read_summary

METHOD = "one-shot (Andrew et al. 2023)"
UNSEEN = 1000  # directions never inserted: the null distribution's sample


def cosines(change: np.ndarray, *, seed: int, indices: range) -> list[float]:
    """The cosine between ``change`` and each canary direction of ``indices``."""
    norm = float(np.linalg.norm(change))
    if norm == 0:
        return [0.0 for _ in indices]
    return [float(canary_clients.direction(seed=seed, index=i, dim=change.size) @ change)
            / norm for i in indices]


def model_change(run_dir: Path) -> np.ndarray:
    """``w_final - w_initial`` over the weights the directions span, as one vector."""
    initial_path = Path(run_dir) / canary_clients.AUDIT_DIR / canary_clients.INITIAL_MODEL
    if not initial_path.is_file():
        raise FedrnnError(f"{initial_path}: missing (the run's initial weights, which the "
                          "user-level audit compares the final model with)")
    initial = torch.load(initial_path, weights_only=True)
    _, model = load_model(run_dir)
    final = model.state_dict()
    if set(final) != set(initial):
        raise FedrnnError(f"{initial_path}: does not fit the run's final model")
    names = canary_clients.float_names(initial)
    return canary_clients.flatten({k: final[k].numpy() for k in names}) \
        - canary_clients.flatten({k: initial[k].numpy() for k in names})


@register_section("user_level")
def user_level_section(run_dir: Path, *, unseen: int = UNSEEN) -> dict[str, Any] | None:
    """The ``user_level`` section of the empirical audit's JSON, or None when the run had
    no canary clients.

    ``epsilon_estimate`` is the one-shot estimate at the run's delta; ``epsilon_accounted``
    the server's user-level epsilon (``summary.json``); ``cosines`` the inserted canaries'
    cosines (each) and a summary (mean, std, count) of both groups.
    """
    run_dir = Path(run_dir)
    record = canary_clients.read_record(run_dir)
    if record is None:
        return None
    summary = read_summary(run_dir)
    user = summary.privacy.user_level
    if user is None:
        raise FedrnnError(f"{run_dir}: has canary clients but no user-level privacy in "
                          "its summary")
    count = int(record["canary_clients"])
    keys = record["direction_keys"]
    seed = int(keys[0][0])
    if count < 2 or [list(k) for k in keys] != [[seed, canary_clients.DOMAIN, i]
                                                 for i in range(count)]:
        raise FedrnnError(f"{run_dir / canary_clients.AUDIT_DIR / canary_clients.CANARY_FILE}"
                          ": needs two or more canaries keyed (seed, "
                          f"{canary_clients.DOMAIN}, 0..C-1)")
    change = model_change(run_dir)
    inserted = cosines(change, seed=seed, indices=range(count))
    # unseen directions continue the canaries' indices: drawn alike, never inserted
    null = cosines(change, seed=seed, indices=range(count, count + unseen))
    estimate = one_shot_estimate(inserted, null, delta=user.delta)
    return {
        "method": METHOD,
        "canary_clients": count,
        "unseen": unseen,
        "epsilon_estimate": estimate.epsilon,
        "epsilon_accounted": user.epsilon,
        "delta": user.delta,
        "epsilon_interval_95": list(estimate.epsilon_interval()),
        "mu": estimate.mu,
        "mu_standard_error": estimate.mu_standard_error,
        "cosines": {"inserted": inserted,
                    "inserted_summary": estimate.inserted.to_json(),
                    "unseen": estimate.unseen.to_json()},
    }


def table(section: dict[str, Any]) -> str:
    """A few lines for the audit's console output."""
    cos = section["cosines"]
    return "\n".join([
        f"user level, {section['method']}: {section['canary_clients']} canary clients, "
        f"{section['unseen']} unseen directions",
        f"  epsilon estimate {section['epsilon_estimate']:.3f} (95% "
        f"{section['epsilon_interval_95'][0]:.3f} to {section['epsilon_interval_95'][1]:.3f};"
        f" mu {section['mu']:.3f} +- {section['mu_standard_error']:.3f}) vs accounted "
        f"{section['epsilon_accounted']:.3f} at delta {section['delta']:g}",
        f"  cosine inserted {cos['inserted_summary']['mean']:+.4f} "
        f"+- {cos['inserted_summary']['std']:.4f}, unseen {cos['unseen']['mean']:+.4f} "
        f"+- {cos['unseen']['std']:.4f}",
    ])
