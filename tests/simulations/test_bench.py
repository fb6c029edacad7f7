"""`fedrnn bench dp-step` runs every implementation and reports them (no timing asserted)."""

import json
import math

from fedrnn.shared.cli import main


def test_bench_dp_step_json_schema(capsys, monkeypatch):
    """Every implementation in order, one JSON row each with the fields the table reads.
    Timings are the machine's and not asserted; peak memory, measured in a child process
    per implementation, is stubbed here to see that each row gets its own (the measure
    itself: the test below)."""
    import fedrnn.simulations.bench

    asked = []
    monkeypatch.setattr(fedrnn.simulations.bench, "peak_mb", lambda impl, spec, clipping:
                        asked.append((impl, spec.model, clipping)) or 100.0 + len(asked))
    assert main(["bench", "dp-step", "--model", "gru", "--batch", "4", "--seq-len", "5",
                 "--hidden", "8", "--layers", "1", "--repeats", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    impls = ["torch", "opacus", "fedrnn", "fedrnn-csprng"]
    assert [r["impl"] for r in rows] == impls
    assert asked == [(impl, "gru", "ghost") for impl in impls]
    assert [r["peak_mb"] for r in rows] == [101.0, 102.0, 103.0, 104.0]
    for row in rows:
        extra = {"vs_torch_rng"} if row["impl"] == "fedrnn-csprng" else set()
        assert set(row) == {"impl", "model", "ms_per_step", "peak_mb"} | extra
        assert row["model"] == "gru" and math.isfinite(row["ms_per_step"])
    assert math.isfinite(rows[-1]["vs_torch_rng"])


def test_peak_memory_is_the_child_processs_own():
    # A spawned child inherits its parent's ru_maxrss across exec; the child's VmHWM
    # starts afresh. This process holds 768 MiB more than the child ever needs.
    from fedrnn.simulations.bench import StepSpec, _high_water_mib, peak_mb

    ballast = b"\x01" * (768 * 2**20)  # written, so resident
    parent = _high_water_mib()
    child = peak_mb("torch", StepSpec(model="gru", batch=2, seq_len=3, hidden=4, layers=1))
    assert len(ballast) and 0 < child < parent - 512


def test_bench_dp_step_in_hooks_mode_trains_and_says_so(capsys, monkeypatch):
    """``--clipping hooks`` through the command. Peak memory (a child process per
    implementation, each importing torch and Opacus) is tested on its own above."""
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
