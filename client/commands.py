"""A site's commands: ``fedrnn client``, ``audit``, ``ledger`` and ``budget``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedrnn.client.node import REJOIN_WINDOW
from fedrnn.client.policy import OFFERED_ACCOUNTANTS as OFFERED
from fedrnn.shared.cli import Command, absolute, add_subcommands, write_output
from fedrnn.shared.errors import ConfigError

EPILOG_CLIENT = """examples:
  fedrnn client --server fedrnn.example.org:9092 --root-cert ca.crt \\
                --data records.csv --ledger site.sqlite --budget-epsilon 8 --budget-delta 1e-5
  fedrnn client --server 127.0.0.1:9092 --root-cert certs/ca.crt --auth-key site-1.key \\
                --data sites/site-1.csv --ledger ledgers/site-1.sqlite \\
                --budget-epsilon 3 --budget-delta 1e-6 --no-evaluate

The budget is the site's, never the server's: a run can only ask; the site declines what
its policy does not allow. To raise a stored budget: fedrnn ledger set-budget LEDGER ...
"""


def _configure_client(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="this site's records (.jsonl/.csv, formats as `simulate --data`; "
                        "the client column is optional and ignored)")
    parser.add_argument("--ledger", required=True, metavar="PATH.sqlite",
                        help="this site's privacy ledger (created if missing; keep it)")
    parser.add_argument("--budget-epsilon", type=float, metavar="E",
                        help="required: the most epsilon any of this site's records may lose, "
                        "across all runs (a stored budget is never raised by a run)")
    parser.add_argument("--budget-delta", type=float, metavar="D",
                        help="required: the delta at which the site accounts, e.g. 1e-5 "
                        "(well below 1/records)")
    parser.add_argument("--accountant", choices=OFFERED, default="rdp",
                        help="how this site composes its releases (default: rdp); the "
                        "server's proposal is never used")
    parser.add_argument("--eval-fraction", type=float, default=0.2, metavar="F",
                        help="share of this site's records held out for evaluation, chosen "
                        "per record by a keyed hash whose key stays in the ledger "
                        "(default: 0.2)")
    parser.add_argument("--min-batch-size", type=int, default=16, metavar="B",
                        help="the smallest expected batch the site trains with, whatever the "
                        "server asks: DP-SGD's public sample rate 1/ceil(records/B) tells "
                        "the number of records to within B (default: 16)")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="answer evaluation requests with DP-noised metrics charged to "
                        "the evaluation records' budget (default); --no-evaluate declines")
    parser.add_argument("--root-cert", metavar="FILE", help="CA certificate that signed the "
                        "server's certificate (ca.crt from fedrnn certs)")
    parser.add_argument("--auth-key", metavar="FILE",
                        help="this site's private key, when the server requires auth")
    parser.add_argument("--name",
                        help="site name in logs and the ledger (default: data file name)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (trials only)")
    parser.add_argument("--max-wait", type=float, default=0.0, metavar="SECONDS",
                        help="give up if the server cannot be reached for this long "
                        "(default: keep trying)")
    parser.add_argument("--rejoin-wait", type=float, default=REJOIN_WINDOW, metavar="SECONDS",
                        help="with --auth-key, how long to retry when the server refuses the "
                        "key: a site restarted after a crash is refused until the server "
                        "notices its previous connection is gone (two missed heartbeats, "
                        f"up to 60 s); 0 gives up at once (default: {REJOIN_WINDOW:g})")


def _run_client(args: argparse.Namespace) -> int:
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
        root_cert=absolute(args.root_cert), auth_key=absolute(args.auth_key),
        insecure=args.insecure, max_wait=args.max_wait, rejoin_wait=args.rejoin_wait)
    return run_site(options)


def _configure_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a run directory, a ledger file, or a directory of "
                        "ledgers")
    parser.add_argument("--json", action="store_true", help="print the audit as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="epsilon against round per site")
    parser.add_argument("--html", metavar="FILE", help="a self-contained report to file")
    parser.add_argument("--empirical", action="store_true",
                        help="also test the run's trained model against the canaries `fedrnn "
                        "simulate` planted (--canaries M records, --canary-secrets K, "
                        "--canary-clients C): a lower bound or estimate of epsilon beside "
                        "the accounted one (docs/empirical-audit.md)")


def _run_audit(args: argparse.Namespace) -> int:
    from fedrnn.client.audit import NothingToAudit, audit, table
    from fedrnn.client.audit_report import plot, render_html

    empirical = None
    if args.empirical:
        from fedrnn.client.empirical import empirical as run_empirical
        from fedrnn.client.empirical.report import table as empirical_table

        empirical = run_empirical(args.path)
        try:  # a run without DP, or clipped without noise, has no ledger to recompute
            result = audit(args.path)
        except NothingToAudit:
            result = None
    else:
        result = audit(args.path)
    if args.plot and result is not None:
        write_output(Path(args.plot), plot(result))
    if args.html:
        write_output(Path(args.html), render_html(result, empirical).encode())
    if args.json:
        out = result.to_json() if result is not None else {"clients": [], "user_level": None}
        if empirical is not None:
            out["empirical"] = empirical
        print(json.dumps(out, indent=2))
    else:
        if result is not None:
            print(table(result))
        if empirical is not None:
            print(empirical_table(empirical))
        for name, value in (("plot", args.plot), ("report", args.html)):
            if value:
                print(f"{name}: {value}")
    return 0


def _configure_set_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ledger", metavar="LEDGER", help="the site's ledger file")
    parser.add_argument("--epsilon", type=float, required=True, metavar="E",
                        help="the most epsilon any record may lose, across all runs")
    parser.add_argument("--delta", type=float, required=True, metavar="D",
                        help="the delta the site accounts at")
    parser.add_argument("--accountant", choices=OFFERED,
                        help="the site's accountant (default: the ledger's)")


def _run_set_budget(args: argparse.Namespace) -> int:
    from fedrnn.client.ledger import Budget, Ledger

    if not (0 < args.epsilon < math.inf and 0 < args.delta < 1):
        raise ConfigError("--epsilon must be a positive number and --delta in (0, 1)")
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


LEDGER_ACTIONS = [
    Command(
        "set-budget", "set (raise or lower) the budget stored in a ledger",
        _configure_set_budget, _run_set_budget,
        description="Store a new (epsilon, delta) budget in LEDGER. Every record's loss so "
        "far stays; records whose loss is below the new budget may train again.",
        epilog="example:\n  fedrnn ledger set-budget site.sqlite --epsilon 10 --delta 1e-5"),
]


def _configure_ledger(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser, LEDGER_ACTIONS, dest="ledger_command", metavar="ACTION")


def _configure_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                        help="Poisson sampling rate per step (batch size / records)")
    parser.add_argument("--noise-multiplier", type=float, metavar="S",
                        help="noise std / clip norm")
    parser.add_argument("--target-epsilon", type=float, metavar="E",
                        help="solve for the noise multiplier reaching this epsilon")
    parser.add_argument("--steps", type=int, required=True, metavar="T",
                        help="number of DP-SGD steps")
    parser.add_argument("--delta", type=float, required=True, metavar="D")
    parser.add_argument("--accountant", choices=OFFERED, default="rdp")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _run_budget(args: argparse.Namespace) -> int:
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


COMMANDS = [
    Command(
        "client", "run one site: train on local records, charge the local ledger",
        _configure_client, _run_client, order=30, epilog=EPILOG_CLIENT,
        description="Connect this site to a fedrnn server (Flower SuperNode) and train on "
        "the records in --data whenever the server asks. The site's ledger (--ledger) "
        "records every release; a round that would exceed the site's budget is declined. "
        "Records never leave the site; only DP-trained weights and DP-noised metrics do."),
    Command(
        "budget", "plan a DP-SGD run: epsilon for a noise level, or the reverse",
        _configure_budget, _run_budget, order=60,
        description="Epsilon of `steps` DP-SGD steps at Poisson rate `sample-rate` with "
        "`noise-multiplier`; or, with --target-epsilon, the smallest noise multiplier that "
        "stays within it.",
        epilog="examples:\n  fedrnn budget --sample-rate 0.01 --noise-multiplier 1.1 "
        "--steps 1000 --delta 1e-5\n  fedrnn budget --sample-rate 0.05 --target-epsilon 3 "
        "--steps 300 --delta 1e-5 --json"),
    Command(
        "audit", "how much privacy every site has spent, from its ledger",
        _configure_audit, _run_audit, order=70,
        description="Recompute every site's record-level epsilon from its ledger (RDP and "
        "PRV side by side) and report the run's user-level epsilon where it applies. "
        "--empirical: test the trained model against the run's canaries (a lower bound on "
        "epsilon that must stay below the accounted one).",
        epilog="examples:\n  fedrnn audit runs/20250101-120000\n"
        "  fedrnn simulate --canaries 1000 --out runs/audited && "
        "fedrnn audit runs/audited --empirical --json"),
    Command(
        "ledger", "a site's privacy ledger: set its budget by hand", _configure_ledger,
        order=80,
        description="Acts on a site's own ledger file, on the site's host. A run can lower a "
        "site's stored budget, never raise it; raising it is this explicit act, recorded in "
        "the ledger and shown by fedrnn audit."),
]
