"""``classify``: one label per sequence, from the model's output at its last valid step.

Metrics: ``loss`` (cross-entropy), ``accuracy``, ``auroc`` (two-class runs; a site's DP
evaluation releases it as NaN: a rank statistic has no small sensitivity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError, DataError
from fedrnn.shared.tasks.base import Batch, Task, trim
from fedrnn.shared.tasks.registry import register_task

if TYPE_CHECKING:
    from fedrnn.shared.data.corpus import Corpus


@register_task("classify")
class Classify(Task):
    metrics = ("loss", "accuracy", "auroc")
    main_metric = "auroc"
    per_step = False
    uses_labels = True
    synthetic = "classes"

    def n_outputs(self, config: RunConfig, *, vocab_size: int) -> int:
        return len(config.label_names)

    def record_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, lengths, labels = batch
        logits = model(trim(inputs, lengths), lengths)
        return F.cross_entropy(logits, labels, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], config: RunConfig,
                 ) -> dict[str, float]:
        binary = len(config.label_names) == 2
        model.eval()
        total, count, correct = 0.0, 0, 0.0
        scores, truth = [], []
        for inputs, lengths, labels in batches:
            if len(lengths) == 0:
                continue
            logits = model(trim(inputs, lengths), lengths)
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            count += len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            if binary:
                scores.append(torch.softmax(logits, -1)[:, 1].numpy())
                truth.append(labels.numpy())
        metrics = {"num-examples": count, "loss": total / count if count else math.nan,
                   "accuracy": correct / count if count else math.nan}
        if binary:
            auc = auroc(np.concatenate(scores), np.concatenate(truth)) if scores else None
            metrics["auroc"] = math.nan if auc is None else auc
        return metrics

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch, config: RunConfig, *,
                mean: np.ndarray | None = None, std: np.ndarray | None = None,
                ) -> dict[str, list]:
        """``p_<label>`` per class (summing to 1) and ``label``, the most likely."""
        inputs, lengths, _ = batch
        probs = torch.softmax(model(trim(inputs, lengths), lengths), -1)  # [B, classes]
        names = config.label_names
        columns = {f"p_{name}": probs[:, i].tolist() for i, name in enumerate(names)}
        columns["label"] = [names[i] for i in probs.argmax(-1).tolist()]
        return columns

    def record_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, lengths, labels = batch
        logits = model(trim(inputs, lengths), lengths)
        return (logits.argmax(-1) == labels).float()  # correct or not

    def release_bounds(self, config: RunConfig, *, vocab_size: int) -> tuple[float, float]:
        # twice the uniform guess's loss is already a model that has learnt nothing
        return max(2 * math.log(len(config.label_names)), 1.0), 1.0

    def released_metrics(self, *, loss: float, score: float) -> dict[str, float]:
        return {"accuracy": score, "auroc": math.nan}

    def check_flags(self, config: RunConfig) -> None:
        if len(config.label_names) < 2:
            raise ConfigError("a classify run on the sites' own records needs --labels with "
                              "at least two classes, e.g. --labels died,survived")

    def check_corpus(self, corpus: Corpus, config: RunConfig, *, site: bool
                     ) -> dict[str, str]:
        source = corpus.source
        if corpus.labels is None:
            raise DataError(source, "task classify needs a 'label' for every record")
        if site:
            return {}
        found = corpus.label_set
        if len(found) < 2:
            raise DataError(source, f"task classify needs at least two classes; found "
                                    f"{found or 'none'}")
        if not config.labels:
            return {"labels": ",".join(found)}
        unknown = [v for v in found if v not in config.label_names]
        if unknown:
            raise DataError(source, f"label(s) {', '.join(unknown)} are not among the run's "
                                    f"labels {', '.join(config.label_names)}")
        return {}


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
