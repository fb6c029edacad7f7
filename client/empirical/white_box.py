"""Scoring canaries with the canary site's releases: white box, round by round.

Record-level DP at a site protects what it releases each round, the update the server
receives on its own (``shared.canary_releases``). In the final model FedAvg has diluted
that update among the other sites' (with 10 equal sites, to about a tenth each round), so
the black-box loss score misses what one site's releases show.

The score. A round's update is, to first order, a sum of the gradients of the records the
site sampled, taken at the weights it was sent, each clipped to the clip norm as DP-SGD
adds it. With the site's Adam optimizer (the default) each coordinate of that sum is
divided by the square root of Adam's second moment: the mean square of the batch
gradients, which the auditor estimates at the sent weights (``adam_scale``) from what it
may know: the site's other records, half of the canaries (the expected share) and the
noise the site adds (its noise multiplier, from its ledger). The update is then regressed
on the M canaries' gradients so scaled (ridge regression, the rest of the site's records
acting as noise): ``beta = (X X^T + lambda I)^-1 X (-update)``, one coefficient a canary.
A canary trained on has a positive coefficient, one left out none on average. The score of
a canary is its coefficients summed over the rounds the site trained; regressing on all
canaries at once takes out what a canary has in common with the others (its label, its
region of input space), which a canary's loss drop alone cannot tell from memorisation.

Without the scaling the regression models a plain gradient step, which an Adam round
without noise is not: its coordinates are rescaled by up to orders of magnitude (where the
site's gradients are small, Adam's steps are large). On the two runs of the default task
the scaling was chosen on, the bound rose from 0.64 to 1.42 (clipping, no noise) and from
0.97 to 1.60 (no DP); docs/empirical-audit.md's table holds fresh runs. With noise the
second moment is mostly the noise's, the same in every coordinate, and the scaling
changes little.

Nothing here sees the draw: the score is post-processing of the releases, the canaries and
the site's other records (fixed, as the one-run theorem assumes), so the bound holds for it
as for the loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from opacus import GradSampleModule

from fedrnn.shared.canary_releases import Release
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import SequenceTensors
from fedrnn.shared.models import build_model
from fedrnn.shared.nn import register_with_opacus
from fedrnn.shared.tasks import get_task

BATCH = 256  # records per backward pass
# The ridge, as a share of the mean squared gradient norm of the canaries (the mean of
# G G^T's diagonal). Fixed before the runs in docs/empirical-audit.md's table were audited.
RIDGE = 0.03
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which the site's optimizer has


def per_canary_gradients(model: torch.nn.Module, config: RunConfig,
                         tensors: SequenceTensors) -> np.ndarray:
    """[M, P]: each record's gradient of its own loss at ``model``'s weights, flattened in
    ``named_parameters`` order (float64). Opacus's per-sample gradients, in train mode."""
    return np.concatenate(list(_gradient_batches(model, config, tensors)))


def clipped_moments(model: torch.nn.Module, config: RunConfig, tensors: SequenceTensors
                    ) -> tuple[np.ndarray, np.ndarray]:
    """([P], [P]): the sum and the sum of squares of the records' clipped gradients,
    ``BATCH`` records at a time: a site's records may not fit in memory at once."""
    total = square = None
    for rows in _gradient_batches(model, config, tensors):
        rows = clipped(rows, config.clip_norm)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        square = (rows ** 2).sum(0) if square is None else square + (rows ** 2).sum(0)
    return total, square


def _gradient_batches(model: torch.nn.Module, config: RunConfig, tensors: SequenceTensors
                      ) -> Iterator[np.ndarray]:
    register_with_opacus()
    task = get_task(config.task)
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    sampled.train()
    try:
        for lo in range(0, len(tensors), BATCH):
            part = tensors.subset(np.arange(lo, min(lo + BATCH, len(tensors))))
            sampled.zero_grad(set_to_none=True)
            task.record_losses(sampled, (part.inputs, part.lengths, part.labels)).sum().backward()
            yield torch.cat([p.grad_sample.reshape(len(part), -1)
                             for p in sampled.parameters() if p.requires_grad], dim=1
                            ).double().numpy()
    finally:
        sampled.remove_hooks()  # Opacus's public teardown: the model is reused next round
        sampled.cleanup()


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


def scales_for_adam(config: RunConfig) -> bool:
    """Whether the site's steps were Adam's, whose per-coordinate scale the score divides
    out (and for which it needs the site's other records)."""
    return config.optimizer == "adam"


def adam_scale(site: tuple[np.ndarray, np.ndarray, int], canaries: np.ndarray, *,
               batch_size: float, noise_std: float) -> np.ndarray:
    """[P]: the square root of the second moment Adam divides each coordinate of a round's
    steps by, estimated at the weights the site was sent: the mean square of a Poisson
    batch's mean gradient, ``mean^2 + sum of squares / (B n) + (noise std / B)^2``.

    ``site`` is (sum, sum of squares, count) of the site's own records' clipped gradients
    (``clipped_moments``; zeros and 0 when the auditor does not have them); ``canaries``
    [M, P] their clipped gradients, of which the site trains on half in expectation (the
    auditor must not use which half). ``noise_std`` is the std of the noise on the summed
    gradient (noise multiplier x clip norm); ``batch_size`` the expected batch size."""
    site_sum, site_square, site_count = site
    count = site_count + len(canaries) / 2
    mean = (site_sum + canaries.sum(0) / 2) / count
    square = site_square + (canaries ** 2).sum(0) / 2
    variance = square / (batch_size * count) + (noise_std / batch_size) ** 2
    return np.sqrt(mean ** 2 + variance) + ADAM_EPS


def release_scores(releases: list[Release], config: RunConfig, tensors: SequenceTensors, *,
                   site: SequenceTensors | None = None, noise_multiplier: float = 0.0
                   ) -> np.ndarray:
    """[M]: each canary's coefficients summed over the releases, negated so that, as for
    the loss, a lower score means "trained on" is more likely. ``site``: the canary site's
    own records (without canaries), for Adam's scaling; ``noise_multiplier``: the noise
    the site trained with (0 without)."""
    model = build_model(config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = np.zeros(len(tensors))
    for release in releases:
        model.load_state_dict(release.received)
        update = torch.cat([(release.released[n] - release.received[n]).reshape(-1)
                            for n in names]).double().numpy()
        gradients = clipped(per_canary_gradients(model, config, tensors), config.clip_norm)
        if scales_for_adam(config):
            moments = ((*clipped_moments(model, config, site), len(site))
                       if site is not None and len(site) else (0.0, 0.0, 0))
            gradients = gradients / adam_scale(
                moments, gradients, batch_size=config.batch_size,
                noise_std=noise_multiplier * config.clip_norm)
        total += release_coefficients(gradients, update)
    return -total
