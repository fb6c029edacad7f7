"""The run directory's records: one typed definition, the file format users' scripts read."""

import json
import math

import pytest
import torch

from fedrnn.server.records import RunRecord
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.run_records import (
    SUMMARY_FILE,
    PrivacySummary,
    RoundRow,
    RunSummary,
    UserLevelSummary,
    read_rows,
    read_summary,
)


def _row(server_round, **changes):
    values = dict(round=server_round, metrics={"loss": 0.5, "accuracy": math.nan, "auroc": 0.7},
                  train_loss=0.6, epsilon_max=math.inf, clients=3, declined=1,
                  dropped_ids=[4, 2], timed_out=[2], rejected_ids=[5], seconds=1.25)
    return RoundRow(**{**values, **changes})


def _privacy(**changes):
    values = dict(level="both", epsilon_max=None, delta=1e-5, accountant="rdp",
                  epsilon_target=4.0, noise_multiplier=None, clip_norm=1.0,
                  budget_epsilon=math.inf, budget_delta=1e-5, sites_out_of_budget=0,
                  ledger_dir=None, user_level=UserLevelSummary(
                      epsilon=math.inf, delta=1e-5, accountant="rdp", noise_multiplier=1.0,
                      clip_norm=1.0, history=[(0.5, 0.25, 1)]))
    return PrivacySummary(**{**values, **changes})


def test_a_row_is_the_json_line_users_read_nan_null_and_inf_a_string():
    line = _row(2, user_epsilon=1.5).to_line()
    assert line.endswith("\n") and "NaN" not in line and "Infinity" not in line
    assert list(json.loads(line).items()) == [
        ("round", 2), ("loss", 0.5), ("accuracy", None), ("auroc", 0.7), ("train_loss", 0.6),
        ("epsilon_max", "inf"), ("user_epsilon", 1.5), ("clients", 3), ("declined", 1),
        ("dropped", 2), ("dropped_ids", [4, 2]), ("timed_out", [2]), ("rejected_ids", [5]),
        ("rejected", 1), ("seconds", 1.25)]
    assert "user_epsilon" not in _row(2).to_json()  # only with user-level DP


def test_a_row_read_back_is_the_row_written():
    for row in (_row(1), _row(2, user_epsilon=math.nan, epsilon_max=3.0, train_loss=math.nan)):
        back = RoundRow.from_json(json.loads(row.to_line()))
        assert back.to_line() == row.to_line()
        assert back.epsilon_max == row.epsilon_max and math.isnan(back.metrics["accuracy"])
        assert (back.dropped, back.rejected) == (2, 1)


def test_a_resumed_record_keeps_its_rows_up_to_the_checkpoint_as_written(tmp_path):
    config = RunConfig(task="classify", clients=3)
    record = RunRecord(tmp_path, config)
    for server_round in (1, 2, 3):
        record.add_round(_row(server_round))
    written = (tmp_path / "metrics.jsonl").read_text().splitlines()
    resumed = RunRecord(tmp_path, config, resume_after=2)
    assert [r.round for r in resumed.rows] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == written[:2]
    assert [r.to_line() for r in read_rows(tmp_path)] == [r.to_line() for r in resumed.rows]


def test_the_summary_holds_the_last_rounds_metrics_and_the_privacy_spent(tmp_path):
    config = RunConfig(task="classify", clients=3)
    record = RunRecord(tmp_path, config)
    record.add_round(_row(1))
    record.finish({"w": torch.zeros(1)}, _privacy())
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["final"] == {"loss": 0.5, "accuracy": None, "auroc": 0.7}
    assert (on_disk["rounds"], on_disk["clients_total"]) == (1, 3)
    privacy = on_disk["privacy"]
    assert privacy["budget_epsilon"] == "inf" and privacy["epsilon_max"] is None
    assert privacy["user_level"]["epsilon"] == "inf"  # nested values are valid JSON too
    assert privacy["user_level"]["history"] == [
        {"noise_multiplier": 0.5, "sample_rate": 0.25, "steps": 1}]
    summary = read_summary(tmp_path)
    assert summary.privacy.budget_epsilon == math.inf and summary.privacy.epsilon_max is None
    assert summary.privacy.user_level.history == [(0.5, 0.25, 1)]
    assert summary.to_json() == on_disk


@pytest.mark.parametrize("text", ["{not json", "{}", '{"final": {}, "rounds": 1}'])
def test_a_summary_fedrnn_did_not_write_is_one_clear_error(tmp_path, text):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(FedrnnError, match="summary.json: not a fedrnn run record"):
        read_summary(tmp_path)


def test_a_run_without_noise_says_its_epsilon_is_unbounded(tmp_path):
    """Clipping without noise spends no finite budget: the run must not read as one where
    nobody trained."""
    from fedrnn.server.commands import summary_lines

    # (target, noise multiplier, budget): `fedrnn simulate --epsilon inf` records no target
    # (there is no noise to calibrate) and a budget of inf
    for target, noise, budget, expected in (
            (math.inf, 0.0, math.inf, "epsilon is unbounded"),
            (None, None, math.inf, "epsilon is unbounded"),
            (8.0, None, math.inf, "no site trained"),  # calibrated noise, no budget cap
            (8.0, 1.1, 8.0, "no site trained")):
        privacy = PrivacySummary(
            level="record", epsilon_max=None, delta=1e-5, accountant="rdp",
            epsilon_target=target, noise_multiplier=noise, clip_norm=1.0,
            budget_epsilon=budget, budget_delta=1e-5, sites_out_of_budget=0, ledger_dir=None,
            user_level=None)
        (tmp_path / SUMMARY_FILE).write_text(json.dumps(
            RunSummary(final={"loss": 0.5}, rounds=1, clients_total=2,
                       privacy=privacy).to_json()))
        assert expected in "\n".join(summary_lines(tmp_path))


def test_the_summary_records_early_stopping_and_reads_older_summaries(tmp_path):
    record = RunRecord(tmp_path, RunConfig(task="classify", clients=3))
    record.add_round(_row(1))
    record.finish({"w": torch.zeros(1)}, _privacy(), best_round=1, stopped_early=True,
                  best_state_dict={"w": torch.ones(1)})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert (on_disk["best_round"], on_disk["stopped_early"]) == (1, True)
    assert torch.load(tmp_path / "model_best.pt")["w"].item() == 1.0
    del on_disk["best_round"], on_disk["stopped_early"]  # as an older version wrote it
    (tmp_path / "summary.json").write_text(json.dumps(on_disk))
    older = read_summary(tmp_path)
    assert (older.best_round, older.stopped_early, older.rounds) == (None, False, 1)
