"""Named experiments: ``fedrnn simulate --scenario NAME`` loads ``scenarios/NAME.toml``.

A scenario file is a config file (the ``[fedrnn]`` table holds settings under their usual
kebab-case names) plus a one-line ``description``; precedence is defaults < scenario <
``--config`` file < flags, so any setting of a scenario can be overridden.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from fedrnn.shared.config import RunConfig
from fedrnn.shared.errors import ConfigError


def _files() -> dict[str, Any]:
    folder = resources.files("fedrnn.simulations") / "scenarios"
    return {f.name.removesuffix(".toml"): f for f in folder.iterdir() if f.name.endswith(".toml")}


def scenario_names() -> list[str]:
    return sorted(_files())


def describe() -> dict[str, str]:
    """Scenario name -> its one-line description."""
    return {name: tomllib.loads(_files()[name].read_text())["description"]
            for name in scenario_names()}


def load_scenario(name: str) -> dict[str, Any]:
    """The settings of scenario ``name`` (kebab-case keys), checked against RunConfig."""
    files = _files()
    if name not in files:
        raise ConfigError(f"unknown scenario {name!r}; scenarios: {', '.join(sorted(files))}")
    settings = tomllib.loads(files[name].read_text()).get("fedrnn", {})
    RunConfig.from_flat(settings)  # a bad scenario file fails here, naming the setting
    return settings
