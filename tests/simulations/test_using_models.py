"""A simulated run's directory used as a model: its card, predict, evaluate, generate."""

from __future__ import annotations

import csv
import io
import json

import pytest

from fedrnn.shared.cli import main


@pytest.mark.e2e
def test_a_finished_run_is_a_model_its_data_owner_can_use(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["simulate", "--dataset", "synthetic", "--task", "lm", "--rounds", "1",
                 "--clients", "2", "--hidden-size", "8", "--embedding-dim", "4",
                 "--out", str(run)]) == 0
    card = json.loads((run / "model.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert card["task"] == "lm" and card["tokenizer"] == "char"
    assert card["privacy"]["epsilon_spent"] == summary["privacy"]["epsilon_max"]
    assert card["privacy"]["level"] == "record" and card["normalisation"] is None
    # the model directory works away from its run: model.json and model.pt alone
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.json", "model.pt"):
        (model / name).write_bytes((run / name).read_bytes())
    texts = tmp_path / "held-out.jsonl"
    texts.write_text("".join(json.dumps({"id": f"m{i}", "text": t}) + "\n"
                             for i, t in enumerate(["the patient was seen", "no pain"])))
    capsys.readouterr()
    assert main(["predict", str(model), "--data", str(texts)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["id"] for r in rows] == ["m0", "m1"] and float(rows[0]["perplexity"]) > 1
    assert main(["evaluate", str(model), "--data", str(texts), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"num-examples", "loss", "accuracy", "perplexity"}
    generated = []
    for _ in range(2):
        assert main(["generate", str(run), "--prompt", "the", "--length", "20",
                     "--seed", "5"]) == 0
        generated.append(capsys.readouterr().out)
    assert generated[0] == generated[1] and generated[0].startswith("the")
    # the trained weights as an ONNX file, its card inside (checked against PyTorch by export)
    assert main(["export", str(model), "--onnx", str(tmp_path / "lm.onnx")]) == 0
    import onnxruntime

    meta = onnxruntime.InferenceSession(str(tmp_path / "lm.onnx")).get_modelmeta()
    assert json.loads(meta.custom_metadata_map["fedrnn.model_card"]) == card
