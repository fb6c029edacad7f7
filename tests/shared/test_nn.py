"""fedrnn.shared.nn: drop-in equivalence with torch's layers, and exact per-sample gradients."""

import itertools
import subprocess
import sys
import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping as Ghost,
)
from torch import nn

from fedrnn.shared import nn as dpnn
from fedrnn.shared.nn import autograd, onednn, samplers
from fedrnn.shared.nn.records import _Pass

dpnn.register_with_opacus()  # as training does, where it imports Opacus

MODES = ("LSTM", "GRU", "RNN")


@pytest.fixture(params=["onednn", "own-loop"])
def lstm_forward(request):
    """Both ways the LSTM's forward direction runs: oneDNN's fused primitive (as torch's own
    layer on the CPU) and shared.nn's own loop (oneDNN off, for torch's reference too)."""
    with torch.backends.mkldnn.flags(enabled=request.param == "onednn"):
        yield request.param


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
                                                     bias, lstm_forward):
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
    def __init__(self, mode, layers, batch_first, bidirectional, hidden=6):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(dpnn, mode)(4, hidden, num_layers=layers, batch_first=batch_first,
                                       bidirectional=bidirectional)
        self.head = nn.Linear(2 * hidden if bidirectional else hidden, 1)

    def forward(self, x, lengths):
        out, _ = self.rnn(x, lengths=lengths)  # time-first stays time-first, as Opacus
        return self.head(out).squeeze(-1).sum(dim=1 if self.batch_first else 0)  # [B]


@pytest.mark.parametrize("mode,layers,batch_first,bidirectional", list(itertools.product(
    MODES, [1, 2], [True, False], [False, True])))
def test_per_sample_gradients_equal_a_per_example_loop(mode, layers, batch_first,
                                                       bidirectional, lstm_forward):
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


@pytest.mark.parametrize("mode,layers,batch_first,bidirectional,bias", list(itertools.product(
    MODES, [1, 2], [True, False], [False, True], [True, False])))
def test_gradients_equal_torchs(mode, layers, batch_first, bidirectional, bias, lstm_forward):
    """The hand-written backward pass: weights, input and initial states, as torch's."""
    ref, mine = _pair(mode, num_layers=layers, batch_first=batch_first,
                      bidirectional=bidirectional, bias=bias)
    ref.train(), mine.train()
    directions = 2 if bidirectional else 1
    x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
    h0 = torch.randn(layers * directions, 3, 7)
    weights_out = torch.randn(x.shape[0], x.shape[1], 7 * directions)
    weights_h = torch.randn_like(h0)
    grads = []
    for layer in (ref, mine):
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        ci = torch.randn_like(h0, generator=torch.Generator().manual_seed(3)).requires_grad_()
        out, state = layer(xi, (hi, ci) if mode == "LSTM" else hi)
        h_n, c_n = state if mode == "LSTM" else (state, None)
        loss = (out * weights_out).sum() + (h_n * weights_h).sum()
        if c_n is not None:
            loss = loss + (c_n * weights_h).pow(2).sum()
        loss.backward()
        inputs = [xi.grad, hi.grad] + ([ci.grad] if mode == "LSTM" else [])
        grads.append(inputs + [p.grad for p in layer.parameters()])
    for name, a, b in zip(["input", "h0", "c0"][: 3 if mode == "LSTM" else 2]
                          + [n for n, _ in mine.named_parameters()], *grads, strict=False):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_the_lstm_runs_its_forward_direction_on_onednn_and_falls_back_on_a_surprise(
        monkeypatch):
    torch.manual_seed(0)
    ref, mine = _pair("LSTM", num_layers=2)
    x = torch.randn(6, 3, 5)
    mine.train()
    taken = []
    real = onednn._lstm_forward_onednn

    def spy(*args, **kwargs):
        saved = real(*args, **kwargs)
        taken.append(saved is not None)
        return saved

    monkeypatch.setattr(autograd, "_lstm_forward_onednn", spy)
    out, _ = mine(x)
    assert taken == [True, True]
    with torch.no_grad():  # no workspace asked for: outputs and final states still torch's
        assert _close(mine(x), ref(x)) and taken == [True] * 4
    # A workspace laid out otherwise than expected (here: a wrong row length) is detected,
    # the layer is not asked again, and shared.nn's own loop gives the same result.
    taken.clear()
    monkeypatch.setattr(onednn, "_onednn_ld", lambda width: width + 16)
    monkeypatch.setattr(onednn, "_ONEDNN_REFUSED", set())
    again, _ = mine(x)
    assert taken == [False, False] and sorted(onednn._ONEDNN_REFUSED) == [7]
    assert torch.allclose(again, out, atol=1e-5) and torch.allclose(again, ref(x)[0], atol=1e-5)


