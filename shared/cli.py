"""The ``fedrnn`` command line: one entry point, one subcommand per job.

Settings flags are generated from ``RunConfig`` so that flags, config files and
``[tool.flwr.app.config]`` share one set of names and defaults. User mistakes end as one
line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

# Flower reports run events to telemetry.flower.ai unless told not to, and reads the
# setting once, when first imported; every process fedrnn starts (SuperLink, SuperNode,
# Ray workers) inherits it. A user who wants telemetry sets FLWR_TELEMETRY_ENABLED=1.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Likewise Ray, under `fedrnn simulate`: its dashboard process reports cluster usage to
# usage-stats.ray.io by default (RAY_USAGE_STATS_ENABLED=1 turns it back on).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from fedrnn.shared.config import RunConfig, key_of, load_toml  # noqa: E402
from fedrnn.shared.errors import ConfigError, FedrnnError  # noqa: E402
from fedrnn.shared.logs import console_logging  # noqa: E402

EPILOG_SIMULATE = """examples:
  fedrnn simulate                                  # nafld, 10 hospitals, GRU, DP eps 8
  fedrnn simulate --dataset tweets --task lm --model lstm --rounds 5
  fedrnn simulate --data messages.jsonl --task classify --clients-per-round 5
  fedrnn simulate --data vitals.csv --task forecast --no-dp --out runs/baseline
  fedrnn simulate --config experiment.toml --epsilon 3   # flags override the file
  fedrnn simulate --scenario nafld-patients --rounds 5   # and the scenario
  fedrnn simulate --scenario synthetic-classify --sweep epsilon=1,3,8,inf
"""


EPILOG_SERVER = """examples:
  fedrnn certs certs --host fedrnn.example.org --clients 3
  fedrnn server --certificates certs --min-clients 3 --rounds 10 --out runs/hospitals
  fedrnn server --certificates certs --require-auth certs --task classify \\
                --labels spam,ham --model lstm        # sites bring their own messages
  fedrnn server --certificates certs --task classify --labels died,survived \\
                --features bili,chol,albumin          # sites' own numeric sequences
"""

EPILOG_CLIENT = """examples:
  fedrnn client --server fedrnn.example.org:9092 --root-cert ca.crt \\
                --data records.csv --ledger site.sqlite --budget-epsilon 8 --budget-delta 1e-5
  fedrnn client --server 127.0.0.1:9092 --root-cert certs/ca.crt --auth-key site-1.key \\
                --data sites/site-1.csv --ledger ledgers/site-1.sqlite \\
                --budget-epsilon 3 --budget-delta 1e-6 --no-evaluate

The budget is the site's, never the server's: a run can only ask; the site declines what
its policy does not allow. To raise a stored budget: fedrnn ledger set-budget LEDGER ...
"""


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    for f in fields(RunConfig):
        flag = "--" + key_of(f.name)
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text, dest=f.name)
        else:
            parser.add_argument(flag, type=type(default), default=None, help=help_text,
                                choices=f.metadata.get("choices"), dest=f.name,
                                metavar=None if f.metadata.get("choices") else
                                {int: "N", float: "X"}.get(type(default), "TEXT"))
    parser.add_argument("--config", metavar="FILE.toml", help="settings file with the same "
                        "keys (kebab-case); flags win over it")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """defaults < ``--scenario`` < ``--config`` file < flags."""
    config = RunConfig()
    if getattr(args, "scenario", None):
        from fedrnn.simulations.scenarios import load_scenario

        config = RunConfig.from_flat(load_scenario(args.scenario))
    if args.config:
        config = RunConfig.from_flat(load_toml(args.config), base=config)
    flags = {key_of(f.name): getattr(args, f.name) for f in fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    return RunConfig.from_flat(flags, base=config) if flags else config


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedrnn.simulations.simulate import simulate

    if args.sweep:
        from fedrnn.simulations.sweep import main_sweep

        return main_sweep(config_from_args(args), args.sweep, verbose=args.verbose)
    try:
        out = simulate(config_from_args(args), verbose=args.verbose,
                       wait_for_teardown=not args.exit_process)
    except KeyboardInterrupt:
        if not args.exit_process:
            raise
        # Flower's engine runs on threads of its own that would play every remaining
        # round before the interpreter could exit. What the run has written is whole:
        # its rows, its last checkpoint and every ledger charge are committed.
        print("fedrnn: interrupted", file=sys.stderr)
        _end_process(130)
    _print_run_summary(out)
    if args.exit_process:
        _end_process(0)
    return 0


def _end_process(code: int) -> NoReturn:
    """End this process now; every result is on disk and every line printed.

    Ray is stopped in order (its raylet stops its workers and agents, so none outlives
    this process). What is skipped is measured (``fedrnn bench simulation``): Flower's
    engine noticing the end (its threads poll a queue with a one-second timeout) and the
    interpreter's own exit, about a second of garbage collection over the modules torch,
    Ray and Flower leave loaded.
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


