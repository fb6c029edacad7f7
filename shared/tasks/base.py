"""What a task is: the interface every task implements, and the helpers tasks share.

A batch is ``(inputs, lengths, labels)``: ``inputs`` [B, T] token ids or [B, T, C] series
channels, ``lengths`` [B] valid steps, ``labels`` [B] class indices (-1 where the task has
none). Losses are per-record means averaged over the batch (``sum / batch size``), the
form Opacus's ``loss_reduction="mean"`` expects; an empty Poisson batch gives a zero loss.
Padding never enters a loss or a metric: every per-step term is multiplied by a mask of
valid steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from fedrnn.shared.config import RunConfig

# The data layer asks tasks about corpora, so tasks import nothing from fedrnn.shared.data.
if TYPE_CHECKING:
    from fedrnn.shared.data.corpus import Corpus

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, lengths, labels

# Metrics that improve upwards; every other one (loss, perplexity, mae) improves downwards.
HIGHER_IS_BETTER = frozenset({"accuracy", "auroc"})


class Task(ABC):
    """Everything that differs between tasks; the rest of fedrnn asks ``get_task(name)``.

    Class attributes:
    - ``name``: the ``--task`` value (set by ``register_task``);
    - ``metrics``: the metric names ``evaluate`` may report, ``"loss"`` first (also the keys
      in metrics.jsonl and summary.json); every evaluation also reports ``num-examples``;
    - ``main_metric``: the one of ``metrics`` a run is judged by (early stopping's default);
    - ``per_step``: whether the model predicts at every step or once per sequence;
    - ``uses_labels``: whether records' ``label`` is the target (the run's ``labels``);
    - ``synthetic``: which built-in synthetic corpus suits it (``shared.data.builtin``).
    """

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    main_metric: ClassVar[str] = "loss"
    per_step: ClassVar[bool]
    uses_labels: ClassVar[bool] = False
    synthetic: ClassVar[str]

    # --- the model ------------------------------------------------------------------------
    @abstractmethod
    def n_outputs(self, config: RunConfig, *, vocab_size: int) -> int:
        """The head's output size; ``vocab_size`` is 0 for numeric series inputs."""

    # --- training -------------------------------------------------------------------------
    @abstractmethod
    def record_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Each record's own loss [B] (a per-step task: the mean over its valid steps)."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean over the batch of each record's own loss (0 for an empty batch)."""
        return self.record_losses(model, batch).sum() / max(len(batch[1]), 1)

    # --- exact evaluation (a simulation's clients) -----------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], config: RunConfig,
                 ) -> dict[str, float]:
        """``num-examples`` and metrics of ``model`` (put in eval mode) over ``batches``.

        Every client reports the same keys (Flower requires it); NaN marks "undefined
        here" (no examples, or AUROC over one class)."""

    # --- DP evaluation (a deployed site: client/evaluation.py) -----------------------------
    @abstractmethod
    def record_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Each record's score [B], the second value a site's DP evaluation releases."""

    @abstractmethod
    def release_bounds(self, config: RunConfig, *, vocab_size: int) -> tuple[float, float]:
        """(L, M): what one record's loss and score are clipped to before release;
        ``vocab_size`` as for ``n_outputs``."""

    def worst_score(self, score_bound: float) -> float:
        """The score a record whose score is not finite counts as (higher is better)."""
        return 0.0

    @abstractmethod
    def released_metrics(self, *, loss: float, score: float) -> dict[str, float]:
        """The task's metrics (without ``loss`` and ``num-examples``) from a released mean
        loss and mean score: post-processing only."""

    # --- using a trained model (fedrnn predict) ------------------------------------------
    @abstractmethod
    def predict(self, model: nn.Module, batch: Batch, config: RunConfig, *,
                mean: np.ndarray | None = None, std: np.ndarray | None = None,
                ) -> dict[str, list]:
        """Named columns of ``model``'s predictions for each record of ``batch`` (in eval
        mode, without gradients). ``mean``/``std`` [B, F]: each numeric record's
        standardisation, to report values in the data's own units."""

    # --- data -----------------------------------------------------------------------------
    def check_flags(self, config: RunConfig) -> None:  # noqa: B027  (optional: no check)
        """ConfigError unless the run's flags fix the schema this task needs (a deployed
        run, whose records nobody here holds)."""

    def check_corpus(self, corpus: Corpus, config: RunConfig, *, site: bool
                     ) -> dict[str, str]:
        """DataError unless ``corpus`` suits this task; the config keys to fill in from it.
        ``site``: a deployed site's own file, checked by its form only."""
        return {}


def trim(inputs: torch.Tensor, lengths: torch.Tensor, minimum: int = 1) -> torch.Tensor:
    """Drop padding columns beyond the batch's longest record (the client pads to its own)."""
    width = int(lengths.max()) if len(lengths) else inputs.shape[1]
    return inputs[:, : max(width, minimum)]


def valid(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] float mask: 1 at steps before each record's length."""
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def next_step(model: nn.Module, batch: Batch
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step tasks: predict step t+1 from steps <= t.

    Returns the predictions [B, T-1, n], the next steps' inputs [B, T-1(, C)] and a
    [B, T-1] mask of the steps that have a target.
    """
    inputs, lengths, _ = batch
    inputs = trim(inputs, lengths, minimum=2)
    steps = lengths - 1  # predictions with a target
    source, target = inputs[:, :-1], inputs[:, 1:]
    pred = model(source, steps.clamp(min=1))
    return pred, target, valid(steps, source.shape[1])


def record_mean(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: each record's mean of ``terms`` over its valid (``mask``ed) entries."""
    dims = tuple(range(1, terms.dim()))
    return (terms * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1)
