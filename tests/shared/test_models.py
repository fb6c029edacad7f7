import itertools

import pytest
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.models import build_model
from fedrnn.shared.tasks import auroc, get_task

CASES = list(itertools.product(["gru", "lstm", "rnn"], ["classify", "lm", "forecast"]))


def _config(cell: str, task: str) -> RunConfig:
    if task == "lm":
        return RunConfig(model=cell, task=task, hidden_size=8, embedding_dim=4, num_layers=2)
    return RunConfig(model=cell, task=task, hidden_size=8, num_layers=2, labels="a,b,c",
                     features="x,y")


def _batch(config: RunConfig, batch: int = 4, width: int = 7):
    torch.manual_seed(0)
    lengths = torch.tensor([7, 3, 2, 5])[:batch]
    if config.task == "lm":
        inputs = torch.randint(1, 50, (batch, width))
    else:
        inputs = torch.randn(batch, width, 5)
    labels = torch.tensor([0, 2, 1, 0])[:batch]
    return inputs, lengths, labels


@pytest.mark.parametrize("cell,task", CASES)
def test_output_shapes(cell, task):
    config = _config(cell, task)
    model = build_model(config)
    inputs, lengths, _ = _batch(config)
    out = model(inputs, lengths)
    if task == "classify":
        assert out.shape == (4, 3)
    elif task == "lm":
        assert out.shape == (4, 7, model.head.out_features)
    else:
        assert out.shape == (4, 7, 2)


@pytest.mark.parametrize("cell,task", CASES)
def test_padding_changes_nothing(cell, task):
    """Overwrite every padded position with garbage: losses, metrics and valid outputs
    must stay exactly the same."""
    config = _config(cell, task)
    model = build_model(config).eval()
    inputs, lengths, labels = _batch(config)
    garbage = inputs.clone()
    pad = torch.arange(inputs.shape[1])[None, :] >= lengths[:, None]
    if task == "lm":
        garbage[pad] = 49
    else:
        garbage[pad] = 1e3
    batch, noisy = (inputs, lengths, labels), (garbage, lengths, labels)
    with torch.no_grad():
        objective = get_task(task)
        assert torch.equal(objective.loss(model, batch), objective.loss(model, noisy))
        assert (objective.evaluate(model, [batch], config)
                == objective.evaluate(model, [noisy], config))
        if task == "classify":
            assert torch.equal(model(inputs, lengths), model(garbage, lengths))


def test_empty_batch_has_zero_loss():
    config = _config("gru", "classify")
    model = build_model(config)
    inputs, lengths, labels = _batch(config)
    empty = (inputs[:0], lengths[:0], labels[:0])
    assert get_task("classify").loss(model, empty).item() == 0.0


def test_saved_weights_load_into_torch_layer():
    config = RunConfig(model="lstm", task="classify", hidden_size=8, labels="a,b", features="x")
    model = build_model(config).eval()
    lstm = torch.nn.LSTM(3, 8, batch_first=True)
    state = {k.removeprefix("rnn."): v for k, v in model.state_dict().items()
             if k.startswith("rnn.")}
    lstm.load_state_dict(state)
    x = torch.randn(2, 5, 3)
    assert torch.allclose(lstm(x)[0], model.rnn(x)[0], atol=1e-5)


def test_auroc_matches_pair_counting():
    torch.manual_seed(1)
    scores = torch.rand(40).round(decimals=1).numpy()  # ties included
    labels = (torch.rand(40) > 0.6).long().numpy()
    pairs = [(s_p > s_n) + 0.5 * (s_p == s_n) for s_p, y_p in zip(scores, labels, strict=True)
             if y_p == 1 for s_n, y_n in zip(scores, labels, strict=True) if y_n == 0]
    assert auroc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
    assert auroc(scores, labels * 0) is None
