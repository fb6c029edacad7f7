"""`fedrnn bench dp-step` runs all three implementations and reports them (no timing asserted)."""

import json

from shared.cli import main


def test_bench_dp_step_json_schema(capsys):
    assert main(["bench", "dp-step", "--model", "gru", "--batch", "4", "--seq-len", "5",
                 "--hidden", "8", "--layers", "1", "--repeats", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["impl"] for r in rows] == ["torch", "opacus", "fedrnn"]
    for row in rows:
        assert row["model"] == "gru" and row["ms_per_step"] > 0 and row["peak_mb"] > 0


def test_bench_dp_step_in_hooks_mode_trains_and_says_so():
    """``--clipping hooks``, in process (the command's peak-memory children, three imports
    of torch and Opacus, were most of this test's 18 s)."""
    import torch

    from simulations.bench import StepSpec, format_table, make_step

    spec = StepSpec(model="lstm", batch=3, seq_len=4, hidden=6, layers=1)
    torch.manual_seed(0)
    step = make_step("fedrnn", spec, clipping="hooks")
    for _ in range(2):  # per-sample gradients materialised, clipped, noised, applied
        step()
    rows = [{"impl": i, "ms_per_step": 1.0, "peak_mb": 1.0} for i in ("torch", "opacus")]
    assert "fedrnn in Opacus's 'hooks' mode" in format_table(rows, spec, clipping="hooks")


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "dp-step", "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert main(["bench", "simulation", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
