"""Scoring canaries with the canary site's releases: white box, round by round.

Record-level DP at a site protects what it releases each round, the update the server
receives on its own (``shared.canary_releases``). In the final model FedAvg has diluted
that update among the other sites' (with 10 equal sites, to about a tenth each round), so
the black-box loss score misses what one site's releases show.

The score. A round's update is, to first order, a weighted sum of the gradients of the
records the site trained on, taken at the weights it was sent. Each canary's gradient at
those weights is known to the auditor (the canaries are its own), so the update is
regressed on the M canaries' gradients (ridge regression, the rest of the site's records
acting as noise): ``beta = (G G^T + lambda I)^-1 G (-update)``, one coefficient a canary.
Each canary's gradient is clipped to the site's clip norm first, as DP-SGD adds it.
A canary trained on has a positive coefficient, one left out none on average. The score
of a canary is its coefficients summed over the rounds the site trained; regressing on all
canaries at once takes out what a canary has in common with the others (its label, its
region of input space), which a canary's loss drop alone cannot tell from memorisation.

Nothing here sees the draw: the score is post-processing of the releases and of the
canaries, so the one-run bound holds for it as for the loss.
"""

from __future__ import annotations

import numpy as np
import torch
from opacus import GradSampleModule

from fedrnn.shared.canary_releases import Release
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import SequenceTensors
from fedrnn.shared.models import build_model
from fedrnn.shared.nn import register_with_opacus
from fedrnn.shared.tasks import get_task

BATCH = 256  # canaries per backward pass
# The ridge, as a share of the mean squared gradient norm of the canaries (the mean of
# G G^T's diagonal). Fixed before the runs in docs/empirical-audit.md's table were audited.
RIDGE = 0.03


def per_canary_gradients(model: torch.nn.Module, config: RunConfig,
                         tensors: SequenceTensors) -> np.ndarray:
    """[M, P]: each record's gradient of its own loss at ``model``'s weights, flattened in
    ``named_parameters`` order (float64). Opacus's per-sample gradients, in train mode."""
    register_with_opacus()
    task = get_task(config.task)
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    sampled.train()
    rows = []
    for lo in range(0, len(tensors), BATCH):
        part = tensors.subset(np.arange(lo, min(lo + BATCH, len(tensors))))
        sampled.zero_grad(set_to_none=True)
        task.record_losses(sampled, (part.inputs, part.lengths, part.labels)).sum().backward()
        rows.append(torch.cat([p.grad_sample.reshape(len(part), -1)
                               for p in sampled.parameters() if p.requires_grad], dim=1)
                    .double().numpy())
    sampled.remove_hooks()  # Opacus's public teardown: the model is reused next round
    sampled.cleanup()
    return np.concatenate(rows)


def clipped(gradients: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row scaled to norm at most ``clip_norm``: the gradient as the site's DP-SGD
    step adds it (the clip norm is a public parameter of the release). Unclipped, a
    canary with a large gradient gets a small coefficient for the same inclusion, which
    blurs the scores (measured on a no-noise run: bound 0.72 unclipped, 1.16 clipped)."""
    norms = np.linalg.norm(gradients, axis=1, keepdims=True)
    return gradients * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))


def release_coefficients(gradients: np.ndarray, update: np.ndarray, *,
                         ridge: float = RIDGE) -> np.ndarray:
    """[M]: the ridge regression of ``-update`` [P] on the canaries' ``gradients`` [M, P],
    ``ridge`` relative to their mean squared norm."""
    gram = gradients @ gradients.T
    scale = float(np.trace(gram)) / len(gram) or 1.0
    return np.linalg.solve(gram + ridge * scale * np.eye(len(gram)), gradients @ -update)


def release_scores(releases: list[Release], config: RunConfig, tensors: SequenceTensors
                   ) -> np.ndarray:
    """[M]: each canary's coefficients summed over the releases, negated so that, as for
    the loss, a lower score means "trained on" is more likely."""
    model = build_model(config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = np.zeros(len(tensors))
    for release in releases:
        model.load_state_dict(release.received)
        update = torch.cat([(release.released[n] - release.received[n]).reshape(-1)
                            for n in names]).double().numpy()
        gradients = clipped(per_canary_gradients(model, config, tensors), config.clip_norm)
        total += release_coefficients(gradients, update)
    return -total
