"""The three tasks: how a batch becomes a loss, and how evaluation becomes metrics.

Losses are per-sample means averaged over the batch (``sum / batch size``), the form
Opacus's ``loss_reduction="mean"`` expects; an empty Poisson batch gives a zero loss.
Padding never enters a loss or a metric: every per-step term is multiplied by a mask of
valid steps.

Metric names (also the keys in metrics.jsonl and summary.json):
- ``classify``: ``loss`` (cross-entropy), ``accuracy``, ``auroc`` (binary tasks);
- ``lm``: ``loss`` (cross-entropy per token), ``accuracy`` (next token), ``perplexity``;
- ``forecast``: ``loss`` (MSE of the next step's standardised observed values), ``mae``.
Each evaluation also reports ``num-examples``, the count its metrics average over
(sequences, predicted tokens or observed target values); the server weights by it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, lengths, labels

METRICS = {
    "classify": ("loss", "accuracy", "auroc"),
    "lm": ("loss", "accuracy", "perplexity"),
    "forecast": ("loss", "mae"),
}


def _trim(inputs: torch.Tensor, lengths: torch.Tensor, minimum: int = 1) -> torch.Tensor:
    """Drop padding columns beyond the batch's longest record (the client pads to its own)."""
    width = int(lengths.max()) if len(lengths) else inputs.shape[1]
    return inputs[:, : max(width, minimum)]


def _valid(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] float mask: 1 at steps before each record's length."""
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def _per_step(model: nn.Module, batch: Batch, task: str):
    """Shared by lm and forecast: predict step t+1 from steps <= t.

    Returns per-step predictions, targets and a [B, T-1] mask of valid targets.
    """
    inputs, lengths, _ = batch
    inputs = _trim(inputs, lengths, minimum=2)
    steps = lengths - 1  # predictions with a target
    source, target = inputs[:, :-1], inputs[:, 1:]
    pred = model(source, steps.clamp(min=1))
    mask = _valid(steps, source.shape[1])
    if task == "forecast":
        n = pred.shape[-1]
        mask = mask[:, :, None] * target[:, :, n: 2 * n]  # observed values only
        target = target[:, :, :n]
    return pred, target, mask


def loss(model: nn.Module, batch: Batch, task: str) -> torch.Tensor:
    """Mean over the batch of each record's own mean loss (0 for an empty batch)."""
    return record_losses(model, batch, task).sum() / max(len(batch[1]), 1)


def record_losses(model: nn.Module, batch: Batch, task: str) -> torch.Tensor:
    """Each record's own loss [B]: a classification's cross-entropy, or the mean over a
    sequence's valid steps of its per-step loss."""
    inputs, lengths, labels = batch
    if task == "classify":
        logits = model(_trim(inputs, lengths), lengths)
        return F.cross_entropy(logits, labels, reduction="none")
    pred, target, mask = _per_step(model, batch, task)
    if task == "lm":
        terms = F.cross_entropy(pred.transpose(1, 2), target, reduction="none") * mask
    else:
        terms = (pred - target) ** 2 * mask
    dims = tuple(range(1, terms.dim()))
    return terms.sum(dim=dims) / mask.sum(dim=dims).clamp(min=1)


@torch.no_grad()
def evaluate(model: nn.Module, batches, task: str, *, binary: bool = False) -> dict[str, float]:
    """Metrics of ``model`` over an iterable of batches (model put in eval mode).

    ``binary``: a two-class ``classify`` task, which also reports ``auroc``.
    """
    model.eval()
    total, count, correct, abs_err = 0.0, 0.0, 0.0, 0.0
    scores, truth = [], []
    for batch in batches:
        inputs, lengths, labels = batch
        if len(lengths) == 0:
            continue
        if task == "classify":
            logits = model(_trim(inputs, lengths), lengths)
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            count += len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            if binary:
                scores.append(torch.softmax(logits, -1)[:, 1].numpy())
                truth.append(labels.numpy())
            continue
        pred, target, mask = _per_step(model, batch, task)
        if task == "lm":
            total += (F.cross_entropy(pred.transpose(1, 2), target, reduction="none")
                      * mask).sum().item()
            correct += ((pred.argmax(-1) == target).float() * mask).sum().item()
        else:
            total += ((pred - target) ** 2 * mask).sum().item()
            abs_err += ((pred - target).abs() * mask).sum().item()
        count += mask.sum().item()
    # Every client reports the same keys (Flower requires it); NaN marks "undefined here",
    # e.g. AUROC on a client whose evaluation records are all of one class.
    nan = math.nan
    mean_loss = total / count if count else nan
    metrics = {"num-examples": int(count), "loss": mean_loss}
    if task in ("classify", "lm"):
        metrics["accuracy"] = correct / count if count else nan
    if task == "lm":
        metrics["perplexity"] = math.exp(min(mean_loss, 50.0)) if count else nan
    if task == "forecast":
        metrics["mae"] = abs_err / count if count else nan
    if binary:
        auc = auroc(np.concatenate(scores), np.concatenate(truth)) if scores else None
        metrics["auroc"] = nan if auc is None else auc
    return metrics


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None with one class."""
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for lo, hi in zip(starts, ends, strict=True):
        ranks[order[lo:hi]] = (lo + hi + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
