"""The server's strategy: Flower's FedAvg, FedAdam or a robust one (FedMedian, trimmed mean,
Krum), with fedrnn's metric aggregation and, for user-level DP, Flower's DP-FedAvg wrapper
made safe against what sites send (``UserLevelDP``).

Which combine with which DP level: record-level DP (each site's own DP-SGD) is
post-processed by any aggregation, so every strategy keeps it. User-level DP calibrates
its noise to a mean of clipped updates, in which one site moves the result by at most
clip / sampled; a median, trimmed mean or Krum has no such bound under Flower's noise
scale, so they are refused with it (``RunConfig``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedrnn.shared import protocol as P
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.randomness import SiteRandomness

EPSILON_MAX = "epsilon-max"
CLIENTS = "clients"


class UserLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's DP-FedAvg wrapper (server-side fixed clipping), with its clipping and its
    noise source made safe against what sites send and see.

    - Clipping: Flower's ``compute_clip_model_update`` divides by the update's norm, so a
      site that sends the global model back unchanged (a zero update, which is a valid
      update) stops the run with ``ZeroDivisionError``. Here a zero update is left as is.
    - Noise: Flower draws it from numpy's global generator, which the run's seed (sent to
      every site) determines; a site could regenerate the noise and subtract it. Here it
      comes from ``noise(server_round)``: a generator keyed by the operating system on a
      deployed server, by the run's seed in a simulation (whose researcher holds all).

    Everything else (sampling, FedAvg of the clipped updates, the noise's scale
    ``noise_multiplier * clipping_norm / sampled``) is Flower's.
    """

    def __init__(self, strategy: Strategy, *, noise: Callable[[int], SiteRandomness],
                 **kwargs: float | int) -> None:
        super().__init__(strategy, **kwargs)
        self.noise = noise

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        current = self.current_arrays.to_numpy_ndarrays()
        for reply in replies:
            record = reply.content[P.ARRAYS]
            update = [a - c for a, c in zip(record.to_numpy_ndarrays(), current, strict=True)]
            norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64)))
                                 for u in update))
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            reply.content[P.ARRAYS] = ArrayRecord(dict(zip(
                record.keys(), (Array(np.asarray(c + u * scale, dtype=c.dtype))
                                for c, u in zip(current, update, strict=True)), strict=True)))
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            std = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
            source = self.noise(server_round)
            aggregated = ArrayRecord({
                name: Array(a + source.gaussian(a.shape, std=std, dtype=_torch_dtype(a))
                            .numpy().astype(a.dtype))
                for name, a in zip(aggregated.keys(), aggregated.to_numpy_ndarrays(),
                                   strict=True)})
        return aggregated, metrics


def _torch_dtype(array: np.ndarray):  # noqa: ANN202
    import torch

    return torch.float64 if array.dtype == np.float64 else torch.float32


