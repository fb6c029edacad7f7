"""shared.nn: drop-in equivalence with torch's layers, and exact per-sample gradients."""

import itertools
import warnings

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from shared import nn as dpnn

MODES = ("LSTM", "GRU", "RNN")


def _pair(mode, **kwargs):
    torch.manual_seed(0)
    ref = getattr(nn, mode)(5, 7, **kwargs)
    mine = getattr(dpnn, mode)(5, 7, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref.eval(), mine.eval()


def _close(a, b):
    if isinstance(a, tuple):
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    return torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mode,layers,batch_first,bidirectional,bias", list(itertools.product(
    MODES, [1, 2], [True, False], [False, True], [True, False])))
def test_same_outputs_states_and_state_dict_as_torch(mode, layers, batch_first, bidirectional,
                                                     bias):
    ref, mine = _pair(mode, num_layers=layers, batch_first=batch_first,
                      bidirectional=bidirectional, bias=bias, dropout=0.3 if layers > 1 else 0)
    assert list(mine.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(mine.state_dict())  # both ways
    x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
    out_ref, state_ref = ref(x)
    out_mine, state_mine = mine(x)
    assert _close(out_ref, out_mine) and _close(state_ref, state_mine)
    # initial states are accepted as torch accepts them
    directions = 2 if bidirectional else 1
    h0 = torch.randn(layers * directions, 3, 7)
    hx = (h0, torch.randn_like(h0)) if mode == "LSTM" else h0
    assert _close(ref(x, hx)[0], mine(x, hx)[0]) and _close(ref(x, hx)[1], mine(x, hx)[1])


def test_relu_rnn_matches_torch():
    ref, mine = _pair("RNN", nonlinearity="relu", batch_first=True)
    x = torch.randn(2, 4, 5)
    assert _close(ref(x), mine(x))


@pytest.mark.parametrize("mode,bidirectional", list(itertools.product(MODES, [False, True])))
def test_padded_batches_equal_sequences_run_alone(mode, bidirectional):
    _, mine = _pair(mode, num_layers=2, batch_first=True, bidirectional=bidirectional)
    lengths = torch.tensor([6, 2, 4])
    x = torch.randn(3, 6, 5)
    x_garbage = x.clone()
    for i, n in enumerate(lengths):
        x_garbage[i, n:] = 100.0  # padding content must not matter
    out, state = mine(x_garbage, lengths=lengths)
    h_n = state[0] if mode == "LSTM" else state
    for i, n in enumerate(lengths.tolist()):
        alone, alone_state = mine(x[i: i + 1, :n])
        alone_h = alone_state[0] if mode == "LSTM" else alone_state
        assert torch.allclose(out[i, :n], alone[0], atol=1e-5)
        assert torch.all(out[i, n:] == 0)
        assert torch.allclose(h_n[:, i], alone_h[:, 0], atol=1e-5)


class _Head(nn.Module):
    def __init__(self, mode, layers, batch_first, bidirectional):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(dpnn, mode)(4, 6, num_layers=layers, batch_first=batch_first,
                                       bidirectional=bidirectional)
        self.head = nn.Linear(12 if bidirectional else 6, 1)

    def forward(self, x, lengths):
        out, _ = self.rnn(x, lengths=lengths)  # time-first stays time-first, as Opacus
        return self.head(out).squeeze(-1).sum(dim=1 if self.batch_first else 0)  # [B]


@pytest.mark.parametrize("mode,layers,batch_first,bidirectional", list(itertools.product(
    MODES, [1, 2], [True, False], [False, True])))
def test_per_sample_gradients_equal_a_per_example_loop(mode, layers, batch_first,
                                                       bidirectional):
    torch.manual_seed(1)
    model = _Head(mode, layers, batch_first, bidirectional)
    reference = _Head(mode, layers, batch_first, bidirectional)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(5, 7, 4)
    lengths = torch.tensor([7, 3, 5, 1, 6])  # padded batch
    gsm = GradSampleModule(model, batch_first=batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = x if batch_first else x.transpose(0, 1)
        gsm(inputs, lengths).pow(2).mean().backward()  # mean loss: Opacus rescales
    for i in range(5):
        reference.zero_grad()
        xi = x[i: i + 1] if batch_first else x[i: i + 1].transpose(0, 1)
        reference(xi, lengths[i: i + 1]).pow(2).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5, rtol=1e-4), name
