import math

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedrnn.server.strategy import aggregate_metrics, build_strategy
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError


def _reply(**metrics):
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_aggregate_metrics_weights_skips_nan_and_takes_max_epsilon():
    out = aggregate_metrics([
        _reply(**{"num-examples": 10, "loss": 1.0, "auroc": math.nan, "epsilon": 2.0}),
        _reply(**{"num-examples": 30, "loss": 2.0, "auroc": 0.8, "epsilon": 5.0}),
    ], "num-examples")
    assert out["loss"] == pytest.approx(1.75)
    assert out["auroc"] == pytest.approx(0.8)  # the NaN site is left out
    assert out["epsilon-max"] == 5.0 and "epsilon" not in out
    assert out["num-examples"] == 40 and out["clients"] == 2


def test_strategy_takes_every_drawn_client():
    # The sampler draws the clients; the strategy must take all nodes of the view it gets.
    strategy = build_strategy(RunConfig(clients_per_round=3), available=10)
    assert isinstance(strategy, FedAvg) and strategy.min_train_nodes == 3
    assert strategy.fraction_train == 1.0 and strategy.min_evaluate_nodes == 3
    assert build_strategy(RunConfig(), available=10).min_evaluate_nodes == 10
    # on a deployment Flower's strategy samples (and waits for) the connected sites itself
    deployed = build_strategy(RunConfig(clients_per_round=3), available=10, server_draws=False)
    assert deployed.fraction_train == 0.3 and deployed.min_available_nodes == 3
    assert isinstance(build_strategy(RunConfig(strategy="fedadam"), available=4), FedAdam)
    with pytest.raises(ConfigError, match="cannot exceed"):
        build_strategy(RunConfig(clients_per_round=11), available=10)
