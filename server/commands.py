"""The operator's commands: ``fedrnn server`` and ``fedrnn certs``."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from fedrnn.shared.cli import Command, absolute, add_config_flags, config_from_args
from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.run_records import read_summary

EPILOG_SERVER = """examples:
  fedrnn certs certs --host fedrnn.example.org --clients 3
  fedrnn server --certificates certs --min-clients 3 --rounds 10 --out runs/hospitals
  fedrnn server --certificates certs --require-auth certs --task classify \\
                --labels spam,ham --model lstm        # sites bring their own messages
  fedrnn server --certificates certs --task classify --labels died,survived \\
                --features bili,chol,albumin          # sites' own numeric sequences
"""

# The server holds no records and sites split and budget their own: no partition, fault or
# ledger settings. --data is accepted only to be refused with the reason.
SERVER_GROUPS = ("data", "model", "federation", "privacy", "run")


def summary_lines(out: Path) -> list[str]:
    """What a finished run prints: its final metrics, the privacy spent, where it went."""
    summary = read_summary(out)
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary.final.items() if math.isfinite(v))
    privacy = summary.privacy
    lines = [f"final: {final}"]
    if privacy.level == "none":
        lines.append("privacy: none (--no-dp)")
    # --epsilon inf: no noise to calibrate, so no target is recorded; the budget says it
    limit = privacy.epsilon_target if privacy.epsilon_target is not None \
        else privacy.budget_epsilon
    unbounded = limit is not None and math.isinf(float(limit)) and not privacy.noise_multiplier
    if privacy.level in ("record", "both") and unbounded:
        lines.append("privacy: none: updates clipped but not noised (--epsilon inf), so "
                     "epsilon is unbounded")
    elif privacy.level in ("record", "both") and privacy.epsilon_max is None:
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
    lines.append(f"run directory: {out} (metrics.jsonl, summary.json, model.pt + "
                 "model.json, metrics.png)")
    return lines


def _configure_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="0.0.0.0:9092", metavar="HOST:PORT",
                        help="where sites connect; only Flower's Fleet API answers there "
                        "(default: 0.0.0.0:9092)")
    parser.add_argument("--min-clients", type=int, metavar="N",
                        help="sites a round waits for (default 10)")
    parser.add_argument("--certificates", metavar="DIR",
                        help="directory with ca.crt, server.crt, server.key (fedrnn certs)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS: weights travel in the clear (trials on one machine only)")
    parser.add_argument("--require-auth", metavar="DIR",
                        help="admit only sites whose public key (*.pub) is in DIR")
    add_config_flags(parser, SERVER_GROUPS, hidden=("data",))


def _run_server(args: argparse.Namespace) -> int:
    from fedrnn.server.deploy import ServerOptions, run_server
    from fedrnn.server.stopping import watched_metric

    config = config_from_args(args)
    watched_metric(config)  # one line and exit 2, before the SuperLink starts
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
                            certificates=absolute(args.certificates),
                            require_auth=absolute(args.require_auth))
    out = run_server(config, options)
    print("\n".join(summary_lines(out)))
    return 0


def _configure_certs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="another name or IP the server is reached at (repeatable, or "
                        "comma-separated)")
    parser.add_argument("--clients", type=int, default=0, metavar="N",
                        help="also write N site key pairs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def _run_certs(args: argparse.Namespace) -> int:
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


COMMANDS = [
    Command(
        "server", "serve a federated run to sites across the network (Flower SuperLink)",
        _configure_server, _run_server, order=20, epilog=EPILOG_SERVER,
        description="Start Flower's SuperLink on --address and run the fedrnn ServerApp on "
        "it: each round waits for --min-clients sites, trains on every connected site, and "
        "writes the same run directory as `simulate`. TLS is on unless --insecure. Restart "
        "with the same --out to resume from the last completed round."),
    Command(
        "certs", "write development TLS certificates and site keys",
        _configure_certs, _run_certs, order=40,
        description="Write a development CA (ca.crt, ca.key), a server certificate "
        "(server.crt, server.key) for localhost and every --host, and with --clients N the "
        "key pairs site-1.key/.pub ... for --require-auth. For production, use certificates "
        "from your organisation's CA (docs/deployment.md)."),
]
