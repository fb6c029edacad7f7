"""Local training and evaluation on one site's tensors: DP-SGD with Opacus, or plain SGD.

This module knows nothing of Flower. DP-SGD here is Opacus end to end: Poisson sampling
(``DPDataLoader``), each record's gradient clipped to ``clip_norm`` (ghost clipping:
per-record norms, then the clipped sum) and Gaussian noise
(``DPOptimizerFastGradientClipping``). ``PrivacyEngine`` builds a fresh accountant on
every call, so its history describes this call only; the caller adds it to the site's
cumulative history.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch.utils.data import DataLoader

from shared import tasks
from shared.config import RunConfig
from shared.data import SequenceTensors
from shared.memory import reuse_freed_memory
from shared.models import SequenceModel
from shared.privacy import History

# Opacus's hooks fire on modules whose inputs need no gradient (the first layer); torch
# warns about it on every backward pass, although the per-sample gradients are right.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class TrainResult:
    loss: float  # mean training loss over non-empty batches (NaN if there were none)
    steps: int
    history: History = field(default_factory=list)  # DP releases of this call (empty: no DP)


def train(model: SequenceModel, data: SequenceTensors, config: RunConfig, *,
          noise_multiplier: float | None, randomness) -> TrainResult:  # noqa: ANN001
    """Train ``model`` in place for ``config.local_epochs`` on ``data``.

    ``noise_multiplier`` None trains without DP (``--no-dp`` baselines). Otherwise every
    step samples a Poisson batch at rate ``1/ceil(N/batch_size)``, clips each record's
    gradient to ``config.clip_norm`` and adds noise of std ``noise_multiplier * clip_norm``.
    """
    reuse_freed_memory()  # per-sample gradients: see shared.memory
    seed = randomness.torch_seed()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and Opacus's noise draw from the global generator
    loader = DataLoader(data.dataset(), batch_size=config.batch_size, shuffle=True,
                        generator=generator)
    optimizer = _optimizer(model, config)
    model.train()
    trained: torch.nn.Module = model
    engine = None
    if noise_multiplier is not None:
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off: it matters only against an attacker who
            # can predict torch's (non-cryptographic) noise stream; see README, "Privacy".
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=config.accountant)
            trained, optimizer, _, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=config.clip_norm,
                poisson_sampling=True, grad_sample_mode=CLIPPING, criterion=_UNUSED_CRITERION)
    losses, steps = [], 0
    for _ in range(config.local_epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = backward(trained, optimizer if engine else None, batch, config.task)
            optimizer.step()  # also for an empty Poisson batch: the noise is still added
            steps += 1
            if loss is not None:
                losses.append(loss)
    history = []
    if engine is not None:
        history = list(engine.accountant.history)
        trained._close()  # remove Opacus's hooks: ``model`` is a plain module again
    model.zero_grad(set_to_none=True)
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return TrainResult(loss=mean_loss, steps=steps, history=history)


# Opacus's ghost clipping: a first backward pass gives every record's gradient norm (fedrnn's
# recurrent layers compute it from Gram matrices, without per-record gradients), a second
# gives the sum of clipped gradients, which shared.nn replays without its time loop. For
# the LEAF LSTM the step takes 201 ms against 246 ms materialising per-record gradients
# (``fedrnn bench dp-step`` and ``--clipping hooks``, README); the clipping is the same
# (tests/test_privacy.py).
CLIPPING = "ghost"
_UNUSED_CRITERION = torch.nn.MSELoss()  # make_private wants one; ``backward`` builds the loss


def backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch,
             task: str) -> float | None:
    """The gradients of one step in ``p.grad``: plain with no ``optimizer``, else each
    record's clipped (the sum; the DP optimizer adds noise and averages). The batch's mean
    loss, None for an empty (Poisson) batch, whose step is noise alone."""
    if optimizer is None:
        loss = tasks.loss(model, batch, task)
        loss.backward()
        return loss.item() if len(batch[1]) else None
    if len(batch[1]) == 0:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        return None
    per_record = tasks.record_losses(model, batch, task)
    loss = DPTensorFastGradientClipping(model, optimizer, per_record, "mean")
    loss.backward()
    return loss.item()


def evaluate(model: SequenceModel, data: SequenceTensors, config: RunConfig) -> dict[str, float]:
    loader = DataLoader(data.dataset(), batch_size=max(config.batch_size, 256), shuffle=False)
    return tasks.evaluate(model, loader, config.task,
                          binary=config.task == "classify" and len(config.label_names) == 2)


def _optimizer(model: SequenceModel, config: RunConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
