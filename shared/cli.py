"""The ``fedrnn`` command line: one entry point, one subcommand per job.

Settings flags are generated from ``RunConfig`` so that flags, config files and
``[tool.flwr.app.config]`` share one set of names and defaults. User mistakes end as one
line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from shared.config import RunConfig, key_of, load_toml
from shared.errors import FedrnnError
from shared.logs import console_logging

EPILOG_SIMULATE = """examples:
  fedrnn simulate                                  # nafld, 10 hospitals, GRU, DP eps 8
  fedrnn simulate --dataset tweets --task lm --model lstm --rounds 5
  fedrnn simulate --data messages.jsonl --task classify --clients-per-round 5
  fedrnn simulate --data vitals.csv --task forecast --no-dp --out runs/baseline
  fedrnn simulate --config experiment.toml --epsilon 3   # flags override the file
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
    """defaults < ``--config`` file < flags."""
    config = RunConfig()
    if args.config:
        config = RunConfig.from_flat(load_toml(args.config))
    flags = {key_of(f.name): getattr(args, f.name) for f in fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    return RunConfig.from_flat(flags, base=config) if flags else config


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import simulate

    out = simulate(config_from_args(args), verbose=args.verbose)
    summary = json.loads((out / "summary.json").read_text())
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items()
                      if isinstance(v, (int, float)))
    eps = summary["privacy"]["epsilon_max"]
    spent = "no DP" if eps == "inf" else f"epsilon {eps:.3f} (max over sites) at delta " \
                                         f"{summary['privacy']['delta']:g}"
    print(f"final: {final}\nprivacy: {spent}\nrun directory: {out} (metrics.jsonl, "
          f"summary.json, model.pt, metrics.png)")
    return 0


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
    sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console_logging()
    try:
        return args.func(args)
    except FedrnnError as exc:
        print(f"fedrnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedrnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
