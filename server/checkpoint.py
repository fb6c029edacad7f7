"""The server's checkpoint: everything needed to go on after the last completed round.

Written atomically after every round (``checkpoint.pt`` in the run directory), so a server
killed at any moment restarts from the last round it completed, not from scratch:
global weights, the server optimiser's state (FedAdam's moments), the user-level
accounting history, the random generators' states and early stopping's state (the best
round so far and its weights).

Sites keep their own privacy state in their ledgers; nothing here is needed for it.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrnn.shared.files import write_atomic

CHECKPOINT = "checkpoint.pt"

# Attributes of Flower's strategies that change from round to round (FedOpt family).
_STRATEGY_STATE = ("current_arrays", "m_t", "v_t")


@dataclass
class Checkpoint:
    server_round: int
    weights: dict[str, torch.Tensor]
    strategy: dict[str, Any] = field(default_factory=dict)
    user_history: list[tuple[float, float, int]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    stopping: dict[str, Any] = field(default_factory=dict)  # server.stopping's state_dict
    best_weights: dict[str, torch.Tensor] | None = None  # the best round's, with early stopping


def save(run_dir: str | Path, checkpoint: Checkpoint) -> None:
    write(run_dir, encode(checkpoint))


def encode(checkpoint: Checkpoint) -> bytes:
    """The checkpoint as it is now (later changes to its weights or the strategy's state
    do not reach it), for ``write`` to store later."""
    buffer = io.BytesIO()
    torch.save(checkpoint.__dict__, buffer)
    return buffer.getvalue()


def write(run_dir: str | Path, data: bytes) -> None:
    write_atomic(Path(run_dir) / CHECKPOINT, data)


def load(run_dir: str | Path) -> Checkpoint | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    # Our own file, written by ``save``: it holds numpy arrays and random states, which
    # the weights-only unpickler refuses.
    state = torch.load(path, weights_only=False)
    return Checkpoint(**state)  # a checkpoint of an older version lacks the new fields


def strategy_state(strategy: object) -> dict[str, Any]:
    """The round-to-round state of a (possibly DP-wrapped) Flower strategy."""
    inner = getattr(strategy, "strategy", strategy)  # DifferentialPrivacy* wrap .strategy
    return {name: getattr(inner, name) for name in _STRATEGY_STATE if hasattr(inner, name)}


def restore_strategy(strategy: object, state: dict[str, Any]) -> None:
    inner = getattr(strategy, "strategy", strategy)
    for name, value in state.items():
        setattr(inner, name, value)


def rng_state() -> dict[str, Any]:
    return {"random": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": np.random.get_state()}


def restore_rng(state: dict[str, Any]) -> None:
    if state:
        random.setstate(state["random"])
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
