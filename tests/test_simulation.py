"""End to end: the real CLI, Flower's Simulation Engine (Ray), Opacus, on tiny data."""

import json
import math

import pytest

from shared.cli import main
from shared.models import load_trained


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_simulate_synthetic_classify_with_dp(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--dataset", "synthetic", "--task", "classify", "--rounds", "2",
                 "--clients", "3", "--hidden-size", "8", "--batch-size", "16",
                 "--epsilon", "4", "--out", str(out)])
    assert code == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert {"loss", "accuracy", "auroc", "epsilon_max", "clients"} <= row.keys()
        assert row["clients"] == 3
    # the spend is cumulative and the calibration reaches the target at the last round
    assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"] <= 4.0
    assert rows[1]["epsilon_max"] > 3.8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["auroc"] == rows[-1]["auroc"]
    assert summary["privacy"]["epsilon_max"] == rows[-1]["epsilon_max"]
    assert summary["privacy"]["delta"] == 1e-5 and summary["privacy"]["accountant"] == "rdp"
    assert (out / "metrics.png").stat().st_size > 0
    model, config = load_trained(out)
    assert config.rounds == 2 and config.labels == "neg,pos"
    assert "round   2/2" in capsys.readouterr().err  # progress shown while running


def test_simulate_own_jsonl_lm(tmp_path, text_jsonl):
    out = tmp_path / "lm"
    code = main(["simulate", "--data", str(text_jsonl), "--task", "lm", "--model", "lstm",
                 "--rounds", "2", "--hidden-size", "8", "--embedding-dim", "4",
                 "--noise-multiplier", "1.0", "--out", str(out)])
    assert code == 0
    rows = _rows(out)
    assert rows[-1]["clients"] == 3  # the 'client' column's three clinics
    assert rows[-1]["perplexity"] == pytest.approx(math.exp(rows[-1]["loss"]), rel=1e-6)
    assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"]


@pytest.mark.parametrize("content,expected", [
    (None, "file not found"),
    ("sequence_id,time,x\n1,0,1\n1,1,oops\n", "line 3, column 'x': non-numeric"),
])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys, content, expected):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    code = main(["simulate", "--data", str(path), "--task", "classify", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedrnn: error: ") and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--model", "transformer"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