def _opacus_step(gsm, x, lengths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm(x, lengths).pow(2).mean().backward()
    return gsm


def test_under_opacus_plain_gradient_is_kept_and_earlier_samples_are_untouched():
    torch.manual_seed(2)
    model = _Head("LSTM", 2, True, False)
    plain = _Head("LSTM", 2, True, False)
    plain.load_state_dict(model.state_dict())
    x, lengths = torch.randn(5, 7, 4), torch.tensor([7, 3, 5, 1, 6])
    plain(x, lengths).pow(2).mean().backward()
    gsm = GradSampleModule(model, batch_first=True)
    _opacus_step(gsm, x, lengths)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        # p.grad is what autograd gives without Opacus, and the mean of the per-sample
        # gradients (Opacus scales those by the batch size for a mean loss)
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
        assert torch.allclose(p.grad_sample.mean(0), q.grad, atol=1e-6, rtol=1e-4), name
    first = {name: p.grad_sample for name, p in model.named_parameters()}
    copies = {name: g.clone() for name, g in first.items()}
    for p in model.parameters():
        p.grad, p.grad_sample = None, None
    model.rnn.weight_hh_l0.data.mul_(0.5)  # a second step with other weights
    _opacus_step(gsm, x, lengths)
    for name, g in first.items():  # the layer reuses its own buffers, never Opacus's
        assert torch.equal(g, copies[name]), name
    assert not torch.equal(model.rnn.weight_hh_l0.grad_sample, copies["rnn.weight_hh_l0"])


def test_a_training_pass_leaves_nothing_alive():
    """The per-pass record is freed with the graph, with or without a backward pass (a
    reference cycle through autograd's nodes would keep every step's tensors alive)."""
    import gc
    import weakref

    layer = dpnn.LSTM(4, 6, batch_first=True).train()
    out, state = layer(torch.randn(2, 3, 4))
    record = weakref.ref(layer._pass)
    out.sum().backward()
    del out, state
    layer._pass = None
    gc.collect()
    assert record() is None
    out, state = layer(torch.randn(2, 3, 4))  # forward only, then dropped
    record = weakref.ref(layer._pass)
    del out, state
    layer._pass = None
    gc.collect()
    assert record() is None


def _private_step(mode, model, x, lengths, clip):
    """One DP step with zero noise in Opacus's ``hooks`` or ``ghost`` mode; the gradients
    it applied (clipped per sample, averaged)."""
    from opacus import PrivacyEngine
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(x, lengths), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode,
            criterion=nn.MSELoss())
        module, optimizer = private[0], private[1]
        per_sample = module(x, lengths).pow(2)  # [B]
        if mode == "ghost":
            DPTensorFastGradientClipping(module, optimizer, per_sample, "mean").backward()
        else:
            per_sample.mean().backward()
        optimizer.step()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [1e-3, 1e3])  # every sample clipped / none