def _print_run_summary(out: Path) -> None:
    from fedrnn.shared.run_records import read_summary

    summary = read_summary(out)
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary.final.items() if math.isfinite(v))
    privacy = summary.privacy
    lines = [f"final: {final}"]
    if privacy.level == "none":
        lines.append("privacy: none (--no-dp)")
    if privacy.level in ("record", "both") and privacy.epsilon_max is None:
        lines.append("privacy: no site trained in this run, so none spent any budget")
    elif privacy.level in ("record", "both"):
        lines.append(f"privacy: record-level epsilon {privacy.epsilon_max:.3f} (max over "
                     f"sites, all runs on their ledgers) at delta {privacy.delta:g}; "
                     f"budget {privacy.budget_epsilon:g}")
    if privacy.user_level:
        lines.append(f"privacy: user-level epsilon {privacy.user_level.epsilon:.3f} at "
                     f"delta {privacy.user_level.delta:g}")
    if privacy.sites_out_of_budget:
        lines.append(f"budgets: {privacy.sites_out_of_budget} site(s) ran out of privacy "
                     f"budget and declined to train; see `fedrnn audit {out}`")
    lines.append(f"run directory: {out} (metrics.jsonl, summary.json, model.pt, metrics.png)")
    print("\n".join(lines))


def _cmd_server(args: argparse.Namespace) -> int:
    import os

    from fedrnn.server.deploy import ServerOptions, run_server

    config = config_from_args(args)
    if args.dataset is None and config.dataset == RunConfig().dataset and (
            config.labels or config.features or config.task == "lm"):
        # a schema given by flags, without --dataset: a run on the sites' own records
        config = config.replace(dataset="")
    if args.min_clients is not None:
        if args.min_clients < 1:
            raise ConfigError("--min-clients must be at least 1")
        config = config.replace(clients=args.min_clients)
    if not config.out:
        from fedrnn.server.federation import default_out_dir

        config = config.replace(out=default_out_dir())
    os.environ["FLWR_HOME"] = str(Path(config.out).expanduser().resolve() / ".flwr")
    options = ServerOptions(address=args.address, insecure=args.insecure,
                            certificates=_absolute(args.certificates),
                            require_auth=_absolute(args.require_auth))
    out = run_server(config, options)
    _print_run_summary(out)
    return 0


def _absolute(path: str | None) -> Path | None:
    return Path(path).expanduser().resolve() if path else None


