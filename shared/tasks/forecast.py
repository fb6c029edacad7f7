"""``forecast``: the next step's observed values of numeric series.

Inputs carry ``[values, observed flags, gap]`` per step (``shared.data.tensors``); only
observed values are targets. Metrics: ``loss`` (MSE of the standardised values), ``mae``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError, DataError
from fedrnn.shared.tasks.base import Batch, Task, next_step, record_mean, trim
from fedrnn.shared.tasks.registry import register_task

if TYPE_CHECKING:
    from fedrnn.shared.data.corpus import Corpus

LOSS_BOUND = 4.0  # MSE of standardised values (z clipped to +-5 in the inputs)
MAE_BOUND = 2.0


def _observed_next(model: nn.Module, batch: Batch
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions [B, T-1, n], next values [B, T-1, n] and a mask of the observed ones."""
    pred, target, mask = next_step(model, batch)
    n = pred.shape[-1]
    mask = mask[:, :, None] * target[:, :, n: 2 * n]  # observed values only
    return pred, target[:, :, :n], mask


@register_task("forecast")
class Forecast(Task):
    metrics = ("loss", "mae")
    main_metric = "mae"
    per_step = True
    synthetic = "sines"

    def n_outputs(self, config: RunConfig, *, vocab_size: int) -> int:
        return len(config.feature_names)

    def record_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        pred, target, mask = _observed_next(model, batch)
        return record_mean((pred - target) ** 2, mask)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], config: RunConfig,
                 ) -> dict[str, float]:
        model.eval()
        total, count, abs_err = 0.0, 0.0, 0.0
        for batch in batches:
            if len(batch[1]) == 0:
                continue
            pred, target, mask = _observed_next(model, batch)
            total += ((pred - target) ** 2 * mask).sum().item()
            abs_err += ((pred - target).abs() * mask).sum().item()
            count += mask.sum().item()
        return {"num-examples": int(count), "loss": total / count if count else math.nan,
                "mae": abs_err / count if count else math.nan}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch, config: RunConfig, *,
                mean: np.ndarray | None = None, std: np.ndarray | None = None,
                ) -> dict[str, list]:
        """``next_<feature>``: the value each feature is predicted to take at the step after
        a record's last, in the data's units (``mean``/``std``; standardised without)."""
        inputs, lengths, _ = batch
        out = model(trim(inputs, lengths), lengths)  # [B, T, F]: step t predicts t+1
        z = out[torch.arange(len(lengths)), lengths - 1].double().numpy()  # [B, F]
        values = z * std + mean if mean is not None and std is not None else z
        return {f"next_{name}": values[:, j].tolist()
                for j, name in enumerate(config.feature_names)}

    def record_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        pred, target, mask = _observed_next(model, batch)
        return record_mean((pred - target).abs(), mask)  # mean absolute error

    def release_bounds(self, config: RunConfig, *, vocab_size: int) -> tuple[float, float]:
        return LOSS_BOUND, MAE_BOUND

    def worst_score(self, score_bound: float) -> float:
        return score_bound  # an error: lower is better

    def released_metrics(self, *, loss: float, score: float) -> dict[str, float]:
        return {"mae": score}

    def check_flags(self, config: RunConfig) -> None:
        if not config.feature_names:
            raise ConfigError("a forecast run needs --features: the numeric columns to predict")

    def check_corpus(self, corpus: Corpus, config: RunConfig, *, site: bool
                     ) -> dict[str, str]:
        if corpus.kind != "series":
            raise DataError(corpus.source, "task forecast needs numeric sequences; this file "
                                           "holds text: use --task lm or classify")
        return {}
