"""The ``fedrnn`` program: what every subcommand shares, and nothing any one of them runs.

Each subcommand lives next to what it runs (``simulations/commands.py``,
``server/commands.py``, ``client/commands.py``) and is found through the ``fedrnn.commands``
entry points of the installed distribution, so this bottom layer imports none of the layers
above it (import-linter checks that in CI). What is shared here:

- settings flags generated from ``RunConfig`` (one set of names and defaults for flags,
  config files and ``[tool.flwr.app.config]``), each command offering only the groups it
  reads;
- the precedence: defaults < scenario < ``--config`` file < flags;
- the error policy: a user's mistake or a peer's act (``FedrnnError``) ends as one line on
  stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

# Flower reports run events to telemetry.flower.ai unless told not to, and reads the
# setting once, when first imported; every process fedrnn starts (SuperLink, SuperNode,
# Ray workers) inherits it. A user who wants telemetry sets FLWR_TELEMETRY_ENABLED=1.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Likewise Ray, under `fedrnn simulate`: its dashboard process reports cluster usage to
# usage-stats.ray.io by default (RAY_USAGE_STATS_ENABLED=1 turns it back on).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from fedrnn.shared.config import FLAG_GROUPS, RunConfig, key_of, load_toml  # noqa: E402
from fedrnn.shared.errors import ConfigError, FedrnnError  # noqa: E402
from fedrnn.shared.logs import console_logging  # noqa: E402

ENTRY_POINT_GROUP = "fedrnn.commands"


@dataclass(frozen=True)
class Command:
    """One ``fedrnn`` subcommand.

    ``configure`` adds the command's arguments to its parser (and may add subcommands of its
    own); ``run`` gets the parsed arguments and returns the exit status. ``order`` places the
    command in ``fedrnn --help``. A module offers its commands as a list, named in
    pyproject.toml under ``[project.entry-points."fedrnn.commands"]``.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int] | None = None
    description: str | None = None
    epilog: str | None = None
    order: int = 100


def installed_commands() -> list[Command]:
    """Every command the installed distribution declares, in ``--help`` order."""
    commands: list[Command] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        commands.extend(entry.load())
    if not commands:
        raise FedrnnError("no commands found: fedrnn is not installed in this environment "
                          "(pip install -e . from the repository)")
    return sorted(commands, key=lambda c: (c.order, c.name))


def add_subcommands(parent: argparse.ArgumentParser, commands: Iterable[Command], *,
                    dest: str, metavar: str) -> None:
    """Add ``commands`` as subcommands of ``parent`` (the program, or a command's actions)."""
    sub = parent.add_subparsers(dest=dest, required=True, metavar=metavar)
    for command in commands:
        parser = sub.add_parser(command.name, help=command.help,
                                # raw, so that epilogs keep their example lines
                                description=textwrap.fill(command.description or command.help,
                                                          width=88),
                                epilog=command.epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        command.configure(parser)
        if command.run is not None:
            parser.set_defaults(func=command.run)


def add_config_flags(parser: argparse.ArgumentParser, groups: Iterable[str], *,
                     hidden: Iterable[str] = ()) -> None:
    """One flag per ``RunConfig`` field of ``groups`` (``FLAG_GROUPS``), and ``--config``.

    ``hidden`` fields are accepted but left out of ``--help``: a command that refuses a
    setting can then say why in its own words instead of argparse's "unrecognized".
    """
    wanted = {name for group in groups for name in FLAG_GROUPS[group]}
    hidden = set(hidden)
    defaults = RunConfig()
    for f in fields(RunConfig):
        if f.name not in wanted and f.name not in hidden:
            continue
        flag = "--" + key_of(f.name)
        default = getattr(defaults, f.name)
        help_text = (argparse.SUPPRESS if f.name in hidden
                     else f"{f.metadata['help']} (default: {default!r})")
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


def config_from_args(args: argparse.Namespace, *, base: RunConfig | None = None) -> RunConfig:
    """``base`` (defaults, or a scenario's) < ``--config`` file < flags."""
    config = base or RunConfig()
    if getattr(args, "config", None):
        config = RunConfig.from_flat(load_toml(args.config), base=config)
    flags = {key_of(f.name): getattr(args, f.name) for f in fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    return RunConfig.from_flat(flags, base=config) if flags else config


def absolute(path: str | None) -> Path | None:
    """A path flag as an absolute path (processes fedrnn starts run elsewhere)."""
    return Path(path).expanduser().resolve() if path else None


def write_output(path: Path, data: bytes) -> None:
    """Write a file a user asked for, whole or not at all."""
    from fedrnn.shared.files import write_atomic

    if not path.parent.is_dir():
        raise ConfigError(f"{path.parent}: directory does not exist")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory (name a file)")
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write ({exc.strerror or exc})") from None


def build_parser(commands: Iterable[Command] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrnn", description="Privacy-preserving federated training of recurrent "
        "models (RNN, LSTM, GRU) with Flower and Opacus.")
    add_subcommands(parser, installed_commands() if commands is None else commands,
                    dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None, *, exit_process: bool = False) -> int:
    """Run one command; returns the exit status.

    ``exit_process``: this call is the whole process (the ``fedrnn`` program), so a command
    may end the process itself once its results are on disk rather than return.
    """
    try:
        parser = build_parser()
    except FedrnnError as exc:
        print(f"fedrnn: error: {exc}", file=sys.stderr)
        return 2
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