def _cmd_client(args: argparse.Namespace) -> int:
    from fedrnn.client.node import SiteOptions, run_site

    missing = [flag for flag, value in (("--budget-epsilon", args.budget_epsilon),
                                        ("--budget-delta", args.budget_delta)) if value is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required: a site sets its own privacy "
                          "budget (e.g. --budget-epsilon 8 --budget-delta 1e-5); the server "
                          "cannot set it")
    data = Path(args.data).expanduser().resolve()
    ledger = Path(args.ledger).expanduser().resolve()
    options = SiteOptions(
        server=args.server, data=data, ledger=ledger, name=args.name or data.stem,
        budget_epsilon=args.budget_epsilon, budget_delta=args.budget_delta,
        accountant=args.accountant, eval_fraction=args.eval_fraction, evaluate=args.evaluate,
        min_batch_size=args.min_batch_size,
        root_cert=_absolute(args.root_cert), auth_key=_absolute(args.auth_key),
        insecure=args.insecure, max_wait=args.max_wait)
    return run_site(options)


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedrnn.shared.certs import write_certificates

    hosts = [h for item in args.host for h in item.split(",") if h.strip()]
    written = write_certificates(args.directory, hosts=hosts, clients=args.clients,
                                 overwrite=args.overwrite)
    for path in written:
        print(path)
    print(f"server: fedrnn server --certificates {args.directory} ...\n"
          f"sites:  fedrnn client --root-cert {Path(args.directory) / 'ca.crt'} ..."
          + ("\nauth:   fedrnn server --require-auth DIR-WITH-site-*.pub; "
             "fedrnn client --auth-key site-N.key" if args.clients else ""))
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from fedrnn.shared.data.export import write_site_files

    config = config_from_args(args)
    for path in write_site_files(config, args.out_dir):
        print(path)
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from fedrnn.shared.privacy import calibrate_noise, epsilon

    if not 0 < args.sample_rate <= 1:
        raise ConfigError("--sample-rate must be in (0, 1]")
    if args.steps < 1:
        raise ConfigError("--steps must be at least 1")
    if not 0 < args.delta < 1:
        raise ConfigError("--delta must be in (0, 1)")
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ConfigError("give exactly one of --noise-multiplier (to get epsilon) or "
                          "--target-epsilon (to get the noise multiplier)")
    # written so that NaN fails too (every comparison with NaN is false)
    if args.noise_multiplier is not None and not 0 < args.noise_multiplier < math.inf:
        raise ConfigError("--noise-multiplier must be a positive number")
    if args.target_epsilon is not None and not 0 < args.target_epsilon < math.inf:
        raise ConfigError("--target-epsilon must be a positive number")
    sigma = args.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(target_epsilon=args.target_epsilon, delta=args.delta,
                                sample_rate=args.sample_rate, steps=args.steps,
                                accountant=args.accountant)
    eps = epsilon([(sigma, args.sample_rate, args.steps)], delta=args.delta,
                  accountant=args.accountant)
    if args.json:
        print(json.dumps({"epsilon": eps, "noise_multiplier": sigma,
                          "accountant": args.accountant, "delta": args.delta}))
    else:
        print(f"epsilon {eps:.4f} at delta {args.delta:g} ({args.accountant}) for noise "
              f"multiplier {sigma:.4f}, sample rate {args.sample_rate:g}, {args.steps} steps")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedrnn.client.audit import audit, table
    from fedrnn.client.audit_report import plot, render_html

    result = audit(args.path)
    if args.plot:
        _write_output(Path(args.plot), plot(result))
    if args.html:
        _write_output(Path(args.html), render_html(result).encode())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(table(result))
        for name, value in (("plot", args.plot), ("report", args.html)):
            if value:
                print(f"{name}: {value}")
    return 0


def _cmd_ledger_set_budget(args: argparse.Namespace) -> int:
    from fedrnn.client.ledger import Budget, Ledger
    from fedrnn.client.policy import OFFERED_ACCOUNTANTS

    if not (0 < args.epsilon < math.inf and 0 < args.delta < 1):
        raise ConfigError("--epsilon must be a positive number and --delta in (0, 1)")
    if args.accountant is not None and args.accountant not in OFFERED_ACCOUNTANTS:
        raise ConfigError(f"--accountant must be one of {', '.join(OFFERED_ACCOUNTANTS)}")
    path = Path(args.ledger)
    if not path.is_file():
        raise ConfigError(f"{path}: no such ledger (a site's ledger is created by its first "
                          "round; set its budget with fedrnn client --budget-epsilon)")
    with Ledger(path) as ledger:
        before = ledger.budget()
        accountant = args.accountant or (before.accountant if before else "rdp")
        ledger.set_budget(Budget(args.epsilon, args.delta, accountant, source="set-budget"))
    was = f"epsilon {before.epsilon:g}, delta {before.delta:g}" if before else "none"
    print(f"{path}: budget epsilon {args.epsilon:g}, delta {args.delta:g} ({accountant}); "
          f"was {was}. Recorded in the ledger; fedrnn audit {path} shows it.")
    return 0


