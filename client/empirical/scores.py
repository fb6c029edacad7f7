"""Scoring canaries with a run's final model: each record's loss, black box."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import SequenceTensors
from fedrnn.shared.data.canaries import CanaryDraw, read_draw
from fedrnn.shared.model_card import load_model
from fedrnn.shared.tasks import get_task

BATCH = 256  # records per forward pass


@dataclass
class AuditedRun:
    """A finished run with canaries: its final model, the settings it was trained with,
    and the secret draw."""

    run_dir: Path
    config: RunConfig
    model: torch.nn.Module
    draw: CanaryDraw


def load_audited(run_dir: Path) -> AuditedRun | None:
    """The run's model and draw; None when it planted nothing."""
    draw = read_draw(run_dir)
    if draw is None:
        return None
    card, model = load_model(run_dir)
    return AuditedRun(run_dir=run_dir, config=card.config(), model=model, draw=draw)


def record_losses(model: torch.nn.Module, config: RunConfig, tensors: SequenceTensors,
                  ) -> np.ndarray:
    """Each record's loss under ``model`` (eval mode, no gradients), as training's loss."""
    task = get_task(config.task)
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(tensors), BATCH):
            part = tensors.subset(np.arange(lo, min(lo + BATCH, len(tensors))))
            out.append(task.record_losses(model, (part.inputs, part.lengths, part.labels))
                       .double().numpy())
    return np.concatenate(out) if out else np.zeros(0)
