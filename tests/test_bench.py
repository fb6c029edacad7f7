"""`fedrnn bench dp-step` runs every implementation and reports them (no timing asserted)."""

import json

from fedrnn.shared.cli import main


def test_bench_dp_step_json_schema(capsys):
    assert main(["bench", "dp-step", "--model", "gru", "--batch", "4", "--seq-len", "5",
                 "--hidden", "8", "--layers", "1", "--repeats", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["impl"] for r in rows] == ["torch", "opacus", "fedrnn", "fedrnn-csprng"]
    for row in rows:
        assert row["model"] == "gru" and row["ms_per_step"] > 0 and row["peak_mb"] > 0
    assert rows[-1]["vs_torch_rng"] > 0  # the secure generator's step against torch's


def test_bench_dp_step_in_hooks_mode_trains_and_says_so(capsys, monkeypatch):
    """``--clipping hooks`` through the command. Peak memory, measured in a child process
    per implementation (three more imports of torch and Opacus, most of this test's 18 s),
    is the test above's; here it is left out."""
    import fedrnn.simulations.bench

    monkeypatch.setattr(fedrnn.simulations.bench, "peak_mb", lambda impl, spec, clipping: 1.0)
    assert main(["bench", "dp-step", "--model", "lstm", "--batch", "3", "--seq-len", "4",
                 "--hidden", "6", "--repeats", "1", "--clipping", "hooks"]) == 0
    out = capsys.readouterr().out
    assert "fedrnn in Opacus's 'hooks' mode" in out
    assert "fedrnn-csprng" not in out  # the client's optimizer is ghost clipping only


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "dp-step", "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert main(["bench", "simulation", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
