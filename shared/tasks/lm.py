"""``lm``: next-token prediction on text.

Metrics: ``loss`` (cross-entropy per predicted token), ``accuracy`` (next token),
``perplexity``; a site's DP evaluation averages per record instead of per token.
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
from fedrnn.shared.tasks.base import Batch, Task, next_step, record_mean
from fedrnn.shared.tasks.registry import register_task

if TYPE_CHECKING:
    from fedrnn.shared.data.corpus import Corpus

MAX_LOG_PERPLEXITY = 50.0  # exp() of more overflows nothing useful: the model is lost


@register_task("lm")
class LanguageModel(Task):
    metrics = ("loss", "accuracy", "perplexity")
    per_step = True
    synthetic = "text"

    def n_outputs(self, config: RunConfig, *, vocab_size: int) -> int:
        return vocab_size

    def record_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        pred, target, mask = next_step(model, batch)
        return record_mean(F.cross_entropy(pred.transpose(1, 2), target, reduction="none"),
                           mask)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], config: RunConfig,
                 ) -> dict[str, float]:
        model.eval()
        total, count, correct = 0.0, 0.0, 0.0
        for batch in batches:
            if len(batch[1]) == 0:
                continue
            pred, target, mask = next_step(model, batch)
            total += (F.cross_entropy(pred.transpose(1, 2), target, reduction="none")
                      * mask).sum().item()
            correct += ((pred.argmax(-1) == target).float() * mask).sum().item()
            count += mask.sum().item()
        mean_loss = total / count if count else math.nan
        return {"num-examples": int(count), "loss": mean_loss,
                "accuracy": correct / count if count else math.nan,
                "perplexity": math.exp(min(mean_loss, MAX_LOG_PERPLEXITY)) if count
                else math.nan}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch, config: RunConfig, *,
                mean: np.ndarray | None = None, std: np.ndarray | None = None,
                ) -> dict[str, list]:
        """``loss``: each record's mean cross-entropy per predicted token (its end
        included), and its ``perplexity``."""
        losses = self.record_losses(model, batch).tolist()
        return {"loss": losses,
                "perplexity": [math.exp(min(x, MAX_LOG_PERPLEXITY)) for x in losses]}

    def record_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        pred, target, mask = next_step(model, batch)
        return record_mean((pred.argmax(-1) == target).float(), mask)  # token accuracy

    def release_bounds(self, config: RunConfig, *, vocab_size: int) -> tuple[float, float]:
        # twice the uniform guess's loss is already a model that has learnt nothing
        return 2 * math.log(vocab_size), 1.0

    def released_metrics(self, *, loss: float, score: float) -> dict[str, float]:
        return {"accuracy": score, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY))}

    def check_flags(self, config: RunConfig) -> None:
        if config.feature_names:
            raise ConfigError("task lm is on text: drop --features")

    def check_corpus(self, corpus: Corpus, config: RunConfig, *, site: bool
                     ) -> dict[str, str]:
        if corpus.kind != "text":
            raise DataError(corpus.source, "task lm needs text records (a 'text' column); "
                                           "this file holds numeric sequences: use --task "
                                           "classify or forecast")
        return {}
