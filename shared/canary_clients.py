"""Canary clients of a simulation's user-level audit (``canary-clients``): who they are,
what each sends, and what the run directory keeps of them.

A run with ``clients`` sites and ``canary-clients`` C has C more clients, partition ids
``clients`` to ``clients + C - 1``, which the server samples for training like any site.
Canary ``i`` holds no records; its "training" is its secret unit direction ``u_i`` (over
every floating-point weight of the model, in ``state_dict`` order), and its update is
``CANARY_NORM_FACTOR * user-clip-norm * u_i``: above the clip, so the server's user-level
clipping brings it to exactly the clip, as it does any large update.

Directions come from the secure generator keyed by (seed, ``DOMAIN``, index): the
simulation's seed, as every draw of a simulation (whose researcher holds every record
anyway). Indices ``0 .. C-1`` are the inserted canaries; indices from C on are directions
never inserted ("unseen"), which the audit draws as many as it likes.

``RUN/audit/canary_clients.json`` (mode 0600) records the canaries by their seeds, not
their vectors, and ``RUN/audit/initial_model.pt`` the weights the run started from: the
audit compares the final model's change with each direction.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrnn.shared.files import write_atomic
from fedrnn.shared.randomness import SiteRandomness

AUDIT_DIR = "audit"
CANARY_FILE = "canary_clients.json"
INITIAL_MODEL = "initial_model.pt"
DOMAIN = 19  # keys (seed, 19, index): no other draw of fedrnn uses three-part keys with 19
# a canary's update norm, in user clips: clipping then scales every canary to the clip
CANARY_NORM_FACTOR = 2.0


def is_canary(partition: int, *, clients: int) -> bool:
    """Whether partition id ``partition`` is a canary client of a run of ``clients`` sites."""
    return partition >= clients


def float_names(state: Mapping[str, Any]) -> list[str]:
    """The weights a direction spans: every floating-point entry, in ``state_dict`` order."""
    return [k for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def dimension(state: Mapping[str, Any]) -> int:
    return int(sum(np.asarray(state[k]).size for k in float_names(state)))


def direction(*, seed: int, index: int, dim: int) -> np.ndarray:
    """Canary ``index``'s unit direction in ``dim`` dimensions (float64)."""
    draw = SiteRandomness.from_seed(seed, DOMAIN, index).gaussian((dim,), std=1.0,
                                                                  dtype=torch.float64)
    vector = draw.numpy()
    return vector / np.linalg.norm(vector)


def canary_weights(global_state: Mapping[str, np.ndarray], *, seed: int, index: int,
                   user_clip_norm: float) -> dict[str, np.ndarray]:
    """What canary ``index`` replies: the global weights plus its update, which is its
    direction scaled to ``CANARY_NORM_FACTOR`` times the user clip."""
    names = float_names(global_state)
    update = direction(seed=seed, index=index, dim=dimension(global_state))
    update *= CANARY_NORM_FACTOR * user_clip_norm
    out, start = {}, 0
    for name, array in global_state.items():
        array = np.asarray(array)
        if name in names:
            part = update[start:start + array.size].reshape(array.shape)
            start += array.size
            out[name] = (array + part).astype(array.dtype)
        else:
            out[name] = array.copy()
    return out


def flatten(state: Mapping[str, Any]) -> np.ndarray:
    """The floating-point weights of ``state`` as one float64 vector (direction order)."""
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel()
                           for k in float_names(state)])


def write_record(run_dir: Path, *, seed: int, clients: int, canaries: int,
                 user_clip_norm: float, initial: Mapping[str, torch.Tensor]) -> None:
    """``audit/canary_clients.json`` and ``audit/initial_model.pt``, both mode 0600."""
    folder = Path(run_dir) / AUDIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    dim = dimension({k: v.numpy() for k, v in initial.items()})
    record = {
        "canary_clients": canaries,
        "partition_ids": list(range(clients, clients + canaries)),
        "direction_keys": [[seed, DOMAIN, i] for i in range(canaries)],
        "dimension": dim,
        "update_norm": CANARY_NORM_FACTOR * user_clip_norm,
        "generator": "SiteRandomness.from_seed(*key).gaussian((dimension,)), normalised",
    }
    write_atomic(folder / CANARY_FILE, json.dumps(record, indent=2).encode(), private=True)
    buffer = io.BytesIO()
    torch.save(dict(initial), buffer)
    write_atomic(folder / INITIAL_MODEL, buffer.getvalue(), private=True)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's canary record, or None if it had no canary clients."""
    path = Path(run_dir) / AUDIT_DIR / CANARY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