def _cmd_bench_dp_step(args: argparse.Namespace) -> int:
    from fedrnn.simulations.bench import StepSpec, main_dp_step

    for name in ("batch", "seq_len", "hidden", "layers", "embedding", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    spec = StepSpec(model=args.model, batch=args.batch, seq_len=args.seq_len,
                    hidden=args.hidden, layers=args.layers, embedding=args.embedding)
    main_dp_step(spec, as_json=args.json, repeats=args.repeats, clipping=args.clipping)
    return 0


def _cmd_bench_simulation(args: argparse.Namespace) -> int:
    from fedrnn.simulations.bench_simulation import main_bench_simulation

    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    main_bench_simulation(as_json=args.json, repeats=args.repeats)
    return 0


def _add_scale_flags(sim: argparse.ArgumentParser) -> None:
    from fedrnn.simulations.scenarios import describe

    scenarios = "; ".join(f"{name}: {text}" for name, text in describe().items())
    sim.add_argument("--scenario", metavar="NAME", help=f"a named experiment whose settings "
                     f"the other flags override ({scenarios})")
    sim.add_argument("--sweep", metavar="KEY=V1,V2", action="append", default=[],
                     help="run one simulation per value (repeat for a grid), e.g. "
                     "epsilon=1,3,8,inf; writes sweep.csv, sweep.json and sweep.png")


def _write_output(path: Path, data: bytes) -> None:
    from fedrnn.shared.files import write_atomic

    if not path.parent.is_dir():
        raise ConfigError(f"{path.parent}: directory does not exist")
    write_atomic(path, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrnn", description="Privacy-preserving federated training of recurrent "
        "models (RNN, LSTM, GRU) with Flower and Opacus.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = sub.add_parser("simulate", help="run a federated DP simulation on this machine",
                         description="Run many simulated sites on Flower's Simulation Engine; "
                         "each trains the shared model with Opacus DP-SGD on its own records.",
                         epilog=EPILOG_SIMULATE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(sim)
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    _add_scale_flags(sim)
    sim.set_defaults(func=_cmd_simulate)

    srv = sub.add_parser(
        "server", help="serve a federated run to sites across the network (Flower SuperLink)",
        description="Start Flower's SuperLink on --address and run the fedrnn ServerApp on "
        "it: each round waits for --min-clients sites, trains on every connected site, and "
        "writes the same run directory as `simulate`. TLS is on unless --insecure. Restart "
        "with the same --out to resume from the last completed round.",
        epilog=EPILOG_SERVER, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("--address", default="0.0.0.0:9092", metavar="HOST:PORT",
                     help="where sites connect (default: 0.0.0.0:9092)")
    srv.add_argument("--min-clients", type=int, metavar="N", help="sites a round waits for "
                     "(same as --clients; default 10)")
    srv.add_argument("--certificates", metavar="DIR",
                     help="directory with ca.crt, server.crt, server.key (fedrnn certs)")
    srv.add_argument("--insecure", action="store_true",
                     help="no TLS: weights travel in the clear (trials on one machine only)")
    srv.add_argument("--require-auth", metavar="DIR",
                     help="admit only sites whose public key (*.pub) is in DIR")
    _add_config_flags(srv)
    srv.set_defaults(func=_cmd_server)

    cli = sub.add_parser(
        "client", help="run one site: train on local records, charge the local ledger",
        description="Connect this site to a fedrnn server (Flower SuperNode) and train on "
        "the records in --data whenever the server asks. The site's ledger (--ledger) "
        "records every release; a round that would exceed the site's budget is declined. "
        "Records never leave the site; only DP-trained weights and metrics do.",
        epilog=EPILOG_CLIENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--server", required=True, metavar="HOST:PORT")
    cli.add_argument("--data", required=True, metavar="PATH",
                     help="this site's records (.jsonl/.csv, formats as `simulate --data`; "
                     "the client column is optional and ignored)")
    cli.add_argument("--ledger", required=True, metavar="PATH.sqlite",
                     help="this site's privacy ledger (created if missing; keep it)")
    cli.add_argument("--budget-epsilon", type=float, metavar="E",
                     help="required: the most epsilon any of this site's records may lose, "
                     "across all runs (a stored budget is never raised by a run)")
    cli.add_argument("--budget-delta", type=float, metavar="D",
                     help="required: the delta at which the site accounts, e.g. 1e-5 "
                     "(well below 1/records)")
    cli.add_argument("--accountant", choices=("rdp", "prv"), default="rdp",
                     help="how this site composes its releases (default: rdp); the server's "
                     "proposal is never used")
    cli.add_argument("--eval-fraction", type=float, default=0.2, metavar="F",
                     help="share of this site's records held out for evaluation, chosen per "
                     "record by a keyed hash whose key stays in the ledger (default: 0.2)")
    cli.add_argument("--min-batch-size", type=int, default=16, metavar="B",
                     help="the smallest expected batch the site trains with, whatever the "
                     "server asks: DP-SGD's public sample rate 1/ceil(records/B) tells the "
                     "number of records to within B (default: 16)")
    cli.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                     help="answer evaluation requests with DP-noised metrics charged to the "
                     "evaluation records' budget (default); --no-evaluate declines them")
    cli.add_argument("--root-cert", metavar="FILE", help="CA certificate that signed the "
                     "server's certificate (ca.crt from fedrnn certs)")
    cli.add_argument("--auth-key", metavar="FILE",
                     help="this site's private key, when the server requires auth")
    cli.add_argument("--name", help="site name in logs and the ledger (default: data file name)")
    cli.add_argument("--insecure", action="store_true", help="no TLS (trials only)")
    cli.add_argument("--max-wait", type=float, default=0.0, metavar="SECONDS",
                     help="give up if the server cannot be reached for this long "
                     "(default: keep trying)")
    cli.set_defaults(func=_cmd_client)

    certs = sub.add_parser(
        "certs", help="write development TLS certificates and site keys",
        description="Write a development CA (ca.crt, ca.key), a server certificate "
        "(server.crt, server.key) for localhost and every --host, and with --clients N the "
        "key pairs site-1.key/.pub ... for --require-auth. For production, use certificates "
        "from your organisation's CA (README).")
    certs.add_argument("directory", metavar="DIR")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="another name or IP the server is reached at (repeatable, or "
                       "comma-separated)")
    certs.add_argument("--clients", type=int, default=0, metavar="N",
                       help="also write N site key pairs")
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")
    certs.set_defaults(func=_cmd_certs)

    split = sub.add_parser(
        "split", help="write a dataset's clients as one records file per site",
        description="Partition a dataset exactly as `simulate` would and write each "
        "client's records to its own file in OUT_DIR, in the format `client --data` reads: "
        "sites for a trial deployment.")
    split.add_argument("out_dir", metavar="OUT_DIR")
    _add_config_flags(split)
    split.set_defaults(func=_cmd_split)

    budget = sub.add_parser(
        "budget", help="plan a DP-SGD run: epsilon for a noise level, or the reverse",
        description="Epsilon of `steps` DP-SGD steps at Poisson rate `sample-rate` with "
        "`noise-multiplier`; or, with --target-epsilon, the smallest noise multiplier that "
        "stays within it.",
        epilog="examples:\n  fedrnn budget --sample-rate 0.01 --noise-multiplier 1.1 "
        "--steps 1000 --delta 1e-5\n  fedrnn budget --sample-rate 0.05 --target-epsilon 3 "
        "--steps 300 --delta 1e-5 --json", formatter_class=argparse.RawDescriptionHelpFormatter)
    budget.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                        help="Poisson sampling rate per step (batch size / records)")
    budget.add_argument("--noise-multiplier", type=float, metavar="S",
                        help="noise std / clip norm")
    budget.add_argument("--target-epsilon", type=float, metavar="E",
                        help="solve for the noise multiplier reaching this epsilon")
    budget.add_argument("--steps", type=int, required=True, metavar="T",
                        help="number of DP-SGD steps")
    budget.add_argument("--delta", type=float, required=True, metavar="D")
    budget.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    budget.add_argument("--json", action="store_true", help="print one JSON object")
    budget.set_defaults(func=_cmd_budget)

    aud = sub.add_parser(
        "audit", help="how much privacy every site has spent, from its ledger",
        description="Recompute every site's record-level epsilon from its ledger (RDP and "
        "PRV side by side) and report the run's user-level epsilon where it applies.")
    aud.add_argument("path", help="a run directory, a ledger file, or a directory of ledgers")
    aud.add_argument("--json", action="store_true", help="print the audit as JSON")
    aud.add_argument("--plot", metavar="FILE.png", help="epsilon against round per site")
    aud.add_argument("--html", metavar="FILE", help="a self-contained report to file")
    aud.set_defaults(func=_cmd_audit)

    ledger = sub.add_parser("ledger", help="a site's privacy ledger: set its budget by hand",
                            description="Acts on a site's own ledger file, on the site's "
                            "host. A run can lower a site's stored budget, never raise it; "
                            "raising it is this explicit act, recorded in the ledger and "
                            "shown by fedrnn audit.")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    set_budget = ledger_sub.add_parser(
        "set-budget", help="set (raise or lower) the budget stored in a ledger",
        description="Store a new (epsilon, delta) budget in LEDGER. Every record's loss so far "
        "stays; records whose loss is below the new budget may train again.",
        epilog="example:\n  fedrnn ledger set-budget site.sqlite --epsilon 10 --delta 1e-5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    set_budget.add_argument("ledger", metavar="LEDGER", help="the site's ledger file")
    set_budget.add_argument("--epsilon", type=float, required=True, metavar="E",
                            help="the most epsilon any record may lose, across all runs")
    set_budget.add_argument("--delta", type=float, required=True, metavar="D",
                            help="the delta the site accounts at")
    set_budget.add_argument("--accountant", choices=("rdp", "prv"),
                            help="the site's accountant (default: the ledger's)")
    set_budget.set_defaults(func=_cmd_ledger_set_budget)

    bench = sub.add_parser("bench", help="measure speed (benchmarks, never timed tests)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    dp_step = bench_sub.add_parser(
        "dp-step", help="one DP-SGD step: torch (non-private) vs Opacus's DP layer vs fedrnn's, "
        "with torch's and with the site's secure generator",
        description="Time one full DP-SGD step (forward, backward, per-sample clipping, noise, "
        "optimizer step) of a character model, interleaving the implementations in one "
        "process; median after warm-up; peak memory of each in its own child process. "
        "fedrnn-csprng is the client's step, its noise from a cryptographically secure "
        "generator; its ratio to fedrnn (torch's generator) is printed (target < 1.05).")
    dp_step.add_argument("--model", choices=("lstm", "gru", "rnn"), default="lstm")
    dp_step.add_argument("--batch", type=int, default=64)
    dp_step.add_argument("--seq-len", type=int, default=80)
    dp_step.add_argument("--hidden", type=int, default=256)
    dp_step.add_argument("--layers", type=int, default=2)
    dp_step.add_argument("--embedding", type=int, default=8)
    dp_step.add_argument("--repeats", type=int, default=5, help="timed steps per "
                         "implementation after warm-up (median reported)")
    dp_step.add_argument("--clipping", choices=("ghost", "hooks"), default="ghost",
                         help="Opacus grad_sample_mode for fedrnn's layers: ghost (per-sample "
                         "norms, then a second backward pass; what the client uses) or hooks "
                         "(per-sample gradients materialised). Opacus's layer always uses hooks")
    dp_step.add_argument("--json", action="store_true",
                         help="one JSON line per implementation")
    dp_step.set_defaults(func=_cmd_bench_dp_step)
    simulation = bench_sub.add_parser(
        "simulation", help="Flower's Simulation Engine against the same client work in a "
        "plain process: the harness's overhead",
        description="Run one fixed workload (nafld GRU with DP-SGD, 100 clients, 20 per round, "
        "10 rounds) as `fedrnn simulate` and as a plain loop over the same client updates, "
        "each in a fresh process timed from start to exit; print both and their ratio.")
    simulation.add_argument("--json", action="store_true", help="last line: {\"simulation_s\", "
                            "\"compute_s\", \"overhead_ratio\"}")
    simulation.add_argument("--repeats", type=int, default=3,
                            help="alternating (plain, simulation) pairs; the median ratio is "
                            "reported (default: 3, about 2 minutes on 2 cores)")
    simulation.set_defaults(func=_cmd_bench_simulation)
    return parser


def main(argv: list[str] | None = None, *, exit_process: bool = False) -> int:
    """Run one command; returns the exit status.

    ``exit_process``: this call is the whole process (the ``fedrnn`` program), so a command
    may end the process itself once its results are on disk rather than return.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.exit_process = exit_process
    console_logging()
    try:
        return args.func(args)
    except FedrnnError as exc:
        print(f"fedrnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedrnn: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The ``fedrnn`` program."""
    sys.exit(main(exit_process=True))


if __name__ == "__main__":
    run()
