"""Local training and evaluation on one site's tensors: DP-SGD with Opacus, or plain SGD.

This module knows nothing of Flower. DP-SGD here is Opacus's mechanism with the site's own
randomness: Poisson sampling (``SitePoissonSampler``), each record's gradient clipped to
``clip_norm`` (Opacus's ghost clipping: per-record norms, then the clipped sum) and
Gaussian noise (``SiteNoiseOptimizer``, Opacus's ``DPOptimizerFastGradientClipping``), the
batches and the noise drawn from ``shared.randomness.SiteRandomness``, never from torch's
generator. ``PrivacyEngine`` builds a fresh accountant on every call, so its history
describes this call only; the caller adds it to the site's cumulative history.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import SequenceTensors
from fedrnn.shared.memory import reuse_freed_memory
from fedrnn.shared.models import SequenceModel
from fedrnn.shared.nn import register_with_opacus
from fedrnn.shared.privacy import History, sample_rate, steps_per_round
from fedrnn.shared.randomness import SiteRandomness
from fedrnn.shared.tasks import Batch, Task, get_task

# Before any PrivacyEngine meets the model: Opacus needs the recurrent layers' samplers.
register_with_opacus()

# Opacus's hooks fire on modules whose inputs need no gradient (the first layer); torch
# warns about it on every backward pass, although the per-sample gradients are right.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class TrainResult:
    loss: float  # mean training loss over non-empty batches (NaN if there were none)
    steps: int
    history: History = field(default_factory=list)  # DP releases of this call (empty: no DP)


def train(model: SequenceModel, data: SequenceTensors, config: RunConfig, *,
          noise_multiplier: float | None, randomness: SiteRandomness) -> TrainResult:
    """Train ``model`` in place for ``config.local_epochs`` on ``data``.

    ``noise_multiplier`` None trains without DP (``--no-dp`` baselines): shuffled batches of
    ``config.batch_size``. Otherwise every step samples a Poisson batch at rate
    ``fedrnn.shared.privacy.sample_rate(N, batch_size)``, ``steps_per_round`` steps in all,
    clips each record's gradient to ``config.clip_norm`` and adds noise of std
    ``noise_multiplier * clip_norm``; batches and noise come from ``randomness``, which
    must be the site's own (``SiteRandomness.from_os`` when deployed).
    """
    reuse_freed_memory()  # per-sample gradients: see shared.memory
    torch.manual_seed(randomness.torch_seed())  # dropout only: it is not a privacy mechanism
    optimizer = _optimizer(model, config)
    model.train()
    trained: torch.nn.Module = model
    engine = None
    if noise_multiplier is None:
        loader = DataLoader(data.dataset(), batch_size=config.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(randomness.torch_seed()))
    else:
        loader = poisson_loader(data.dataset(), config.batch_size, randomness)
        trained, optimizer, engine = make_private(
            model, optimizer, loader, noise_multiplier=noise_multiplier,
            clip_norm=config.clip_norm, accountant=config.accountant, randomness=randomness)
    task = get_task(config.task)
    losses, steps = [], 0
    for _ in range(config.local_epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = backward(trained, optimizer if engine else None, batch, task)
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


class SitePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampler (each record in each batch independently with probability
    ``sample_rate``), its draws from the site's ``randomness`` instead of torch's generator.
    ``steps`` batches per pass, given by the caller: Opacus's default ``int(1 / rate)``
    is one short of ``ceil(N/B)`` for some batch counts (93, 99, 105, ...: in floating
    point 1 / (1/93) falls just below 93)."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int,
                 randomness: SiteRandomness) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.randomness = randomness

    def __iter__(self):
        for _ in range(self.steps):
            mask = self.randomness.poisson_mask(self.num_samples, self.sample_rate)
            yield np.flatnonzero(mask).tolist()


def poisson_loader(dataset: Dataset, batch_size: int, randomness: SiteRandomness
                   ) -> DataLoader:
    """One pass of DP-SGD's batches over ``dataset``: ``steps_per_round(N, batch_size, 1)``
    Poisson batches at ``sample_rate(N, batch_size)``, so that what runs is what the site
    planned and charged. Empty batches keep the records' structure with zero rows, as
    Opacus's ``DPDataLoader`` makes them."""
    n = len(dataset)
    sampler = SitePoissonSampler(num_samples=n, sample_rate=sample_rate(n, batch_size),
                                 steps=steps_per_round(n, batch_size, 1),
                                 randomness=randomness)
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


class SiteNoiseOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's ghost-clipping DP optimizer, its Gaussian noise drawn from the site's
    ``randomness``. Everything else (accumulation, the step hook that feeds the accountant,
    scaling by the expected batch size, the checks against reusing a gradient) is
    Opacus's."""

    randomness: SiteRandomness

    def add_noise(self) -> None:
        """Opacus's ``add_noise``: ``p.grad`` = clipped sum + N(0, (sigma * clip)**2)."""
        # adaptive clipping keeps the accounted multiplier apart from the one it noises with
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.randomness.gaussian(p.summed_grad.shape, std=sigma * self.max_grad_norm,
                                             dtype=p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.device)).view_as(p)
            _mark_as_processed(p.summed_grad)


