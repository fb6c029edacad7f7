"""Using a trained model: predict, evaluate and generate on models saved in tmp_path."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

from fedrnn.client.inference import evaluate, generate, predict
from fedrnn.shared.cli import main
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.model_card import ModelCard, load_model, write_model
from fedrnn.shared.models import build_model
from fedrnn.shared.run_records import PrivacySummary

NO_DP = PrivacySummary(level="none", epsilon_max=math.inf, delta=None, accountant=None,
                       epsilon_target=None, noise_multiplier=None, clip_norm=None,
                       budget_epsilon=None, budget_delta=None, sites_out_of_budget=0,
                       ledger_dir=None, user_level=None)


def saved(directory, config: RunConfig, scaling=None):
    """A model directory (model.json + model.pt) of an untrained, seeded network."""
    torch.manual_seed(1)
    card = ModelCard.describe(config, NO_DP, reference_scaling=scaling)
    write_model(directory, card, build_model(config).state_dict())
    return directory


def rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


CLASSIFY = RunConfig(task="classify", labels="sick,well", features="hr,temp", hidden_size=8,
                     dp=False)


def test_classify_gives_each_record_of_the_file_its_probabilities_and_label(tmp_path,
                                                                            series_csv):
    card, model = load_model(saved(tmp_path, CLASSIFY))
    out = predict(card, model, series_csv)
    assert out.columns == ["client", "sequence_id", "p_sick", "p_well", "label"]
    # one row per record, in the file's order, with the file's own ids
    assert [(r[0], r[1]) for r in out.rows] == [(f"ward-{s % 2}", f"p{s}") for s in range(24)]
    for row in out.rows:
        assert row[2] + row[3] == pytest.approx(1.0)
        assert row[4] == ("sick" if row[2] > row[3] else "well")


def test_evaluate_reports_the_task_metrics_consistent_with_predict(tmp_path, series_csv):
    card, model = load_model(saved(tmp_path, CLASSIFY))
    metrics = evaluate(card, model, series_csv)
    assert list(metrics) == ["num-examples", "loss", "accuracy", "auroc"]
    truth = ["sick" if s % 3 == 0 else "well" for s in range(24)]
    predicted = [r[4] for r in predict(card, model, series_csv).rows]
    assert metrics["num-examples"] == 24
    assert metrics["accuracy"] == pytest.approx(
        sum(p == t for p, t in zip(predicted, truth, strict=True)) / 24)
    p_true = [r[2] if t == "sick" else r[3]
              for r, t in zip(predict(card, model, series_csv).rows, truth, strict=True)]
    assert metrics["loss"] == pytest.approx(-sum(math.log(p) for p in p_true) / 24, rel=1e-5)


def test_forecast_standardises_each_client_by_its_own_statistics(tmp_path):
    """Client b's values are client a's times 10 plus 100: standardised per client, both
    clients' inputs are the same, so b's predictions are a's in b's units."""
    config = RunConfig(task="forecast", features="x,y", hidden_size=8, dp=False)
    card, model = load_model(saved(tmp_path, config))
    assert card.normalisation == "site"
    lines = ["client,sequence_id,time,x,y"]
    for client, scale, shift in (("a", 1.0, 0.0), ("b", 10.0, 100.0)):
        for seq in range(3):
            for t in range(4 + seq):
                x, y = math.sin(t + seq), 0.5 * t - seq
                lines.append(f"{client},s{seq},{t},{x * scale + shift},{y * scale + shift}")
    path = tmp_path / "series.csv"
    path.write_text("\n".join(lines) + "\n")
    out = predict(card, model, path)
    assert out.columns == ["client", "sequence_id", "next_x", "next_y"]
    a = [r for r in out.rows if r[0] == "a"]
    b = [r for r in out.rows if r[0] == "b"]
    assert [r[1] for r in a] == [r[1] for r in b] == ["s0", "s1", "s2"]
    for ra, rb in zip(a, b, strict=True):
        assert rb[2] == pytest.approx(ra[2] * 10 + 100, rel=1e-5)
        assert rb[3] == pytest.approx(ra[3] * 10 + 100, rel=1e-5)
    # without the client column the file is one site: one set of statistics for all
    pooled_lines = ["sequence_id,time,x,y"] + [
        f"{client}{rest}" for client, rest in (line.split(",", 1) for line in lines[1:])]
    path.write_text("\n".join(pooled_lines) + "\n")
    pooled = predict(card, model, path)
    assert pooled.columns == ["sequence_id", "next_x", "next_y"]
    assert pooled.rows[3][0] == "bs0"
    assert pooled.rows[3][1] != pytest.approx(b[0][2], rel=1e-3)


def test_forecast_with_reference_values_reports_the_file_s_units(tmp_path):
    config = RunConfig(task="forecast", features="x", hidden_size=4, dp=False)
    card, model = load_model(saved(tmp_path, config, scaling={"x": (100.0, 10.0)}))
    path = tmp_path / "one.csv"
    path.write_text("sequence_id,time,x\nq,0,90\nq,1,110\n")
    out = predict(card, model, path)
    with torch.no_grad():
        z = model(torch.tensor([[[-1.0, 1, 0], [1.0, 1, math.log1p(1) / 5]]]),
                  torch.tensor([2]))[0, -1, 0].item()
    assert out.rows == [["q", pytest.approx(100 + 10 * z, rel=1e-5)]]


LM = RunConfig(task="lm", hidden_size=8, embedding_dim=4, dp=False)


def test_lm_gives_each_text_its_loss_and_perplexity_identified_by_id_or_line(tmp_path):
    card, model = load_model(saved(tmp_path, LM))
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "hello there"}\n\n{"text": "good day"}\n')
    out = predict(card, model, path)
    assert out.columns == ["line", "loss", "perplexity"]
    assert [r[0] for r in out.rows] == ["1", "3"]  # the blank line is not a record
    for _, loss, perplexity in out.rows:
        assert loss > 0 and perplexity == pytest.approx(math.exp(loss))
    path.write_text('{"id": "m1", "text": "hello"}\n{"id": "m2", "text": "bye"}\n')
    assert [r[0] for r in predict(card, model, path).rows] == ["m1", "m2"]


def test_generate_with_one_seed_gives_one_text(tmp_path):
    card, model = load_model(saved(tmp_path, LM))
    first = generate(card, model, "The", length=40, temperature=1.0, top_k=0, seed=3)
    assert len(first) > 0
    assert generate(card, model, "The", length=40, temperature=1.0, top_k=0, seed=3) == first
    texts = {generate(card, model, "The", length=40, temperature=1.0, top_k=5, seed=s)
             for s in range(4)}
    assert len(texts) > 1  # the seed is what fixes it
    greedy = generate(card, model, "The", length=10, temperature=0.0, top_k=0, seed=0)
    assert greedy == generate(card, model, "The", length=10, temperature=0.0, top_k=0, seed=9)


def test_generate_refuses_a_hashed_word_model(tmp_path):
    card, model = load_model(saved(tmp_path, LM.replace(tokenizer="word", vocab_size=20)))
    with pytest.raises(ConfigError, match="cannot be turned back into text"):
        generate(card, model, "The", length=5, temperature=1.0, top_k=0, seed=0)


# --- the commands ----------------------------------------------------------------------------

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_file_that_does_not_fit_the_model_exits_2_with_one_line(tmp_path, series_csv,
                                                                  text_jsonl, capsys):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    saved(model_dir, CLASSIFY)
    assert main(["predict", str(model_dir), "--data", str(text_jsonl)]) == 2
    assert "holds text, but the model is on numeric sequences" in one_error_line(capsys)
    other = tmp_path / "other.csv"
    other.write_text("sequence_id,time,hr,bp\ns,0,1,2\n")
    assert main(["evaluate", str(model_dir), "--data", str(other)]) == 2
    assert "differ from the run's features hr,temp" in one_error_line(capsys)
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("sequence_id,time,hr,temp\ns,0,1,2\n")
    assert main(["evaluate", str(model_dir), "--data", str(unlabelled)]) == 2
    assert "needs a 'label' for every record" in one_error_line(capsys)
    assert main(["generate", str(model_dir), "--prompt", "hi"]) == 2
    assert "needs a language model" in one_error_line(capsys)
    assert main(["predict", str(tmp_path), "--data", str(series_csv)]) == 2
    assert "no model.json" in one_error_line(capsys)


def test_predict_prints_csv_or_writes_the_file_out_names(tmp_path, series_csv, capsys):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    saved(model_dir, CLASSIFY)
    assert main(["predict", str(model_dir), "--data", str(series_csv)]) == 0
    printed = rows(capsys.readouterr().out)
    assert len(printed) == 24 and printed[0]["sequence_id"] == "p0"
    assert float(printed[0]["p_sick"]) + float(printed[0]["p_well"]) == pytest.approx(1.0)
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(model_dir), "--data", str(series_csv), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sequence_id"] for r in lines] == [r["sequence_id"] for r in printed]
    assert main(["predict", str(model_dir), "--data", str(series_csv), "--out",
                 str(tmp_path / "p.txt")]) == 2
    assert ".csv or a .jsonl" in one_error_line(capsys)
    assert main(["evaluate", str(model_dir), "--data", str(series_csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num-examples"] == 24


@pytest.mark.parametrize("flags, problem", [
    ({"length": 0}, "--length 0"), ({"length": -3}, "--length -3"),
    ({"temperature": -1.0}, "--temperature"), ({"temperature": math.inf}, "--temperature"),
    ({"temperature": math.nan}, "--temperature"), ({"top_k": -1}, "--top-k -1"),
])
def test_generate_names_the_flag_it_refuses(tmp_path, flags, problem):
    card, model = load_model(saved(tmp_path, LM))
    settings = {"length": 5, "temperature": 1.0, "top_k": 0, "seed": 0, **flags}
    with pytest.raises(ConfigError, match=problem):
        generate(card, model, "The", **settings)


class _AlwaysA(torch.nn.Module):
    """A language model that always predicts "a" and records how many steps it reads."""

    def __init__(self, token: int, vocab: int) -> None:
        super().__init__()
        self.token, self.vocab, self.steps = token, vocab, []

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.steps.append(x.shape[1])
        logits = torch.zeros(x.shape[0], x.shape[1], self.vocab)
        logits[..., self.token] = 1.0
        return logits


def test_generate_reads_at_most_max_len_tokens_a_step_however_long_the_text(tmp_path):
    from fedrnn.shared.data.tokenizers import make_tokenizer

    card, _ = load_model(saved(tmp_path, LM))
    tokenizer = make_tokenizer("char", card.config().vocab_size)
    model = _AlwaysA(tokenizer.encode("a")[0], card.vocab_size)
    text = generate(card, model, "The", length=3 * card.max_len, temperature=0.0, top_k=0,
                    seed=0)
    assert text == "a" * 3 * card.max_len
    assert max(model.steps) == card.max_len  # not the whole text: each step costs the same
