"""Evaluation a deployed site can release: noised sums of clipped per-record values.

Exact metrics computed on a site's records are exact queries on them: a crafted model plus
one evaluation tells a server how many records carry a rare label. So a deployed site
releases only the Gaussian mechanism's answer to three sums over its evaluation records,
each record contributing a vector of norm at most ``SENSITIVITY``:

    (its loss / L, its score / M, 1)

with the loss clipped to [0, L] and the score (correct or not; a sequence's token
accuracy; a forecast's mean absolute error) to [0, M]. Noise of std ``sigma *
SENSITIVITY`` is added to each sum; the metrics are ratios of the noised sums (loss,
accuracy or MAE per record) and the noised count, all post-processing. The release is
charged to the evaluation records' budget before it is made (``fedrnn.client.spending``), as
one Gaussian mechanism of noise multiplier ``sigma`` (sample rate 1, one step).

Metrics average over records here (a token-weighted mean would need a per-record weight
the noise would have to cover too), and AUROC, a rank statistic, is not released.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import SequenceTensors
from fedrnn.shared.models import SequenceModel, vocab_size
from fedrnn.shared.tasks import get_task

SENSITIVITY = math.sqrt(3.0)  # the norm of (loss / L, score / M, 1) at most


@torch.no_grad()
def per_record(model: SequenceModel, data: SequenceTensors, config: RunConfig,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each evaluation record's loss and score (see module docstring), unclipped."""
    task = get_task(config.task)
    model.eval()
    losses, scores = [], []
    for start in range(0, len(data), 256):
        part = data.subset(torch.arange(start, min(start + 256, len(data))))
        batch = (part.inputs, part.lengths, part.labels)
        losses.append(task.record_losses(model, batch))
        scores.append(task.record_scores(model, batch))
    if not losses:
        return np.zeros(0), np.zeros(0)
    return torch.cat(losses).numpy().astype(float), torch.cat(scores).numpy().astype(float)


def release(losses: np.ndarray, scores: np.ndarray, config: RunConfig, *, sigma: float,
            normal: Callable[[int], np.ndarray]) -> dict[str, float]:
    """The task's metrics from the noised sums; ``normal(n)`` draws n standard normals
    from the site's secure generator."""
    task = get_task(config.task)
    # L and M: a loss of twice the uniform guess's is already a model that has learnt
    # nothing; clipping there keeps the noise (proportional to L) small against what the
    # metric can show.
    loss_bound, score_bound = task.release_bounds(config, vocab_size=vocab_size(config))
    # A record whose loss or score is not finite (weights that overflow on it) counts as
    # the worst value: what is released never depends on whether that happened.
    worst_score = task.worst_score(score_bound)
    losses = np.nan_to_num(losses, nan=loss_bound, posinf=loss_bound, neginf=0.0)
    scores = np.nan_to_num(scores, nan=worst_score, posinf=score_bound, neginf=0.0)
    sums = np.array([np.clip(losses, 0, loss_bound).sum() / loss_bound,
                     np.clip(scores, 0, score_bound).sum() / score_bound, float(len(losses))])
    noised = sums + sigma * SENSITIVITY * normal(3)
    count = max(float(noised[2]), 1.0)
    loss = float(np.clip(noised[0] / count, 0, 1)) * loss_bound
    score = float(np.clip(noised[1] / count, 0, 1)) * score_bound
    return {"num-examples": max(float(noised[2]), 0.0), "loss": loss,
            **task.released_metrics(loss=loss, score=score)}