class _SitePrivacyEngine(PrivacyEngine):
    """``PrivacyEngine`` whose optimizer is ``SiteNoiseOptimizer``: Opacus builds its
    optimizer in ``_prepare_optimizer`` only, so that is the one place to change."""

    def __init__(self, *, accountant: str, randomness: SiteRandomness) -> None:
        with warnings.catch_warnings():
            # "Secure RNG turned off": it refers to torch's generator, which fedrnn's noise
            # and batches do not use.
            warnings.simplefilter("ignore")
            super().__init__(accountant=accountant, secure_mode=False)
        self.randomness = randomness

    def _prepare_optimizer(self, *, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                           max_grad_norm: float, expected_batch_size: int,
                           loss_reduction: str = "mean", distributed: bool = False,
                           clipping: str = "flat", noise_generator=None,
                           grad_sample_mode: str = "hooks", **kwargs) -> SiteNoiseOptimizer:
        if distributed or clipping != "flat" or grad_sample_mode != "ghost" or noise_generator:
            raise ValueError("fedrnn's DP optimizer is Opacus's flat ghost clipping, "
                             "single-process, with the site's own noise")
        private = SiteNoiseOptimizer(optimizer, noise_multiplier=noise_multiplier,
                                     max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size,
                                     loss_reduction=loss_reduction, **kwargs)
        private.randomness = self.randomness
        return private


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 *, noise_multiplier: float, clip_norm: float, accountant: str,
                 randomness: SiteRandomness
                 ) -> tuple[torch.nn.Module, SiteNoiseOptimizer, PrivacyEngine]:
    """Opacus's ``make_private`` in ghost-clipping mode over ``loader`` as given, noise from
    ``randomness``. Returns the wrapped model, the DP optimizer and the engine, whose
    accountant records one ``(noise_multiplier, 1 / len(loader))`` step per optimizer step.

    ``loader`` is used as it is (``poisson_sampling=False``): ``poisson_sampling=True``
    would replace its sampler by Opacus's ``DPDataLoader``, whose batches come from torch's
    generator and number ``int(1/q)``, and then account with ``q = 1/int(1/q)``. With a
    ``poisson_loader``, ``1 / len(loader)`` is exactly ``fedrnn.shared.privacy.sample_rate``.
    """
    engine = _SitePrivacyEngine(accountant=accountant, randomness=randomness)
    trained, private, _, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
        poisson_sampling=False, grad_sample_mode=CLIPPING, criterion=_UNUSED_CRITERION)
    # what poisson_sampling=True adds: one backward pass per step, never accumulated
    trained.forbid_grad_accumulation()
    # Opacus divides the noisy sum by int(N * q), which floating point can make one less
    # than N / ceil(N/B) where that is whole (N = 3087, B = 64: 62, not 63). The expected
    # size of a Poisson batch is N * q, computed as N / steps to be exact.
    private.expected_batch_size = len(loader.dataset) / len(loader)
    return trained, private, engine


# Opacus's ghost clipping: a first backward pass gives every record's gradient norm (fedrnn's
# recurrent layers compute it from Gram matrices, without per-record gradients), a second
# gives the sum of clipped gradients, which shared.nn replays without its time loop. For
# the LEAF LSTM the step takes 201 ms against 246 ms materialising per-record gradients
# (``fedrnn bench dp-step`` and ``--clipping hooks``, README); the clipping is the same
# (tests/shared/test_privacy.py).
CLIPPING = "ghost"
_UNUSED_CRITERION = torch.nn.MSELoss()  # make_private wants one; ``backward`` builds the loss


def backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: Batch,
             task: Task) -> float | None:
    """The gradients of one step in ``p.grad``: plain with no ``optimizer``, else each
    record's clipped (the sum; the DP optimizer adds noise and averages). The batch's mean
    loss, None for an empty (Poisson) batch, whose step is noise alone."""
    if optimizer is None:
        loss = task.loss(model, batch)
        loss.backward()
        return loss.item() if len(batch[1]) else None
    if len(batch[1]) == 0:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        return None
    per_record = task.record_losses(model, batch)
    loss = DPTensorFastGradientClipping(model, optimizer, per_record, "mean")
    loss.backward()
    return loss.item()


def evaluate(model: SequenceModel, data: SequenceTensors, config: RunConfig) -> dict[str, float]:
    loader = DataLoader(data.dataset(), batch_size=max(config.batch_size, 256), shuffle=False)
    return get_task(config.task).evaluate(model, loader, config)


def _optimizer(model: SequenceModel, config: RunConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
