"""Commands that run everything on one machine: ``simulate``, ``split`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fedrnn.server.commands import summary_lines
from fedrnn.shared.cli import Command, add_config_flags, add_subcommands, config_from_args
from fedrnn.shared.config import FLAG_GROUPS, RunConfig
from fedrnn.shared.errors import ConfigError

EPILOG_SIMULATE = """examples:
  fedrnn simulate                                  # nafld, 10 hospitals, GRU, DP eps 8
  fedrnn simulate --dataset tweets --task lm --model lstm --rounds 5
  fedrnn simulate --data messages.jsonl --task classify --clients-per-round 5
  fedrnn simulate --data vitals.csv --task forecast --no-dp --out runs/baseline
  fedrnn simulate --config experiment.toml --epsilon 3   # flags override the file
  fedrnn simulate --scenario nafld-patients --rounds 5   # and the scenario
  fedrnn simulate --scenario synthetic-classify --sweep epsilon=1,3,8,inf
"""


EPILOG_REFERENCE = """examples:
  fedrnn bench reference                 # the default run's split: nafld, 10 sites, seed 0
  fedrnn bench reference --partitioner quantity --clients 30 --json
  fedrnn bench reference --dataset tweets   # posting app from a message's characters
"""


def _configure_simulate(parser: argparse.ArgumentParser) -> None:
    from fedrnn.simulations.scenarios import describe

    add_config_flags(parser, FLAG_GROUPS)
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    scenarios = "; ".join(f"{name}: {text}" for name, text in describe().items())
    parser.add_argument("--scenario", metavar="NAME", help=f"a named experiment whose "
                        f"settings the other flags override ({scenarios})")
    parser.add_argument("--sweep", metavar="KEY=V1,V2", action="append", default=[],
                        help="run one simulation per value (repeat for a grid), e.g. "
                        "epsilon=1,3,8,inf; writes sweep.csv, sweep.json and sweep.png")


def simulation_config(args: argparse.Namespace) -> RunConfig:
    """defaults < ``--scenario`` < ``--config`` file < flags."""
    base = None
    if args.scenario:
        from fedrnn.simulations.scenarios import load_scenario

        base = RunConfig.from_flat(load_scenario(args.scenario))
    return config_from_args(args, base=base)


def _run_simulate(args: argparse.Namespace) -> int:
    from fedrnn.simulations.simulate import simulate

    if args.sweep:
        from fedrnn.simulations.sweep import main_sweep

        return main_sweep(simulation_config(args), args.sweep, verbose=args.verbose)
    try:
        out = simulate(simulation_config(args), verbose=args.verbose,
                       wait_for_teardown=not args.exit_process)
    except KeyboardInterrupt:
        if not args.exit_process:
            raise
        # Flower's engine runs on threads of its own that would play every remaining
        # round before the interpreter could exit. What the run has written is whole:
        # its rows, its last checkpoint and every ledger charge are committed.
        print("fedrnn: interrupted", file=sys.stderr)
        _end_process(130)
    print("\n".join(summary_lines(out)))
    if args.exit_process:
        _end_process(0)
    return 0


def _end_process(code: int) -> NoReturn:
    """End this process now; every result is on disk and every line printed.

    Ray is stopped in order (its raylet stops its workers and agents, so none outlives
    this process). What is skipped: Flower's engine noticing the end (its threads poll a
    queue with a one-second timeout) and the interpreter's own exit, garbage collection over
    the modules torch, Ray and Flower leave loaded (docs/benchmarks.md).
    """
    import logging
    import os

    from fedrnn.simulations.ray_setup import stop_ray

    # Flower's engine may still be winding down on its thread, and would log Ray going
    # away under it as an error of the finished run.
    logging.getLogger("flwr").disabled = True
    stop_ray(for_exit=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _configure_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR")
    add_config_flags(parser, ("data", "partition"))
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help=f"random seed of the partition (default: {RunConfig().seed})")


def _run_split(args: argparse.Namespace) -> int:
    from fedrnn.shared.data.export import write_site_files

    for path in write_site_files(config_from_args(args), args.out_dir):
        print(path)
    return 0


def _configure_dp_step(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("lstm", "gru", "rnn"), default="lstm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=80)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embedding", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per "
                        "implementation after warm-up (median reported)")
    parser.add_argument("--clipping", choices=("ghost", "hooks"), default="ghost",
                        help="Opacus grad_sample_mode for fedrnn's layers: ghost (per-sample "
                        "norms, then a second backward pass; what the client uses) or hooks "
                        "(per-sample gradients materialised). Opacus's layer always uses "
                        "hooks")
    parser.add_argument("--json", action="store_true",
                        help="one JSON line per implementation")


def _run_dp_step(args: argparse.Namespace) -> int:
    from fedrnn.simulations.bench import StepSpec, main_dp_step

    for name in ("batch", "seq_len", "hidden", "layers", "embedding", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    spec = StepSpec(model=args.model, batch=args.batch, seq_len=args.seq_len,
                    hidden=args.hidden, layers=args.layers, embedding=args.embedding)
    main_dp_step(spec, as_json=args.json, repeats=args.repeats, clipping=args.clipping)
    return 0


def _configure_bench_simulation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="last line: {\"simulation_s\", "
                        "\"compute_s\", \"overhead_ratio\"}")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating (plain, simulation) pairs; the median ratio is "
                        "reported (default: 3)")


def _run_bench_simulation(args: argparse.Namespace) -> int:
    from fedrnn.simulations.bench_simulation import main_bench_simulation

    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    main_bench_simulation(as_json=args.json, repeats=args.repeats)
    return 0


def _configure_reference(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ("data", "partition"))
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help=f"random seed of the split, as the run's "
                        f"(default: {RunConfig().seed})")
    parser.add_argument("--json", action="store_true", help="one JSON line: clients, "
                        "train_records, test_records, accuracy, majority_accuracy, loss, "
                        "auroc, auroc_by_client")


def _run_reference(args: argparse.Namespace) -> int:
    from fedrnn.simulations.reference import main_reference

    main_reference(config_from_args(args), as_json=args.json)
    return 0


BENCHMARKS = [
    Command(
        "dp-step", "one DP-SGD step: torch (non-private) vs Opacus's DP layer vs fedrnn's, "
        "with torch's and with the site's secure generator",
        _configure_dp_step, _run_dp_step,
        description="Time one full DP-SGD step (forward, backward, per-sample clipping, "
        "noise, optimizer step) of a character model, interleaving the implementations in one "
        "process; median after warm-up; peak memory of each in its own child process. "
        "fedrnn-csprng is the client's step, its noise from a cryptographically secure "
        "generator; its ratio to fedrnn (torch's generator) is printed (target < 1.05)."),
    Command(
        "simulation", "Flower's Simulation Engine against the same client work in a plain "
        "process: the harness's overhead",
        _configure_bench_simulation, _run_bench_simulation,
        description="Run one fixed workload (nafld GRU with DP-SGD, 100 clients, 20 per "
        "round, 10 rounds) as `fedrnn simulate` and as a plain loop over the same client "
        "updates, each in a fresh process timed from start to exit; print both and their "
        "ratio."),
    Command(
        "reference", "utility: a non-federated, non-private classifier on a simulation's split",
        _configure_reference, _run_reference, epilog=EPILOG_REFERENCE,
        description="Fit logistic regression on per-record summaries (per feature: last "
        "value, mean and count of observations; steps and time span) of every simulated "
        "client's training records pooled, and score it on every client's evaluation "
        "records: the split `fedrnn simulate` trains and evaluates on with the same data, "
        "partition and seed flags. Prints the AUROC pooled and averaged by client as a run "
        "reports it (two classes), the accuracy and the majority class's: what a federated "
        "run's metrics are to be read against. Task classify; a message's summary is its "
        "bag of tokens."),
]


def _configure_bench(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser, BENCHMARKS, dest="bench", metavar="BENCHMARK")


COMMANDS = [
    Command(
        "simulate", "run a federated DP simulation on this machine",
        _configure_simulate, _run_simulate, order=10, epilog=EPILOG_SIMULATE,
        description="Run many simulated sites on Flower's Simulation Engine; each trains the "
        "shared model with Opacus DP-SGD on its own records."),
    Command(
        "split", "write a dataset's clients as one records file per site",
        _configure_split, _run_split, order=50,
        description="Partition a dataset exactly as `simulate` would and write each "
        "client's records to its own file in OUT_DIR, in the format `client --data` reads: "
        "sites for a trial deployment."),
    Command("bench", "measure speed and utility (benchmarks, never timed tests)",
            _configure_bench,
            order=90),
]