# per-sample norms from per-sample gradients (hidden 6) or from Gram matrices (16)
@pytest.mark.parametrize("hidden", [6, 16])
def test_ghost_clipping_applies_the_same_clipped_gradient_as_per_sample_clipping(mode, clip,
                                                                                hidden):
    torch.manual_seed(4)
    x = torch.randn(5, 7, 4)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    hooks = _Head(mode, 2, True, True, hidden)
    ghost = _Head(mode, 2, True, True, hidden)
    ghost.load_state_dict(hooks.state_dict())
    expected = _private_step("hooks", hooks, x, lengths, clip)
    got = _private_step("ghost", ghost, x, lengths, clip)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-7, rtol=1e-4), name


@pytest.mark.parametrize("steps,gates,width", [(3, 40, 30), (30, 8, 4)])  # Gram / direct
def test_per_sample_norms_both_ways(steps, gates, width):
    d_g, operand = torch.randn(steps, 6, gates), torch.randn(steps, 6, width)
    layer = dpnn.GRU(width, gates // 3 or 1)
    norms = samplers._sample_norms(layer, "weight_hh_l0", d_g, operand)
    expected = torch.einsum("tbg,tbi->bgi", d_g, operand).flatten(1).norm(dim=1)
    assert torch.allclose(norms, expected, rtol=1e-4)


def test_a_second_backward_pass_that_is_not_a_rescaling_is_computed_afresh():
    ref, mine = _pair("LSTM", num_layers=2)
    ref.train(), mine.train()
    x = torch.randn(6, 3, 5)
    grads = []
    for layer in (ref, mine):
        out, _ = layer(x)
        out.pow(2).sum().backward(retain_graph=True)
        first = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        out[:2].sum().backward()  # other steps weighted otherwise: no per-sample ratio
        grads.append(first + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_batch_memory_manager_splits_a_batch_without_changing_the_update(mode):
    """Opacus's BatchMemoryManager (virtual steps over physical batches of 3): the same
    clipped, averaged gradient as the whole batch at once."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(5)
    x, lengths = torch.randn(8, 6, 4), torch.tensor([6, 2, 5, 1, 6, 3, 4, 6])
    updates = []
    for physical in (8, 3):
        torch.manual_seed(6)
        model = _Head("GRU", 2, True, False)
        before = [p.detach().clone() for p in model.parameters()]
        loader = DataLoader(TensorDataset(x, lengths), batch_size=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.1,
                poisson_sampling=False, grad_sample_mode=mode, criterion=nn.MSELoss())
            module, optimizer, loader = private[0], private[1], private[-1]
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                    optimizer=optimizer) as batches:
                for xb, lb in batches:
                    optimizer.zero_grad()
                    per_sample = module(xb, lb).pow(2)
                    if mode == "ghost":
                        DPTensorFastGradientClipping(module, optimizer, per_sample,
                                                     "mean").backward()
                    else:
                        per_sample.mean().backward()
                    optimizer.step()
        updates.append([b - p.detach() for b, p in zip(before, model.parameters(),
                                                       strict=True)])
    for whole, split in zip(*updates, strict=True):
        assert whole.abs().sum() > 0
        assert torch.allclose(whole, split, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_stacked_layers_with_dropout_leave_nothing_alive_under_opacus(mode):
    """A layer's input carries the graph below it; the per-pass record must not keep it
    (a cycle through autograd's nodes would hold every step's tensors for good)."""
    import gc
    import weakref

    records = []
    for _ in range(2):
        model = _Head("LSTM", 2, True, True)
        model.rnn.dropout = 0.3
        real = _Pass.__init__

        def spy(self, *args, _real=real, **kwargs):
            _real(self, *args, **kwargs)
            records.append(weakref.ref(self))

        _Pass.__init__ = spy
        try:
            _private_step(mode, model, torch.randn(4, 5, 4), torch.tensor([5, 2, 4, 1]), 1.0)
        finally:
            _Pass.__init__ = real
        del model
    gc.collect()
    assert records and all(r() is None for r in records)


def test_loss_through_the_final_state_only_trains_as_torch():
    ref, mine = _pair("GRU", num_layers=2)
    ref.train(), mine.train()
    x = torch.randn(6, 3, 5)
    for layer in (ref, mine):
        layer(x)[1].pow(2).sum().backward()
    for a, b in zip(ref.parameters(), mine.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_under_opacus_a_loss_that_skips_the_output_sequence_is_refused():
    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = dpnn.GRU(4, 6, batch_first=True)

        def forward(self, x):
            out, h_n = self.rnn(x)
            return h_n[-1].pow(2).sum(1) + 0 * out.sum((1, 2))  # output's gradient is zero

    gsm = GradSampleModule(LastState(), batch_first=True)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="output sequence"):
        warnings.simplefilter("ignore")
        gsm(torch.randn(3, 5, 4)).mean().backward()


def test_frozen_weights_get_no_gradient_and_inputs_changed_in_place_are_an_error():
    model = _Head("LSTM", 1, True, False)
    model.rnn.weight_ih_l0.requires_grad_(False)
    gsm = _opacus_step(GradSampleModule(model, batch_first=True), torch.randn(3, 4, 4),
                       torch.tensor([4, 2, 3]))
    assert model.rnn.weight_ih_l0.grad is None
    assert model.rnn.weight_hh_l0.grad_sample.shape[0] == 3
    del gsm
    layer = dpnn.LSTM(4, 6).train()
    x = torch.randn(5, 2, 4, requires_grad=True)
    y = x * 1.0
    out, _ = layer(y)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("trainer", ["client", "bench"])
def test_every_trainer_registers_the_layers_with_opacus_and_the_layers_alone_do_not(trainer):
    # Importing the layers does not import Opacus (the server only holds weights); the code
    # that trains them under Opacus registers them: the client's training module as it
    # imports Opacus, the benchmark where it builds its PrivacyEngine. A fresh interpreter,
    # so that nothing else has registered them.
    code = f"""
import sys
from fedrnn.shared import nn as dpnn
assert "opacus" not in sys.modules
if {trainer == "client"}:
    import fedrnn.client.training
else:
    from fedrnn.simulations.bench import StepSpec, make_step
    make_step("fedrnn", StepSpec(batch=2, seq_len=3, hidden=4, layers=1, embedding=2))()
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping as Ghost)
for layer in (dpnn.LSTM, dpnn.GRU, dpnn.RNN, dpnn.Embedding):
    assert layer in GradSampleModule.GRAD_SAMPLERS, layer
for layer in (dpnn.LSTM, dpnn.GRU, dpnn.RNN):
    assert layer in Ghost.NORM_SAMPLERS, layer
GradSampleModule(dpnn.LSTM(3, 4))  # supported: no error
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_registering_twice_changes_nothing():
    before = (dict(GradSampleModule.GRAD_SAMPLERS), dict(Ghost.NORM_SAMPLERS))
    dpnn.register_with_opacus()
    assert (dict(GradSampleModule.GRAD_SAMPLERS), dict(Ghost.NORM_SAMPLERS)) == before
    assert GradSampleModule.GRAD_SAMPLERS[dpnn.GRU] is samplers._recurrent_grad_sample
    assert Ghost.NORM_SAMPLERS[dpnn.GRU] is samplers._recurrent_norm_sample


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_layer_that_reaches_opacus_unregistered_is_refused_by_name(mode, monkeypatch):
    # Unregistered, Opacus falls back to functorch, which fails inside the layer with an
    # error that does not say why; the layer's backward pass names the missing call first.
    monkeypatch.delitem(GradSampleModule.GRAD_SAMPLERS, dpnn.LSTM)
    monkeypatch.delitem(Ghost.NORM_SAMPLERS, dpnn.LSTM)
    with pytest.raises(RuntimeError, match=r"register_with_opacus\(\)"):
        _private_step(mode, _Head("LSTM", 1, True, False), torch.randn(3, 4, 4),
                      torch.tensor([4, 2, 3]), 1.0)
