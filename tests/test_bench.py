"""`fedrnn bench dp-step` runs all three implementations and reports them (no timing asserted)."""

import json

from shared.cli import main


def test_bench_dp_step_json_schema(capsys):
    assert main(["bench", "dp-step", "--model", "gru", "--batch", "4", "--seq-len", "5",
                 "--hidden", "8", "--layers", "1", "--repeats", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["impl"] for r in rows] == ["torch", "opacus", "fedrnn"]
    assert main(["bench", "dp-step", "--model", "lstm", "--batch", "3", "--seq-len", "4",
                 "--hidden", "6", "--repeats", "1", "--clipping", "hooks"]) == 0
    assert "fedrnn in Opacus's 'hooks' mode" in capsys.readouterr().out
    for row in rows:
        assert row["model"] == "gru" and row["ms_per_step"] > 0 and row["peak_mb"] > 0


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "dp-step", "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert main(["bench", "simulation", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
