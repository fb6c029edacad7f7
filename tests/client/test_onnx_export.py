"""``fedrnn export --onnx``: the torch.nn twin computes what fedrnn's layers compute, and
onnxruntime running the file computes what the PyTorch model computes."""

from __future__ import annotations

import json
import math
import sys

import onnxruntime as ort
import pytest
import torch

from fedrnn.client import onnx_export
from fedrnn.client.onnx_export import (
    CARD_KEY,
    IO_KEY,
    export_onnx,
    input_names,
    max_difference,
    output_name,
    portable,
)
from fedrnn.shared.cli import main
from fedrnn.shared.config import RunConfig
from fedrnn.shared.model_card import ModelCard, load_model, write_model
from fedrnn.shared.models import build_model
from fedrnn.shared.run_records import PrivacySummary

NO_DP = PrivacySummary(level="none", epsilon_max=math.inf, delta=None, accountant=None,
                       epsilon_target=None, noise_multiplier=None, clip_norm=None,
                       budget_epsilon=None, budget_delta=None, sites_out_of_budget=0,
                       ledger_dir=None, user_level=None)

# the heads that differ: one output per sequence (series or tokens in), one per step (tokens
# or series in)
TASKS = {
    "classify-series": dict(task="classify", labels="sick,well,unsure", features="hr,temp"),
    "classify-text": dict(task="classify", labels="neg,pos"),
    "lm": dict(task="lm"),
    "forecast": dict(task="forecast", features="hr,temp,spo2"),
}
CELLS = ["lstm", "gru", "rnn"]


def saved(directory, cell: str, task: str, **changes):
    """A model directory (model.json + model.pt) of an untrained, seeded two-layer network."""
    torch.manual_seed(3)
    config = RunConfig(model=cell, hidden_size=8, num_layers=2, embedding_dim=6, dp=False,
                       **TASKS[task], **changes)
    card = ModelCard.describe(config, NO_DP, reference_scaling=None)
    write_model(directory, card, build_model(config).state_dict())
    return directory


def inputs(card, model, batch, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    arrays = onnx_export.random_inputs(card, model, batch=batch, steps=steps,
                                       generator=generator)
    tensors = [torch.from_numpy(arrays[n]) for n in input_names(card)]
    lengths = tensors[1] if len(tensors) > 1 else torch.full((batch,), steps)
    return tensors[0], lengths


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("cell", CELLS)
def test_the_torch_layers_twin_computes_what_fedrnn_s_layers_compute(tmp_path, cell, task):
    card, model = load_model(saved(tmp_path, cell, task))
    twin = portable(model)
    assert isinstance(twin.rnn, {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU,
                                 "rnn": torch.nn.RNN}[cell])
    # in double precision the two differ by rounding alone: the same equations on the same
    # weights (in float32, oneDNN and fedrnn's own kernels round differently, ~1e-7)
    model, twin = model.double(), twin.double()
    for batch, steps in ((4, 9), (1, 3)):
        x, lengths = inputs(card, model, batch, steps)
        x = x if x.dtype == torch.long else x.double()
        with torch.no_grad():
            torch.testing.assert_close(twin(x, lengths), model(x, lengths), rtol=0, atol=1e-12)


def test_a_wrong_gate_order_would_be_seen(tmp_path):
    card, model = load_model(saved(tmp_path, "lstm", "lm"))
    twin = portable(model).double()
    with torch.no_grad():  # swap the input and forget gates' rows: a plausible mapping slip
        w = twin.rnn.weight_ih_l0
        w.copy_(torch.cat([w[8:16], w[:8], w[16:]]))
    x, lengths = inputs(card, model, 4, 9)
    with torch.no_grad():
        assert (twin(x, lengths) - model.double()(x, lengths)).abs().max() > 1e-3


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("cell", CELLS)
def test_onnxruntime_computes_what_the_pytorch_model_computes(tmp_path, cell, task):
    card, model = load_model(saved(tmp_path, cell, task,
                                   nonlinearity="relu" if task == "lm" else "tanh"))
    exported = export_onnx(card, model)
    assert exported.difference <= 1e-5
    # two other batch sizes and lengths than the export's example and its own check
    assert max_difference(exported.data, card, model, shapes=((6, 11), (2, 4)), seed=7) <= 1e-5
    session = ort.InferenceSession(exported.data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == input_names(card)
    (output,) = session.get_outputs()
    assert output.name == output_name(card)
    assert output.shape[0] == "batch" and session.get_inputs()[0].shape[:2] == ["batch", "steps"]


def test_the_file_carries_the_card_and_describes_its_inputs_and_outputs(tmp_path):
    card, model = load_model(saved(tmp_path, "gru", "classify-series"))
    session = ort.InferenceSession(export_onnx(card, model).data,
                                   providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert ModelCard.from_json(json.loads(meta[CARD_KEY])) == card
    io = json.loads(meta[IO_KEY])
    assert list(io["inputs"]) == ["series", "lengths"] and list(io["outputs"]) == ["class_logits"]
    assert "hr, temp" in io["inputs"]["series"] and "sick, well, unsure" in io["outputs"][
        "class_logits"]


def test_fedrnn_export_writes_the_file(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    saved(model_dir, "lstm", "lm")
    out = tmp_path / "tweets.onnx"
    assert main(["export", str(model_dir), "--onnx", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert CARD_KEY in session.get_modelmeta().custom_metadata_map
    assert [p.name for p in tmp_path.iterdir()] == ["model", "tweets.onnx"]  # no temporary


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    saved(model_dir, "gru", "forecast")
    out = tmp_path / "out.onnx"
    cases = [
        ([str(tmp_path / "empty"), "--onnx", str(out)], "not a directory"),
        ([str(tmp_path), "--onnx", str(out)], "no model.json"),
        ([str(model_dir), "--onnx", str(tmp_path / "out.txt")], "name a .onnx file"),
        ([str(model_dir), "--onnx", str(tmp_path / "no" / "out.onnx")], "does not exist"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2
        assert message in one_error_line(capsys)
    (model_dir / "model.pt").unlink()
    assert main(["export", str(model_dir), "--onnx", str(out)]) == 2
    assert "model.pt: missing" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_file_that_fails_its_check_is_never_written(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    saved(model_dir, "rnn", "classify-text")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(onnx_export, "max_difference", lambda *a, **k: 0.5)
    assert main(["export", str(model_dir), "--onnx", str(out)]) == 2
    assert "differs from the PyTorch model by 0.5" in one_error_line(capsys)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.onnx"]


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_without_the_export_extra_it_says_what_to_install(tmp_path, capsys, monkeypatch,
                                                          package):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    saved(model_dir, "gru", "lm")
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    assert main(["export", str(model_dir), "--onnx", str(tmp_path / "m.onnx")]) == 2
    line = one_error_line(capsys)
    assert package in line and 'pip install "fedrnn[export]"' in line
    assert not (tmp_path / "m.onnx").exists()