def build_strategy(config: RunConfig, *, available: int, server_draws: bool = True,
                   canaries: int = 0) -> Strategy:
    """Train on ``clients-per-round`` of ``available`` sites and ``canaries`` canary clients
    (0: all of them) and evaluate on ``eval-clients-per-round`` of the sites (0: as many
    as train, at most ``available``).

    ``server_draws`` (simulation): ``server.sampling.ClientSampler`` decides which sites,
    handing the strategy a grid that shows only the drawn nodes, so the strategy takes all
    of them (fraction 1). Otherwise (deployment) Flower's strategy waits for enough
    connected sites and samples them itself.

    With user-level DP, Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps the
    strategy: each site's whole update is clipped to ``user-clip-norm`` and Gaussian noise
    of std ``user-noise-multiplier * user-clip-norm / sampled`` is added to the mean, which
    therefore weights every site equally (``unit-weight``) instead of by its records.
    """
    train_k = config.clients_per_round or available + canaries
    eval_k = config.eval_per_round or available
    if train_k > available + canaries or eval_k > available:
        raise ConfigError(f"clients-per-round ({train_k}) and eval-clients-per-round "
                          f"({eval_k}) cannot exceed the {available} available clients")
    if server_draws:
        sampling = dict(fraction_train=1.0, min_train_nodes=train_k, fraction_evaluate=1.0,
                        min_evaluate_nodes=eval_k, min_available_nodes=0)
    else:  # Flower samples max(int(fraction * available), min_nodes): the minimum decides
        sampling = dict(fraction_train=train_k / available, min_train_nodes=train_k,
                        fraction_evaluate=eval_k / available, min_evaluate_nodes=eval_k,
                        min_available_nodes=max(train_k, eval_k))
    common = dict(
        **sampling,
        weighted_by_key=(P.UNIT_WEIGHT if config.mechanism.server_clips_and_noises
                         else P.NUM_EXAMPLES),
        arrayrecord_key=P.ARRAYS, configrecord_key=P.CONFIG,
        train_metrics_aggr_fn=aggregate_metrics,
        # Evaluation metrics are always weighted by what each site averaged over.
        evaluate_metrics_aggr_fn=lambda records, _key: aggregate_metrics(records,
                                                                         P.NUM_EXAMPLES),
    )
    if config.strategy == "fedadam":
        # Client updates are already DP; the server's Adam is post-processing.
        strategy: Strategy = FedAdam(eta=config.server_lr, eta_l=config.lr, **common)
    elif config.strategy == "fedmedian":
        strategy = FedMedian(**common)
    elif config.strategy == "trimmed-mean":
        strategy = FedTrimmedAvg(beta=config.trim_beta, **common)
    elif config.strategy == "krum":
        if train_k <= 2 * config.krum_byzantine + 2:
            raise ConfigError(f"krum with krum-byzantine {config.krum_byzantine} needs more "
                              f"than {2 * config.krum_byzantine + 2} sites per round, not "
                              f"{train_k}")
        strategy = Krum(num_malicious_nodes=config.krum_byzantine, **common)
    else:
        strategy = FedAvg(**common)
    if config.mechanism.server_clips_and_noises:
        strategy = UserLevelDP(
            strategy, noise=_noise_source(config, deployed=not server_draws),
            noise_multiplier=config.user_noise_multiplier,
            clipping_norm=config.user_clip_norm, num_sampled_clients=train_k)
    return strategy


def _noise_source(config: RunConfig, *, deployed: bool) -> Callable[[int], SiteRandomness]:
    """The user-level noise's generator for a round: keyed by the operating system on a
    deployed server (no site can predict it), by (seed, round) in a simulation (a seeded
    run, resumed or not, repeats bit for bit)."""
    if deployed:
        return lambda _round: SiteRandomness.from_os()
    return lambda server_round: SiteRandomness.from_seed(config.seed, server_round, 3)


def user_level_release(config: RunConfig, *, received: int, sampled: int,
                       available: int) -> tuple[float, float, int]:
    """The (noise multiplier, sampling rate, steps) of one user-level release.

    Flower scales the noise to ``sampled`` sites; when only ``received`` of them sent an
    update, one site's influence on the mean is ``clip/received``, so the effective noise
    multiplier shrinks to ``sigma * received / sampled``. The sampling rate is the share of
    sites sampled (Flower samples a fixed number without replacement; the Poisson analysis
    used here is the usual approximation for DP-FedAvg).
    """
    return (config.user_noise_multiplier * received / sampled, sampled / available, 1)


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the clients' metrics, with these exceptions:

    - ``epsilon`` becomes ``epsilon-max``, the largest cumulative spend among the clients;
    - NaN values (a metric undefined at a client) are left out of the mean;
    - ``num-examples`` is summed; ``clients`` counts the replies; ``unit-weight`` dropped.
    """
    rows = [next(iter(r.metric_records.values())) for r in records]
    out: dict[str, float] = {CLIENTS: len(rows), weight_key: sum(float(r[weight_key])
                                                                 for r in rows)}
    for key in rows[0]:
        if key in (weight_key, P.UNIT_WEIGHT):
            continue
        values = [float(r[key]) for r in rows]
        if key == P.EPSILON:
            out[EPSILON_MAX] = max(values)
            continue
        pairs = [(v, float(r[weight_key])) for v, r in zip(values, rows, strict=True)
                 if not math.isnan(v)]
        total = sum(w for _, w in pairs)
        if not pairs:
            out[key] = math.nan
        elif total > 0:
            out[key] = sum(v * w for v, w in pairs) / total
        else:
            out[key] = sum(v for v, _ in pairs) / len(pairs)
    return MetricRecord(out)
