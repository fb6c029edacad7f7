"""The task registry: every --task choice is one registered object that builds a model,
trains on its loss and reports its own metrics; an unknown name is one clear error."""

import math

import pytest
import torch

from fedrnn.shared.config import TASKS, RunConfig
from fedrnn.shared.data import client_data, resolve
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.models import build_model
from fedrnn.shared.tasks import METRICS, Task, get_task, register_task, task_names


def test_the_task_flag_and_the_registry_name_the_same_tasks():
    assert sorted(TASKS) == sorted(task_names())
    assert set(METRICS) == set(TASKS)


def test_an_unknown_task_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        get_task("translate")
    message = str(error.value)
    assert "translate" in message
    assert all(name in message for name in TASKS)


def test_a_task_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_task("lm")(type("Other", (Task,), {"metrics": ("loss",)}))


@pytest.mark.parametrize("name", TASKS)
def test_each_task_builds_its_model_and_reports_its_metrics(name):
    config = resolve(RunConfig(dataset="synthetic", task=name, clients=2, hidden_size=8,
                               embedding_dim=4))
    task = get_task(name)
    assert task.name == name
    model = build_model(config)
    assert model.per_step == task.per_step
    data = client_data(config, 0)
    batch = (data.train.inputs, data.train.lengths, data.train.labels)
    loss = task.loss(model, batch)
    loss.backward()  # a training loss: finite, with gradients
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters())

    evaluation = (data.eval.inputs, data.eval.lengths, data.eval.labels)
    metrics = task.evaluate(model, [evaluation], config)
    assert set(metrics) - {"num-examples"} <= set(METRICS[name])
    assert metrics["num-examples"] > 0 and math.isfinite(metrics["loss"])
    scores = task.record_scores(model, evaluation)
    assert scores.shape == (len(data.eval),) and torch.isfinite(scores).all()
    released = {"loss", *task.released_metrics(loss=1.0, score=0.5)}
    assert released == set(METRICS[name])
