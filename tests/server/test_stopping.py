import math

import pytest
import torch

from fedrnn.server import checkpoint
from fedrnn.server.stopping import EarlyStopping
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError


def _feed(stopping, values):
    """Rounds 1.. with the watched metric at ``values``; the round it stopped at, or None."""
    for server_round, value in enumerate(values, start=1):
        stopping.update(server_round, {stopping.metric: value})
        if stopping.stopped:
            return server_round
    return None


def test_the_default_metric_is_the_tasks_main_one_in_its_direction():
    auroc = EarlyStopping.of(RunConfig(task="classify", early_stopping_patience=2))
    assert (auroc.metric, auroc.higher_is_better) == ("auroc", True)
    lm = EarlyStopping.of(RunConfig(task="lm"))
    assert (lm.metric, lm.higher_is_better) == ("loss", False)
    mae = EarlyStopping.of(RunConfig(task="forecast"))
    assert (mae.metric, mae.higher_is_better) == ("mae", False)
    with pytest.raises(ConfigError, match="not a metric of task lm"):
        EarlyStopping.of(RunConfig(task="lm", early_stopping_metric="auroc"))


def test_stops_after_patience_rounds_without_improvement():
    loss = EarlyStopping.of(RunConfig(task="lm", early_stopping_patience=2))
    assert _feed(loss, [3.0, 2.0, 2.5, 1.9, 2.0, 2.1, 1.0]) == 6
    assert (loss.best, loss.best_round) == (1.9, 4)
    auroc = EarlyStopping.of(RunConfig(task="classify", early_stopping_patience=2))
    assert _feed(auroc, [0.6, 0.7, 0.65, 0.69, 0.9]) == 4  # upwards
    assert auroc.best_round == 2


def test_min_delta_and_undefined_rounds():
    stopping = EarlyStopping.of(RunConfig(task="lm", early_stopping_patience=2,
                                          early_stopping_min_delta=0.1))
    # 2.95 and 2.91 are not better by more than 0.1; NaN rounds count for nothing
    assert _feed(stopping, [3.0, math.nan, 2.95, math.nan, math.nan, 2.91]) == 6
    assert stopping.best_round == 1
    off = EarlyStopping.of(RunConfig(task="lm"))
    assert _feed(off, [1.0, 2.0, 3.0, 4.0]) is None and off.best_round == 1  # tracked only


def test_a_resumed_run_stops_where_the_uninterrupted_one_would(tmp_path):
    config = RunConfig(task="lm", early_stopping_patience=3)
    values = [3.0, 2.0, 2.2, 2.1, 2.3, 2.4]
    uninterrupted = EarlyStopping.of(config)
    assert _feed(uninterrupted, values) == 5
    before = EarlyStopping.of(config)
    _feed(before, values[:3])
    checkpoint.save(tmp_path, checkpoint.Checkpoint(
        server_round=3, weights={"w": torch.zeros(1)}, stopping=before.state_dict(),
        best_weights={"w": torch.ones(1)}))
    saved = checkpoint.load(tmp_path)
    after = EarlyStopping.of(config)
    after.load_state_dict(saved.stopping)
    assert saved.best_weights["w"].item() == 1.0
    for server_round, value in enumerate(values[3:], start=4):
        after.update(server_round, {"loss": value})
        if after.stopped:
            break
    assert (server_round, after.best_round) == (5, 2)
